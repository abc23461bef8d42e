"""Attack helpers for the adversarial tests, each named after what it does. The attacker is a plain hivemind DHT node
with a fresh RSA key of its own (its own DHT process and p2pd): it knows only public things (a multiaddr, a run id)
and our open-source record formats, and it stores whatever it likes under its own signature."""

from __future__ import annotations

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from atlas_swarm.swarm.node import peer_id_of_owner


class HostileNode:
    def __init__(self, initial_peers: list[str]):
        self.signer = RSASignatureValidator(RSAPrivateKey())
        self.dht = hivemind.DHT(initial_peers=initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                                record_validators=[self.signer], start=True)  # fmt: skip
        self.peer_id = peer_id_of_owner(self.signer.local_public_key)  # what our records must name to count as its own

    def store(self, key: str, value, ttl: float = 120.0) -> bool:
        """One record under the attacker's own key: signed, so it passes every signature check."""
        return self.dht.store(key, subkey=self.signer.local_public_key, value=value,
                              expiration_time=get_dht_time() + ttl)  # fmt: skip

    def announce_junk_run(self, run_id: str, spec_bytes: bytes) -> None:
        """Announce a run nobody trains, with a spec record that is not a spec."""
        self.store("atlas_runs", {"run_id": run_id, "peer_id": self.peer_id, "time": 0.0})
        self.store(f"{run_id}_spec", spec_bytes)

    def status(self, run_id: str, **fields) -> bool:
        """A status record in the run (its own PeerID, so not 'forged'), with any field values."""
        from atlas_swarm.swarm.records import PeerStatus

        record = {name: f.default for name, f in PeerStatus.__fields__.items() if not f.required}  # every field
        record.update(peer_id=self.peer_id, device="cpu", precision="fp32", client_mode=False, adapter_shapes="x",
                      epoch=1, samples_total=1, samples_per_second=1.0, loss=1.0, time=0.0)  # fmt: skip
        record.update(fields)
        return self.store(f"{run_id}_peers", record)

    def shutdown(self) -> None:
        self.dht.shutdown()


# -- the block protocol (swarm/blocks.py), spoken by hand ----------------------------------------------------------
async def _oversized_answer(claim: int, send: int, _info, reader, writer) -> None:
    import asyncio

    try:
        length = int.from_bytes(await reader.readexactly(8), "big")
        await reader.readexactly(min(length, 1 << 16))
        writer.write(claim.to_bytes(8, "big"))  # "here come `claim` bytes"
        for _ in range(send >> 16):
            writer.write(b"\0" * (1 << 16))
            await writer.drain()
        await asyncio.sleep(5)  # ... and keep the stream open a while
    except Exception:
        pass
    finally:
        writer.close()


async def _serve_oversized(claim: int, send: int, _dht, node) -> None:
    from functools import partial

    from atlas_swarm.swarm.blocks import BLOCKS

    await node.p2p.add_binary_stream_handler(BLOCKS, partial(_oversized_answer, claim, send))


def serve_oversized_blocks(node: HostileNode, claim: int, send: int) -> None:
    """Answer every block request with a length header of ``claim`` bytes, then ``send`` bytes of zeros."""
    from functools import partial

    node.dht.run_coroutine(partial(_serve_oversized, claim, send))


async def _huge_request(peer_id: str, claim: int, _dht, node) -> tuple[bool, float]:
    import asyncio

    from hivemind.p2p import PeerID

    from atlas_swarm.swarm.blocks import BLOCKS

    loop = asyncio.get_running_loop()
    _info, reader, writer = await node.p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), BLOCKS)
    t0 = loop.time()
    try:
        writer.write(claim.to_bytes(8, "big") + b"\0" * (1 << 16))
        await writer.drain()
        closed = await asyncio.wait_for(reader.read(1), 20) == b""
    except (asyncio.TimeoutError, ConnectionError):
        closed = False
    finally:
        writer.close()
    return closed, loop.time() - t0


def send_huge_block_request(node: HostileNode, peer_id: str, claim: int) -> tuple[bool, float]:
    """Ask ``peer_id``'s block server with a request header of ``claim`` bytes: (stream closed by it, seconds)."""
    from functools import partial

    return node.dht.run_coroutine(partial(_huge_request, peer_id, claim))
