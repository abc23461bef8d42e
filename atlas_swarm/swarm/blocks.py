"""Serving and fetching content-addressed blocks peer to peer, over the libp2p connection the DHT already has.

A peer that publishes an adapter serves its store's blocks under the stream protocol BLOCKS; anyone in the swarm (a
notebook, a monitor) asks it for a list of CIDs and gets the blocks back. Nothing is trusted: the caller verifies
every block against its CID (storage/dag.py), so a peer can refuse to answer but cannot substitute content.

Both ends run inside hivemind's DHT process (``dht.run_coroutine``), which owns the p2p daemon connection.
Wire format: a length-prefixed msgpack list of binary CIDs; the answer, a msgpack list of blocks (nil = not here).
"""

from __future__ import annotations

import asyncio
import time
from functools import partial
from typing import Callable, Optional

import msgpack
from hivemind.p2p import P2P, PeerID

from atlas_swarm.errors import StorageError

BLOCKS = "atlas.blocks.v1"
MAX_PER_REQUEST = 16
MAX_BLOCK = (1 << 20) + 1024  # storage.dag.MAX_BLOCK (storage sits above this package: not imported)
MAX_REQUEST_BYTES = MAX_PER_REQUEST * 64 + 64  # a msgpack list of binary CIDs (36 bytes each)
MAX_ANSWER_BYTES = MAX_PER_REQUEST * (MAX_BLOCK + 8) + 64  # about 16 MiB
REQUEST_TIMEOUT = 30.0
RETRY_PAUSES = (0.5, 1.5)  # a request that fails (no answer) is tried again after each of these


async def _receive(reader: asyncio.StreamReader, limit: int) -> bytes:
    """hivemind's P2P.receive_raw_data (an 8-byte length, then the bytes) with a cap: it would read whatever
    length the other side claims, GBs before any check."""
    length = int.from_bytes(await reader.readexactly(8), "big")
    if length > limit:
        raise ValueError(f"a message of {length} bytes, over the {limit}-byte limit")
    return await reader.readexactly(length)


GetBlocks = Callable[[list], dict]  # CIDs (binary) -> {cid: block} of those found: a store's get_blocks


def serve(dht, get_blocks: GetBlocks) -> None:
    """Answer block requests with ``get_blocks`` until the DHT stops. It runs in the DHT's process, so it must
    pickle (a store's bound ``get_blocks`` does: the store is its folder or its daemon's address)."""
    dht.run_coroutine(partial(_serve, get_blocks))


async def _serve(get_blocks: GetBlocks, _dht, node) -> None:
    loop = asyncio.get_running_loop()

    async def handle(_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            wanted = msgpack.unpackb(await asyncio.wait_for(_receive(reader, MAX_REQUEST_BYTES), REQUEST_TIMEOUT))
            if not isinstance(wanted, list) or not all(isinstance(c, bytes) for c in wanted):
                return
            wanted = wanted[:MAX_PER_REQUEST]
            found = await loop.run_in_executor(None, get_blocks, wanted)  # disk or daemon: off the event loop
            await P2P.send_raw_data(msgpack.packb([found.get(c) for c in wanted]), writer)
        except Exception:
            pass  # a bad request costs the asker its answer, never the server
        finally:
            writer.close()

    await node.p2p.add_binary_stream_handler(BLOCKS, handle)


def blocks_from(dht, peer_id: str):
    """A ``get_blocks`` (see storage/dag.py) that asks ``peer_id`` over p2p."""

    def get_blocks(cids: list[bytes]) -> dict[bytes, bytes]:
        out: dict[bytes, bytes] = {}
        for i in range(0, len(cids), MAX_PER_REQUEST):
            # a peer not yet reachable from here (just met) is asked again; one that stalled to REQUEST_TIMEOUT is
            # not (a publisher that never answers would cost three times as long)
            for pause in (*RETRY_PAUSES, None):
                blocks, error = dht.run_coroutine(partial(_ask, peer_id, cids[i : i + MAX_PER_REQUEST]))
                if error is None or pause is None or error.startswith("TimeoutError"):
                    break
                time.sleep(pause)
            if error is not None:
                raise StorageError(f"Peer {peer_id} did not serve the blocks ({error}); it may have left the swarm.")
            out.update(blocks)
        return out

    return get_blocks


async def _ask(peer_id: str, cids: list[bytes], _dht, node) -> tuple[dict[bytes, bytes], Optional[str]]:
    """(blocks, None), or ({}, why): failing here would make hivemind log a traceback for a peer that left."""
    try:
        _info, reader, writer = await asyncio.wait_for(
            node.p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), BLOCKS), REQUEST_TIMEOUT)
        try:
            await P2P.send_raw_data(msgpack.packb(cids), writer)
            answer = msgpack.unpackb(await asyncio.wait_for(_receive(reader, MAX_ANSWER_BYTES), REQUEST_TIMEOUT))
        finally:
            writer.close()
    except Exception as e:
        return {}, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if not isinstance(answer, list):
        return {}, "a malformed answer"
    return {c: b for c, b in zip(cids, answer) if isinstance(b, bytes) and len(b) <= MAX_BLOCK}, None
