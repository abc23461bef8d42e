"""Real swarms: peers are separate `python -m atlas_swarm.peer` processes on one real hivemind DHT (loopback)."""

from __future__ import annotations

import signal

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import write_spec
from tests.peers import PeerProcess, first_maddr

pytestmark = pytest.mark.integration


def adapter(peer: PeerProcess) -> dict[str, torch.Tensor]:
    return load_file(str(peer.out / "adapter" / "adapter_model.safetensors"))


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def start_swarm(tmp_path, spec, data, batch_sizes, extra=()):
    first = PeerProcess(tmp_path, "peer0", ["--run-spec", str(spec), "--data", str(data),
                                            "--batch-size", str(batch_sizes[0]), *extra])  # fmt: skip
    peers = [first]
    started = first.wait_event("started", 90)
    for i, bs in enumerate(batch_sizes[1:], 1):
        peers.append(PeerProcess(tmp_path, f"peer{i}", [
            "--initial-peers", first_maddr(started), "--run", started["run_id"], "--data", str(data),
            "--batch-size", str(bs), "--seed", str(i), *extra]))  # fmt: skip
    return peers, started


def test_three_peers_with_different_batch_sizes_end_with_the_same_adapter(tmp_path, tiny_model, text_data):
    # Prepare
    spec = write_spec(tmp_path / "spec.toml", str(tiny_model), target_batch_size=480)
    peers = []
    try:
        peers, started = start_swarm(tmp_path, spec, text_data, [2, 4, 8], extra=["--max-epochs", "4", "--wait-for-peers", "3", "--join-timeout", "90"])
        # Execute
        codes = [p.wait_exit(240) for p in peers]
        # Assert
        assert codes == [0, 0, 0], "\n\n".join(p.tail() for p in peers)
        adapters = [adapter(p) for p in peers]
        assert max_abs_diff(adapters[0], adapters[1]) <= 1e-5
        assert max_abs_diff(adapters[0], adapters[2]) <= 1e-5
        for p, bs in zip(peers, [2, 4, 8]):
            epochs = p.events("epoch")
            assert epochs, p.tail()
            assert all(e["samples"] % bs == 0 for e in epochs)  # counted in whole local batches
            assert any(len(e["group"]) >= 2 for e in epochs), "this peer never averaged with anyone"
            stopped = p.wait_event("stopped", 1)
            assert stopped["epoch"] >= 4 and stopped["samples_total"] % bs == 0
            losses = [e["loss"] for e in p.events("progress")]
            assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, f"loss did not fall: {losses}"
            # what a peer is credited with per epoch never exceeds what it trained on
            assert 0 < sum(e["samples"] for e in epochs) <= stopped["samples_total"]
    finally:
        for p in peers:
            p.kill_group()
