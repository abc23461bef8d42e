"""Hand-made malicious DAGs against the verified fetch (shared/reviews/repro/dag_check.py, as tests), and the DAG
parser's properties: any blocks give a StorageError or a folder, within bounded time, memory and disk."""

from __future__ import annotations

import os
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atlas_swarm.encoding import pb_bytes as _field
from atlas_swarm.encoding import pb_uint as _uint
from atlas_swarm.errors import StorageError
from atlas_swarm.storage.cid import DAG_PB, RAW, _cid, encode
from atlas_swarm.storage.dag import CorruptBlock, fetch_folder, parse_node

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                    HealthCheck.function_scoped_fixture], derandomize=True)  # fmt: skip


class Dag:
    """A block source an attacker controls: any blocks, correctly hashed (they pass verification)."""

    def __init__(self):
        self.blocks: dict[bytes, bytes] = {}

    def put(self, block: bytes, codec: int = DAG_PB) -> bytes:
        cid = _cid(block, codec, 1)
        self.blocks[cid] = block
        return cid

    def get(self, cids):
        return {c: self.blocks[c] for c in cids if c in self.blocks}


def link(cid: bytes, name: bytes = b"") -> bytes:
    return _field(2, _field(1, cid) + _field(2, name) + _uint(3, 0))


def folder(entries) -> bytes:
    return b"".join(link(c, n) for n, c in entries) + _field(1, _uint(1, 1))


def file_node(children) -> bytes:
    return b"".join(link(c) for c in children) + _field(1, _uint(1, 2) + _uint(3, 0))


def test_amplification_is_refused_before_anything_is_written(tmp_path):
    """24 KB of blocks linking one 1 KiB leaf 174 times per level: 5.4 GB written at depth 3 on 186506a."""
    dag = Dag()
    node = dag.put(os.urandom(1024), RAW)
    for _ in range(3):
        node = dag.put(file_node([node] * 174))
    root = dag.put(folder([(b"big.bin", node)]))
    assert sum(len(b) for b in dag.blocks.values()) < 30_000
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="expand to more than"):
        fetch_folder(dag.get, encode(root), tmp_path / "out")
    assert time.monotonic() - t0 < 5 and not any(tmp_path.iterdir()), "refused fast, nothing on disk"
    with pytest.raises(StorageError, match="expand to more than 1000000 bytes"):
        fetch_folder(dag.get, encode(dag.put(folder([(b"f", dag.put(file_node([node] * 2)))]))), tmp_path / "o2",
                     max_bytes=1_000_000)  # fmt: skip


@pytest.mark.parametrize("entries, why", [
    ([(b"x", b"")], "empty link CID (IndexError on 186506a)"),
    ([(b"x", b"\x01\x70")], "truncated CID"),
    ([(b"\xff\xfe", None)], "a name that is not UTF-8"),
])  # fmt: skip
def test_malformed_links_are_a_storage_error(tmp_path, entries, why):
    dag = Dag()
    leaf = dag.put(b"data", RAW)
    root = dag.put(folder([(n, leaf if c is None else c) for n, c in entries]))
    with pytest.raises(StorageError):
        fetch_folder(dag.get, encode(root), tmp_path / "out")


def test_duplicate_names_are_a_storage_error(tmp_path):
    """FileExistsError on 186506a: the keeper then retried the same CID forever."""
    dag = Dag()
    sub = dag.put(folder([]))
    root = dag.put(folder([(b"x", sub), (b"x", sub)]))
    with pytest.raises(CorruptBlock, match="duplicate"):
        fetch_folder(dag.get, encode(root), tmp_path / "out")


def test_blocks_and_totals_are_bounded(tmp_path):
    dag = Dag()
    big = dag.put(b"\0" * ((1 << 20) + 2048), RAW)
    with pytest.raises(StorageError, match="over the .*-byte limit"):
        fetch_folder(dag.get, encode(dag.put(folder([(b"big", big)]))), tmp_path / "a")
    leaves = [dag.put(os.urandom(4096), RAW) for _ in range(8)]
    with pytest.raises(StorageError, match="over 20000 bytes"):
        fetch_folder(dag.get, encode(dag.put(folder([(b"f", dag.put(file_node(leaves)))]))), tmp_path / "b",
                     max_bytes=20_000)  # fmt: skip


block_bytes = st.binary(max_size=300) | st.builds(
    lambda parts: b"".join(parts),
    st.lists(st.sampled_from([_field(1, _uint(1, 1)), _field(1, _uint(1, 2)), _field(2, b""), b"\x12\x00",
                              _field(2, _field(1, b"\x01\x70" + b"\x12\x20" + b"\0" * 32)), b"\xff" * 11]),
             max_size=8))  # fmt: skip


@SETTINGS
@given(block_bytes)
def test_parse_node_raises_only_value_error(block):
    try:
        links, kind, data = parse_node(block)
    except ValueError:
        return
    assert all(isinstance(c, bytes) and isinstance(n, str) for c, n in links) and isinstance(data, bytes)


@SETTINGS
@given(st.lists(block_bytes, min_size=1, max_size=6), st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5),
       st.binary(max_size=4)), max_size=10))  # fmt: skip
def test_any_dag_is_a_folder_or_a_storage_error(tmp_path_factory, raw_blocks, edges):
    """Random blocks wired by random links (cycles, repeats, junk names) through real hashes."""
    dag = Dag()
    cids = [dag.put(b) for b in raw_blocks]
    for a, b, name in edges:  # add nodes that link earlier ones
        if a < len(cids) and b < len(cids):
            cids.append(dag.put(folder([(name, cids[a]), (name + b"2", cids[b])])))
    out = tmp_path_factory.mktemp("dag") / "out"
    t0 = time.monotonic()
    try:
        fetch_folder(dag.get, encode(cids[-1]), out, max_bytes=1 << 20)
    except StorageError:
        assert not out.exists()
    assert time.monotonic() - t0 < 2.0
