"""Reading UnixFS DAGs back, trusting nothing: every block is hashed against the CID that named it before it is
parsed, so a corrupted or substituted block (from a disk, a daemon or a peer) is refused with the CID it failed.

    parse_cid(text)                     "bafy…"/"Qm…" → binary CID (only sha2-256 multihashes: what we write)
    verify_block(cid, block)            raise CorruptBlock unless sha256(block) is the CID's digest
    fetch_folder(get_blocks, cid, dest) walk the DAG level by level, verify every block, write the files
    first_good(sources)                 one get_blocks over several sources, keeping only blocks that verify

Bounded, whatever the DAG: a block is at most MAX_BLOCK bytes, a DAG at most MAX_BLOCKS blocks and ``max_bytes``
(the caller's bound, MAX_ADAPTER_BYTES by default) both in the blocks held and in the bytes its files would expand
to. A DAG that links one block many times per level (24 KB of blocks once became a 5.4 GB file) is refused before
anything is written. Every malformed DAG is a StorageError (CorruptBlock), never another exception.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Mapping

from atlas_swarm.encoding import b58decode, pb_fields
from atlas_swarm.errors import StorageError
from atlas_swarm.storage.cid import DAG_PB, RAW, encode

GetBlocks = Callable[[list[bytes]], Mapping[bytes, bytes]]  # binary CIDs -> the blocks found (missing ones left out)
MAX_DEPTH = 64
MAX_BLOCK = (1 << 20) + 1024  # 1 MiB plus framing; we write 256 KiB chunks (cid.CHUNK)
MAX_BLOCKS = 1 << 16
MAX_ADAPTER_BYTES = 512 << 20  # a LoRA adapter of a 7B model at r=64 is ~160 MB in fp32


class CorruptBlock(StorageError):
    """A block's bytes do not hash to the CID it was fetched under."""


def parse_cid(text: str) -> bytes:
    """A CID string as written by cid.encode (CIDv1 base32 'b…', CIDv0 base58btc 'Qm…') → binary CID."""
    try:
        if text.startswith("b"):
            raw = base64.b32decode(text[1:].upper() + "=" * (-len(text[1:]) % 8))
            if raw[0] != 1 or raw[1] not in (DAG_PB, RAW):
                raise ValueError("not a CIDv1 of dag-pb or raw")
        elif text.startswith("Qm") and len(text) == 46:
            raw = b58decode(text)
        else:
            raise ValueError("neither CIDv1 base32 (b…) nor CIDv0 (Qm…)")
        if _multihash(raw)[:2] != b"\x12\x20" or len(_multihash(raw)) != 34:
            raise ValueError("only sha2-256 CIDs are supported")
    except (ValueError, IndexError) as e:
        raise StorageError(f"{text!r} is not a CID we can verify ({e}).") from None
    return raw


def _multihash(cid: bytes) -> bytes:
    return cid if cid[0] == 0x12 else cid[2:]


def verify_block(cid: bytes, block: bytes) -> None:
    if hashlib.sha256(block).digest() != _multihash(cid)[2:]:
        raise CorruptBlock(f"Block {encode(cid)} is corrupted or substituted: its bytes hash to something else.")


# -- protobuf reading (dag-pb PBNode / PBLink, UnixFS Data): only the fields cid.py writes --------------------------
def parse_node(block: bytes) -> tuple[list[tuple[bytes, str]], int, bytes]:
    """dag-pb block → (links as (binary CID, name), UnixFS type, inline data). Type: 1 folder, 2 file. Raises
    ValueError for anything else (a link without a valid sha2-256 CID, a name that is not UTF-8)."""
    links, data = [], b""
    for number, value in pb_fields(block):
        if number == 2 and isinstance(value, bytes):
            link = dict(pb_fields(value))
            cid, name = link.get(1, b""), link.get(2, b"")
            if not isinstance(cid, bytes) or not _valid_cid(cid) or not isinstance(name, bytes):
                raise ValueError("a link without a valid CID")
            links.append((cid, name.decode()))
        elif number == 1 and isinstance(value, bytes):
            data = value
    unixfs = dict(pb_fields(data))
    kind, inline = unixfs.get(1, -1), unixfs.get(2, b"")
    if not isinstance(kind, int) or not isinstance(inline, bytes):
        raise ValueError("malformed UnixFS data")
    return links, kind, inline


def _valid_cid(cid: bytes) -> bool:
    """A binary CID we can verify: CIDv0 (a bare sha2-256 multihash) or CIDv1 dag-pb/raw with one."""
    if len(cid) == 34:
        return cid[:2] == b"\x12\x20"
    return len(cid) == 36 and cid[0] == 1 and cid[1] in (DAG_PB, RAW) and cid[2:4] == b"\x12\x20"


# -- fetching ------------------------------------------------------------------------------------------------------
def first_good(sources: list[tuple[str, Callable]]) -> Callable[[list[bytes]], dict[bytes, bytes]]:
    """A get_blocks that asks each source in turn for what is still missing and keeps only blocks that hash to
    their CID; if every copy of a block was bad, CorruptBlock names who served it."""

    def get_blocks(cids: list[bytes]) -> dict[bytes, bytes]:
        found: dict[bytes, bytes] = {}
        bad: dict[bytes, str] = {}
        failed: list[str] = []
        for name, source in sources:
            missing = [c for c in cids if c not in found]
            if not missing:
                break
            try:
                answer = source(missing)
            except StorageError as e:
                failed.append(str(e))
                continue  # a peer that left, a daemon that is down: try the next source
            for cid, block in answer.items():
                try:
                    verify_block(cid, block)
                    found[cid] = block
                except CorruptBlock:
                    bad[cid] = name
        for cid, name in bad.items():
            if cid not in found:
                raise CorruptBlock(f"Block {encode(cid)} was corrupted or substituted by {name}, and no other source "
                                   f"had a good copy; refusing the adapter.")  # fmt: skip
        if failed and any(c not in found for c in cids):  # say why, not only that a block is missing
            raise StorageError(f"{sum(c not in found for c in cids)} of {len(cids)} blocks are not available: "
                               f"{' '.join(failed)}")  # fmt: skip
        return found

    return get_blocks


def fetch_blocks(get_blocks: GetBlocks, root: bytes, max_bytes: int = MAX_ADAPTER_BYTES) -> dict[bytes, bytes]:
    """Every block of the DAG under ``root``, each verified, fetched one level at a time (one round trip a level).
    Refuses (StorageError) before holding more than ``max_bytes`` of blocks or MAX_BLOCKS of them."""
    blocks: dict[bytes, bytes] = {}
    level, depth, held = [root], 0, 0
    while level:
        depth += 1
        if depth > MAX_DEPTH:
            raise StorageError(f"The DAG under {encode(root)} is deeper than {MAX_DEPTH} levels; refusing it.")
        wanted = [c for c in dict.fromkeys(level) if c not in blocks]
        if len(blocks) + len(wanted) > MAX_BLOCKS:
            raise StorageError(f"The DAG under {encode(root)} has more than {MAX_BLOCKS} blocks; refusing it.")
        found = get_blocks(wanted)
        missing = [c for c in wanted if c not in found]
        if missing:
            raise StorageError(f"Block {encode(missing[0])} of {encode(root)} is not available "
                               f"({len(missing)} of {len(wanted)} missing at depth {depth}).")  # fmt: skip
        level = []
        for cid in wanted:
            block = found[cid]
            if len(block) > MAX_BLOCK:
                raise StorageError(f"Block {encode(cid)} is {len(block)} bytes, over the {MAX_BLOCK}-byte limit.")
            held += len(block)
            if held > max_bytes:
                raise StorageError(f"The DAG under {encode(root)} is over {max_bytes} bytes; refusing it.")
            verify_block(cid, block)
            blocks[cid] = block
            if _codec(cid) == DAG_PB:
                try:
                    level += [link for link, _ in parse_node(found[cid])[0]]
                except ValueError as e:
                    raise CorruptBlock(f"Block {encode(cid)} is not a valid dag-pb node ({e}).") from None
    return blocks


def _codec(cid: bytes) -> int:
    return DAG_PB if cid[0] == 0x12 else cid[1]


def fetch_folder(get_blocks: GetBlocks, cid: str, dest: str | Path, max_bytes: int = MAX_ADAPTER_BYTES) -> Path:
    """Fetch the folder ``cid`` into ``dest`` (which must not exist yet), verifying every block. The folder appears
    whole or not at all: it is written beside ``dest`` and renamed into place. At most ``max_bytes`` are held or
    written: the size the files expand to is computed before the first byte is written."""
    dest = Path(dest)
    if dest.exists():
        raise StorageError(f"{str(dest)!r} already exists; fetch into a new folder.")
    root = parse_cid(cid)
    blocks = fetch_blocks(get_blocks, root, max_bytes)
    size = expanded_size(blocks, root, max_bytes)
    if size > max_bytes:
        raise StorageError(f"The folder {cid} would expand to more than {max_bytes} bytes of files (its blocks link "
                           f"the same content many times); refusing to write it.")  # fmt: skip
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    except OSError as e:
        raise StorageError(f"Cannot write {str(dest)!r}: {e.strerror}.") from None
    try:
        _write_folder(blocks, root, tmp)
        os.replace(tmp, dest)
    except OSError as e:  # a full disk: this fetch fails, nothing half-written stays
        raise StorageError(f"Cannot write {str(dest)!r}: {e.strerror or e}.") from None
    except (ValueError, KeyError, IndexError) as e:
        raise CorruptBlock(f"The folder {cid} is not a valid UnixFS folder ({type(e).__name__}: {e}).") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def expanded_size(blocks: dict[bytes, bytes], root: bytes, cap: int) -> int:
    """Bytes the files under ``root`` would take on disk (each link counted as often as it is linked), computed
    once per block and stopped as soon as it passes ``cap``: no amplification reaches the disk or the CPU."""
    sizes: dict[bytes, int] = {}

    def size(cid: bytes, depth: int) -> int:
        if cid in sizes:
            return sizes[cid]
        if depth > MAX_DEPTH or cid not in blocks:
            raise CorruptBlock(f"Block {encode(cid)} is missing from, or too deep in, the DAG.")
        if _codec(cid) == RAW:
            total = len(blocks[cid])
        else:
            try:
                links, _, data = parse_node(blocks[cid])
            except ValueError as e:
                raise CorruptBlock(f"Block {encode(cid)} is not a valid dag-pb node ({e}).") from None
            total = len(data)
            for child, _ in links:
                total += size(child, depth + 1)
                if total > cap:
                    break  # enough to refuse; no need to know how much more
        sizes[cid] = total
        return total

    return size(root, 0)


def _write_folder(blocks: dict[bytes, bytes], cid: bytes, folder: Path) -> None:
    links, kind, _ = parse_node(blocks[cid]) if _codec(cid) == DAG_PB else ([], 2, b"")
    if kind != 1:
        raise StorageError(f"{encode(cid)} is a file, not a folder.")
    seen = set()
    for child, name in links:
        if not name or name in (".", "..") or "/" in name or "\0" in name or name in seen:
            raise CorruptBlock(f"Folder {encode(cid)} has an entry named {name!r} (empty, a path or a duplicate); "
                               f"refusing to write it.")  # fmt: skip
        seen.add(name)
        is_dir = _codec(child) == DAG_PB and parse_node(blocks[child])[1] == 1
        if is_dir:
            (folder / name).mkdir()
            _write_folder(blocks, child, folder / name)
        else:
            with open(folder / name, "wb") as f:
                _write_file(blocks, child, f)


def _write_file(blocks: dict[bytes, bytes], cid: bytes, f) -> None:
    if _codec(cid) == RAW:
        f.write(blocks[cid])
        return
    links, kind, data = parse_node(blocks[cid])
    if kind != 2:
        raise CorruptBlock(f"{encode(cid)} should be a file node (UnixFS type 2), is type {kind}.")
    f.write(data)
    for child, _ in links:
        _write_file(blocks, child, f)
