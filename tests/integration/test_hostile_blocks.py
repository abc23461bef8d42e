"""The block protocol (atlas.blocks.v1) against a hostile peer: neither side reads more than its cap. On 186506a
both sides read whatever length the other claimed (hivemind's receive_raw_data), GBs before any check."""

from __future__ import annotations

import time

import pytest

from atlas_swarm.errors import StorageError
from atlas_swarm.identity import Identity
from atlas_swarm.storage import LocalStore
from atlas_swarm.storage.dag import parse_cid
from atlas_swarm.swarm import Swarm
from tests.attacks import HostileNode, send_huge_block_request, serve_oversized_blocks
from tests.unit.test_storage import make_folder

pytestmark = pytest.mark.integration


def test_neither_side_reads_past_its_cap(tmp_path):
    honest = Swarm.join(Identity.load_or_create(tmp_path / "honest.key"), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    attacker = None
    try:
        store = LocalStore(tmp_path / "store")
        cid = parse_cid(store.put_folder(make_folder(tmp_path / "adapter")))
        honest.serve_blocks(store.get_blocks)
        attacker = HostileNode(honest.visible_maddrs())
        hostile_id = attacker.dht.peer_id.to_base58()

        # a reply that claims 4 GiB and streams 8 MiB: refused at the header, not after 30 s of buffering
        serve_oversized_blocks(attacker, claim=4 << 30, send=8 << 20)
        t0 = time.monotonic()
        with pytest.raises(StorageError, match="limit"):
            honest.blocks_from(hostile_id)([cid])
        assert time.monotonic() - t0 < 10, "refused at once"

        # a request that claims 1 TiB: the server closes the stream without reading it, and serves others after
        closed, seconds = send_huge_block_request(attacker, honest.peer_id, 1 << 40)
        assert closed and seconds < 10
        fetcher = Swarm.join(Identity.load_or_create(tmp_path / "fetcher.key"), honest.visible_maddrs(),
                             ["/ip4/127.0.0.1/tcp/0"])  # fmt: skip
        try:
            assert fetcher.blocks_from(honest.peer_id)([cid]) == store.get_blocks([cid])
        finally:
            fetcher.shutdown()
    finally:
        if attacker is not None:
            attacker.shutdown()
        honest.shutdown()
