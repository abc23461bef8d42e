"""Peers that fit a small card: a 4-bit base in one swarm with a full-precision one, and a step that runs out of
memory mid-run. Real peer processes on a real DHT (loopback); bitsandbytes' real NF4 kernels, on CPU here."""

from __future__ import annotations

import pytest

from atlas_swarm.config import RunSpec
from atlas_swarm.launch import PeerProcess
from tests.conftest import write_spec
from tests.integration.test_swarm import adapter, eval_loss, max_abs_diff
from tests.peers import killed_at_exit, planned_first, start_peer

pytestmark = pytest.mark.integration


def test_a_4bit_peer_and_a_full_precision_peer_average_one_adapter(tmp_path, tiny_model, text_data):
    # Prepare: the second peer loads the base in NF4 (--device cpu asks for it on a CPU explicitly)
    tiny_spec = write_spec(tmp_path / "spec.toml", str(tiny_model), target_batch_size=480)
    with killed_at_exit([]) as peers:
        extra = ["--max-epochs", "4", "--wait-for-peers", "2", "--join-timeout", "90"]
        listen, address = planned_first(tmp_path, "peer0")
        peers.append(start_peer(tmp_path, "peer0", [*listen, "--run-spec", str(tiny_spec), "--data", str(text_data),
                                                    "--batch-size", "8", *extra]))  # fmt: skip
        peers.append(start_peer(tmp_path, "nf4", ["--initial-peers", address, "--run",
                                                  RunSpec.from_toml(tiny_spec).run_id, "--data", str(text_data),
                                                  "--batch-size", "8", "--seed", "1", "--device", "cpu", "--quantize",
                                                  "nf4", *extra]))  # fmt: skip
        # Execute
        codes = [p.wait_exit(240) for p in peers]
        # Assert: one adapter, averaged together, and it learned
        assert codes == [0, 0], "\n\n".join(p.tail() for p in peers)
        full, nf4 = peers
        assert nf4.events("started")[0]["quantize"] == "nf4" and nf4.events("started")[0]["checkpointing"]
        assert full.events("started")[0]["quantize"] == "none"
        assert max_abs_diff(adapter(full), adapter(nf4)) <= 1e-5
        for p in peers:
            assert sum(len(e["group"]) == 2 for e in p.events("epoch")) >= 2, p.tail()
        before, after = eval_loss(tiny_spec, text_data, None), eval_loss(tiny_spec, text_data, nf4.out / "adapter")
        assert after < before, f"loss did not fall: {before} -> {after}"


def test_out_of_memory_mid_run_halves_the_micro_batch_and_the_peer_goes_on(tmp_path, tiny_spec, text_data):
    # Prepare: after 5 forward passes, the "card" fits at most 2 rows per forward pass
    peer = PeerProcess(tmp_path / "oom", ["--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--run-spec", str(tiny_spec),
                                          "--data", str(text_data), "--batch-size", "8", "--max-steps", "12"],
                       threads=1, env={"ATLAS_FAULT": "oom_above:2:5", "HF_HUB_OFFLINE": "1"},
                       module="tests.faults")  # fmt: skip
    # Execute
    try:
        assert peer.wait_exit(120) == 0, peer.tail()
    finally:
        peer.kill()
    # Assert: two clear events (8 -> 4 -> 2), every step done, at the batch size asked for
    assert [e["micro_batch"] for e in peer.events("oom")] == [4, 2], peer.tail()
    stopped = peer.events("stopped")[0]
    assert stopped["steps"] == 12 and stopped["samples_total"] == 12 * 8
    assert peer.events("started")[0]["micro_batch"] == 8
