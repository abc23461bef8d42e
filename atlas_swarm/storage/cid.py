"""IPFS CIDs of files, computed the way `ipfs add` (kubo and js-ipfs) does by default.

No PyPI package gets this right for files over one chunk, so here it is, tested against a real daemon:
- fixed-size chunks of 262,144 bytes;
- a balanced DAG whose nodes have at most 174 links;
- CIDv0 (the default): every leaf is a dag-pb node holding UnixFS File data, and the result is base58btc `Qm…`;
- CIDv1: leaves are raw blocks, inner nodes dag-pb, and the result is base32 `bafy…` (or `bafk…` for one chunk).

dag-pb PBNode: Links (field 2) before Data (field 1). PBLink: Hash (1), Name (2, always written, empty),
Tsize (3, the child's whole DAG in bytes). UnixFS Data: Type=File (1), Data (2), filesize (3), blocksizes (4).
A folder is one dag-pb node (UnixFS Type=Directory) linking each entry by name, in byte order of the names: the
same folder gets the same CID from `ipfs add -r --cid-version=1 --raw-leaves`.

Every builder takes an optional ``emit(cid, block)``: a store passes one to keep the blocks it hashes.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional

from atlas_swarm.encoding import b58encode, pb_bytes, pb_uint

CHUNK = 262_144
MAX_LINKS = 174
DAG_PB, RAW = 0x70, 0x55
Emit = Optional[Callable[[bytes, bytes], None]]  # (binary CID, block)


def _unixfs_file(data: bytes | None, filesize: int, blocksizes: tuple[int, ...] = ()) -> bytes:
    out = pb_uint(1, 2)  # Type = File
    if data:
        out += pb_bytes(2, data)
    out += pb_uint(3, filesize)
    for size in blocksizes:
        out += pb_uint(4, size)
    return out


@dataclass(frozen=True)
class _Node:
    cid: bytes  # binary CID (CIDv0: the bare multihash)
    filesize: int  # file bytes below this node
    tsize: int  # bytes of every block below and including this node


def _multihash(block: bytes) -> bytes:
    return b"\x12\x20" + hashlib.sha256(block).digest()


def _cid(block: bytes, codec: int, version: int) -> bytes:
    mh = _multihash(block)
    return mh if version == 0 else bytes([1, codec]) + mh


def _emitted(block: bytes, codec: int, version: int, emit: Emit) -> bytes:
    cid = _cid(block, codec, version)
    if emit is not None:
        emit(cid, block)
    return cid


def _leaf(chunk: bytes, version: int, emit: Emit = None) -> _Node:
    if version == 1:  # raw leaves
        return _Node(_emitted(chunk, RAW, 1, emit), len(chunk), len(chunk))
    block = pb_bytes(1, _unixfs_file(chunk, len(chunk)))
    return _Node(_emitted(block, DAG_PB, 0, emit), len(chunk), len(block))


def _links(named: list[tuple[bytes, _Node]]) -> bytes:
    return b"".join(pb_bytes(2, pb_bytes(1, c.cid) + pb_bytes(2, name) + pb_uint(3, c.tsize)) for name, c in named)


def _parent(children: list[_Node], version: int, emit: Emit = None) -> _Node:
    filesize = sum(c.filesize for c in children)
    block = _links([(b"", c) for c in children])
    block += pb_bytes(1, _unixfs_file(None, filesize, tuple(c.filesize for c in children)))
    return _Node(_emitted(block, DAG_PB, version, emit), filesize, len(block) + sum(c.tsize for c in children))


def _chunks(stream: BinaryIO) -> Iterator[bytes]:
    while True:
        chunk = stream.read(CHUNK)
        if not chunk:
            return
        while len(chunk) < CHUNK:  # a pipe may return short reads: chunks must be exactly CHUNK bytes
            more = stream.read(CHUNK - len(chunk))
            if not more:
                break
            chunk += more
        yield chunk


def _root(stream: BinaryIO, version: int, emit: Emit = None) -> _Node:
    level = [_leaf(c, version, emit) for c in _chunks(stream)]
    if not level:  # the empty file: an empty raw block (v1), or one dag-pb node with no data (v0)
        if version == 1:
            return _leaf(b"", 1, emit)
        block = pb_bytes(1, _unixfs_file(None, 0))
        return _Node(_emitted(block, DAG_PB, 0, emit), 0, len(block))
    while len(level) > 1:
        level = [_parent(level[i : i + MAX_LINKS], version, emit) for i in range(0, len(level), MAX_LINKS)]
    return level[0]


def _folder(path: Path, version: int, emit: Emit) -> _Node:
    named = []
    for entry in sorted(path.iterdir(), key=lambda p: p.name.encode()):
        if entry.is_symlink() or not (entry.is_file() or entry.is_dir()):
            raise ValueError(f"{str(entry)!r} is a link or a special file; only plain files and folders are stored")
        if entry.is_dir():
            named.append((entry.name.encode(), _folder(entry, version, emit)))
        else:
            with open(entry, "rb") as f:
                named.append((entry.name.encode(), _root(f, version, emit)))
    block = _links(named) + pb_bytes(1, pb_uint(1, 1))  # UnixFS Type = Directory
    return _Node(_emitted(block, DAG_PB, version, emit), sum(c.filesize for _, c in named),
                 len(block) + sum(c.tsize for _, c in named))  # fmt: skip


def encode(cid: bytes) -> str:
    """CIDv0 as base58btc (Qm…), CIDv1 as multibase base32 lower (b…)."""
    if cid[0] == 1:
        return "b" + base64.b32encode(cid).decode().lower().rstrip("=")
    return b58encode(cid)


def _check_version(version: int) -> None:
    if version not in (0, 1):
        raise ValueError(f"CID version {version} is not 0 or 1")


def cid_of_file(path: str | Path, version: int = 0, emit: Emit = None) -> str:
    _check_version(version)
    with open(path, "rb") as f:
        return encode(_root(f, version, emit).cid)


def cid_of_bytes(data: bytes, version: int = 0, emit: Emit = None) -> str:
    import io

    _check_version(version)
    return encode(_root(io.BytesIO(data), version, emit).cid)


def cid_of_folder(path: str | Path, version: int = 1, emit: Emit = None) -> str:
    """The CID `ipfs add -r` gives the folder (with --cid-version=1 --raw-leaves for version 1)."""
    _check_version(version)
    if not Path(path).is_dir():
        raise ValueError(f"{str(path)!r} is not a folder")
    return encode(_folder(Path(path), version, emit).cid)
