"""Real swarms: peers are separate `python -m atlas_swarm.peer` processes on one real hivemind DHT (loopback)."""

from __future__ import annotations

import json
import os
import signal
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from atlas_swarm.config import RunSpec
from atlas_swarm.launch import PeerProcess
from tests.conftest import write_spec
from tests.peers import killed_at_exit, planned_first, start_peer, wait_until

pytestmark = pytest.mark.integration


def adapter(peer: PeerProcess) -> dict[str, torch.Tensor]:
    return load_file(str(peer.out / "adapter" / "adapter_model.safetensors"))


def eval_loss(spec_path, data, adapter_dir) -> float:
    from atlas_swarm.config import RunSpec
    from atlas_swarm.model.lora import load_adapter_weights, load_model
    from atlas_swarm.train.data import Batches, load_examples
    from atlas_swarm.train.steps import evaluate

    spec = RunSpec.from_toml(spec_path)
    model, tokenizer = load_model(spec)
    if adapter_dir is not None:
        load_adapter_weights(model, adapter_dir)
    return evaluate(model, Batches(load_examples(str(data), spec)[:200], tokenizer, spec), "cpu", spec.model.task)["loss"]


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def start_swarm(peers, tmp_path, spec, data, batch_sizes, extra=()):
    """Start a first peer and, at once, the others through its (planned) multiaddr; each is appended to ``peers``
    as it starts. Returns the first peer's started event."""
    listen, address = planned_first(tmp_path, "peer0")
    first = start_peer(tmp_path, "peer0", [*listen, "--run-spec", str(spec), "--data", str(data),
                                            "--batch-size", str(batch_sizes[0]), *extra])  # fmt: skip
    peers.append(first)
    for i, bs in enumerate(batch_sizes[1:], 1):
        peers.append(start_peer(tmp_path, f"peer{i}", [
            "--initial-peers", address, "--run", RunSpec.from_toml(spec).run_id, "--data", str(data),
            "--batch-size", str(bs), "--seed", str(i), *extra]))  # fmt: skip
    return first.wait_event("started", 90)


def test_three_peers_with_different_batch_sizes_end_with_the_same_adapter(tmp_path, tiny_model, text_data):
    # Prepare
    # epochs of 1920 samples, 3-5 s on this VM: at 960 they had become 1.3-2 s, no longer than matchmaking_time, and
    # in a full run (2026-12-04) one peer was in no group from epoch 3 on and the final vote went 1-1-1
    spec = write_spec(tmp_path / "spec.toml", str(tiny_model), target_batch_size=1920)
    with killed_at_exit([]) as peers:
        start_swarm(peers, tmp_path, spec, text_data, [2, 4, 8], extra=["--max-epochs", "4", "--wait-for-peers", "3", "--join-timeout", "90"])
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
            assert any(len(e["group"]) >= 2 for e in epochs), "this peer never averaged with anyone"
            stopped = p.wait_event("stopped", 1)
            assert stopped["epoch"] >= 4
            # what a peer is credited with never exceeds what it trained on (an epoch's last step may be shorter
            # than the batch, see SwarmOptimizer.next_step, so totals need not be multiples of it)
            assert 0 < sum(e["samples"] for e in epochs) <= stopped["samples_total"]
            # a state round runs at the transitions into even epochs (average_state_every = 2) and the last; the event
            # says how long it took and whom it averaged
            me = p.wait_event("started", 1)["peer_id"]
            assert all(e["state_s"] is None and e["state_group"] is None for e in epochs if e["epoch"] % 2), epochs
            assert all(e["state_s"] > 0 and me in e["state_group"] for e in epochs if e["state_group"]), epochs
        assert any(len(e["state_group"] or ()) >= 2 for p in peers for e in p.events("epoch")), "no state averaged"
        # the loss fell: the shared adapter vs the initial one, on the same 200 texts (minibatch losses are too noisy)
        before, after = eval_loss(spec, text_data, None), eval_loss(spec, text_data, peers[0].out / "adapter")
        assert after < before, f"loss did not fall: {before} -> {after}"


def test_sigkill_of_one_peer_mid_round_leaves_the_others_averaging_with_each_other(tmp_path, tiny_model, text_data):
    # Prepare
    spec = write_spec(tmp_path / "spec.toml", str(tiny_model), target_batch_size=240)
    with killed_at_exit([]) as peers:
        start_swarm(peers, tmp_path, spec, text_data, [4, 4, 4, 4],
                               extra=["--wait-for-peers", "4", "--join-timeout", "120"])
        victim, survivors = peers[3], peers[:3]
        victim.wait_event("epoch", 150, lambda e: e["epoch"] >= 2 and len(e["group"]) >= 2)
        # Execute: SIGKILL 70 % of the way from its last epoch event to the next: with this spec about 1.5 s of that
        # 2 s is the averaging step (matchmaking for matchmaking_time 2 s, then the round), so it dies in its step,
        # its groupmates' search or round under way
        seen = victim.events("epoch")[-1]
        last = victim.wait_event("epoch", 60, lambda e: e["epoch"] > seen["epoch"])  # a fresh epoch, just begun
        epoch_s = last["time"] - seen["time"]
        time.sleep(max(0.0, last["time"] + 0.7 * epoch_s - time.time()))
        victim.kill()
        killed_at = time.time()
        ids = {p.wait_event("started", 1)["peer_id"] for p in survivors}
        for p in survivors:  # two rounds averaged with survivors only, each with at least one other survivor
            p.wait_event("epoch", 120, lambda e, p=p: sum(
                x["time"] > killed_at and len(x["group"]) >= 2 and set(x["group"]) <= ids
                for x in p.events("epoch") if x["time"] <= e["time"]) >= 2)  # fmt: skip
        for p in survivors:
            p.signal(signal.SIGTERM)
        codes = [p.wait_exit(15) for p in survivors]
        # Assert
        assert codes == [0, 0, 0], "\n\n".join(p.tail() for p in survivors)
        for p in survivors:  # the step the victim died in cost them at most matchmaking_time + gather.WAIT (+ 3 s),
            first = next(e for e in p.events("epoch") if e["time"] > killed_at)  # not averaging_timeout (15 s)
            assert first["averaging_s"] < 2.0 + 5.0 + 3.0, first
        for p in survivors:
            losses = [e["loss"] for e in p.events("progress")]
            assert all(loss == loss and loss < 1e4 for loss in losses), "NaN or blown-up loss"  # NaN != NaN
            assert all(torch.isfinite(t).all() for t in adapter(p).values())
            # a groupmate gone mid-join (ConnectionResetError in hivemind's matchmaking) is a failed round, not a
            # "Task exception was never retrieved" traceback (full run, 2026-12-05)
            assert "Traceback" not in p.err_path.read_text(), p.tail()


def test_a_failed_round_steps_on_the_peers_own_gradients_not_zeros(tmp_path, tiny_model, text_data):
    # Prepare: two CLI peers; the second one's first 2 gradient rounds raise once their group has formed
    # (tests/faults.py rounds_fail), so it falls back to "local gradients" twice. hivemind had zeroed its
    # accumulators as each round began, and it stepped on zeros (norm 0.0, four times out of four).
    spec = write_spec(tmp_path / "spec.toml", str(tiny_model), target_batch_size=240)
    common = ["--data", str(text_data), "--batch-size", "4", "--max-epochs", "5", "--wait-for-peers", "2",
              "--join-timeout", "90"]  # fmt: skip
    with killed_at_exit([]) as peers:
        listen, address = planned_first(tmp_path, "peer0")
        peers.append(start_peer(tmp_path, "peer0", [*listen, "--run-spec", str(spec), *common]))
        peers.append(PeerProcess(tmp_path / "faulty", ["--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--initial-peers",
                                                       address, "--run", RunSpec.from_toml(spec).run_id, "--seed", "1",
                                                       *common],
                                 threads=1, env={"ATLAS_FAULT": "rounds_fail:2", "HF_HUB_OFFLINE": "1"},
                                 module="tests.faults"))  # fmt: skip
        # Execute
        codes = [p.wait_exit(240) for p in peers]
        # Assert: each fallback stepped on exactly the local mean gradient hivemind computed as the round began
        assert codes == [0, 0], "\n\n".join(p.tail() for p in peers)
        lines = [line for line in peers[1].err_path.read_text().splitlines() if "stepping on local gradients" in line]
        assert len(lines) >= 2, peers[1].tail()
        for line in lines:
            norm = float(line.split("norm ")[1].split(" ")[0])
            diff = float(line.split("max diff ")[1].rstrip(")"))
            assert norm > 0 and diff == 0.0, line
        assert all(torch.isfinite(t).all() for t in adapter(peers[1]).values())
        # each broken round is one line on the terminal, not asyncio's "Task exception was never retrieved" traceback
        err = peers[1].err_path.read_text()
        assert "Traceback" not in err and err.count("An averaging round failed: RuntimeError('fault:") == 2, err


def test_ctrl_c_during_a_round_saves_the_adapter_exits_0_and_leaves_no_processes(tmp_path, tiny_model, text_data):
    """Two peers average; one is frozen (SIGSTOP, as a peer whose machine hangs), so the other's next round waits
    for it. Ctrl-C then: the waiting peer gives up the round, saves, reports "stopped" and exits 0 within 10 s."""
    # Prepare: epochs of ~4 s, longer than matchmaking_time (2 s); with epochs of 48 samples (~0.2 s) this pair often
    # lost the 30-s averaging_timeout in one round (README, Known limits, "Two peers whose epochs are far shorter")
    spec = write_spec(tmp_path / "spec.toml", str(tiny_model), target_batch_size=1920, averaging_timeout=30.0)
    with killed_at_exit([]) as peers:
        start_swarm(peers, tmp_path, spec, text_data, [4, 4], extra=["--wait-for-peers", "2", "--join-timeout", "120"])
        frozen, peer = peers
        first = peer.wait_event("epoch", 150, lambda e: len(e["group"]) == 2)
        # a state round at that transition had its group too (one pre-scheduled before a download looked under
        # another epoch's key until its timeout: SwarmOptimizer._drop_stale_state_round)
        assert first["state_s"] is None or len(first["state_group"]) == 2, first
        children = peer.descendants()
        os.killpg(frozen.process.pid, signal.SIGSTOP)
        # in a round: no event (a step takes well under a second, progress is reported every second) for 3 s
        wait_until(lambda: peer.running and time.time() - peer.events()[-1]["time"] > 3.0, 120,
                   "the peer to wait in an averaging round")  # fmt: skip
        # Execute
        peer.signal(signal.SIGINT)
        code = peer.wait_exit(10)
        # Assert
        assert code == 0, peer.tail()
        stopped = peer.wait_event("stopped", 1)
        assert stopped["adapter_dir"] and (peer.out / "adapter" / "adapter_model.safetensors").exists()
        assert json.loads((peer.out / "adapter" / "atlas.json").read_text())["epoch"] == stopped["epoch"]
        assert peer.wait_event("stopping", 1)["reason"] in ("SIGINT", "interrupted")
        # no traceback through our code (hivemind's DHT process may print one when it is stopped mid-request: README)
        assert "atlas_swarm/" not in peer.err_path.read_text(), peer.tail()
        gone, alive = psutil.wait_procs(children, timeout=5)
        assert not alive, f"left behind: {[(p.pid, p.name()) for p in alive]}"
        os.killpg(frozen.process.pid, signal.SIGCONT)


def test_ctrl_c_while_fetching_the_spec_stops_cleanly(tmp_path, text_data):
    """186506a: Ctrl-C before the spec was known ended in a traceback (an unbound ``spec`` after the watchdog's
    interrupt). A peer waiting for a run nobody publishes is stopped by Ctrl-C: "stopped", exit 0, no traceback."""
    # Prepare: a swarm (one DHT node) in which nobody publishes the run
    from atlas_swarm.identity import Identity
    from atlas_swarm.swarm import Swarm

    swarm = Swarm.join(Identity.load_or_create(tmp_path / "node.key"), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    peer = start_peer(tmp_path, "peer", ["--run", "nobody-0123456789abcdef", "--data", str(text_data),
                                         "--initial-peers", swarm.visible_maddrs()[-1], "--join-timeout", "60"])  # fmt: skip
    try:
        wait_until(lambda: any("p2pd" in c.name() for c in peer.descendants()), 60, "the peer's DHT to start")
        children = peer.descendants()
        # Execute
        peer.signal(signal.SIGINT)
        code = peer.wait_exit(10)
        # Assert
        assert code == 0, peer.tail()
        stopped = peer.wait_event("stopped", 1)
        assert stopped["run_id"] is None and stopped["adapter_dir"] is None and stopped["steps"] == 0
        assert "Traceback" not in peer.err_path.read_text(), peer.tail()
        gone, alive = psutil.wait_procs(children, timeout=5)
        assert not alive, f"left behind: {[(p.pid, p.name()) for p in alive]}"
    finally:
        peer.kill()
        swarm.shutdown()


def test_work_done_while_joining_that_fails_leaves_no_dht_process_or_p2pd(tmp_path):
    """Swarm.join runs ``while_joining`` (a peer's model imports) after forking the DHT process, before waiting for
    it: when that work fails (or Ctrl-C interrupts it), the DHT process and its p2pd are stopped, not left behind."""
    from atlas_swarm.identity import Identity
    from atlas_swarm.swarm import Swarm

    def ours() -> list[psutil.Process]:  # (torch's shared-memory manager, started once per process, is not)
        return [c for c in psutil.Process().children(recursive=True) if c.name() != "torch_shm_manager"]

    before = {c.pid for c in ours()}
    started = []

    def fails() -> None:
        started.extend(c for c in ours() if c.pid not in before)
        raise KeyboardInterrupt  # what the stop watchdog raises in the main thread

    with pytest.raises(KeyboardInterrupt):
        Swarm.join(Identity.load_or_create(tmp_path / "node.key"), host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                   while_joining=fails)  # fmt: skip
    assert started, "no DHT process was running while the work ran"
    gone, alive = psutil.wait_procs(started + [c for c in ours() if c.pid not in before], timeout=5)
    assert not alive, f"left behind: {[(p.pid, p.name()) for p in alive]}"
    key = str(tmp_path / "node.key")  # p2pd is started with it: none left anywhere (an orphan is not our child)
    assert not [p.pid for p in psutil.process_iter(["cmdline"]) if any(key in a for a in p.info["cmdline"] or ())]


def test_ctrl_c_in_a_terminal_stops_the_peer_and_its_p2pd_together_without_a_traceback(tmp_path, tiny_spec, text_data):
    """Ctrl-C in a terminal signals the whole foreground process group: the peer and its p2pd at once (found on a
    GPU, where bench_peer stops peers by group). p2pd could then be gone before the averagers removed their handlers
    from it, and each averager's thread printed a FileNotFoundError traceback. A training peer's group gets SIGINT:
    "stopped", exit 0, its adapter saved, no traceback, no process left."""
    # Prepare
    peer = start_peer(tmp_path, "peer", ["--run-spec", str(tiny_spec), "--data", str(text_data)])
    try:
        peer.wait_event("progress", 120)
        children = peer.descendants()
        assert any("p2pd" in c.name() for c in children), [c.name() for c in children]
        # Execute
        os.killpg(peer.process.pid, signal.SIGINT)
        code = peer.wait_exit(20)
        # Assert
        assert code == 0, peer.tail()
        assert peer.wait_event("stopped", 1)["adapter_dir"]
        # no traceback, and no error line: p2pd logged "error accepting connection: ... use of closed network
        # connection" as it stopped, an [ERROR] on the user's terminal in 11 of 13 runs of this test
        err = peer.err_path.read_text()
        assert "Traceback" not in err and "[ERROR]" not in err, peer.tail()
        gone, alive = psutil.wait_procs(children, timeout=5)
        assert not alive, f"left behind: {[(p.pid, p.name()) for p in alive]}"
    finally:
        peer.kill()


def test_a_peer_whose_averager_process_is_killed_stops_with_a_clear_error(tmp_path, tiny_spec, text_data):
    """The kernel's out-of-memory killer picks a peer's largest process: its averager, during a big aggregate. One
    killed in a state round held the lock on the averaged tensors, and the peer waited for it for ever (bench_averaging
    --as-7b: 1 of 4 peers hung after the others stopped; py-spy: MainThread in SemLock.__enter__). The peer now stops
    within seconds with one error line that says which process died and how, its adapter saved, nothing left."""
    # Prepare
    peer = start_peer(tmp_path, "peer", ["--run-spec", str(tiny_spec), "--data", str(text_data)])
    try:
        peer.wait_event("progress", 120)
        children = peer.descendants()
        pythons = [c for c in children if c.ppid() == peer.process.pid and "python" in c.name()]
        averagers = [c for c in pythons if not any("p2pd" in g.name() for g in c.children())]  # the DHT runs p2pd
        assert len(averagers) == 2, [(c.pid, c.name()) for c in pythons]
        # Execute
        averagers[-1].kill()
        code = peer.wait_exit(30)
        # Assert
        assert code == 2, peer.tail()
        error = peer.wait_event("error", 1)["error"]
        assert "averager process died (killed by SIGKILL" in error and "start it again" in error, error
        assert peer.events("saved") or (peer.out / "adapter").exists(), peer.tail()
        assert "Traceback" not in peer.err_path.read_text(), peer.tail()
        gone, alive = psutil.wait_procs(children, timeout=5)
        assert not alive, f"left behind: {[(p.pid, p.name()) for p in alive]}"
    finally:
        peer.kill()



def test_a_peer_whose_progress_tracker_thread_dies_stops_with_a_clear_error(tmp_path, tiny_spec, text_data):
    """A bug of ours ended the progress tracker's thread (a name missing in admission.py, 2026-12-06): the peer
    printed a traceback and trained on alone for the rest of the run, each epoch on its own samples, and exited 0.
    It now stops as when an averager process dies: one error line, the adapter saved, exit 2."""
    peer = start_peer(tmp_path, "peer", ["--run-spec", str(tiny_spec), "--data", str(text_data)], attack="tracker_bug")
    try:
        assert peer.wait_exit(90) == 2, peer.tail()
        error = peer.wait_event("error", 1)["error"]
        assert "progress tracker thread died (RuntimeError: a bug in the progress rule)" in error, error
        assert "Traceback" not in peer.err_path.read_text(), peer.tail()
        assert (peer.out / "adapter").exists(), peer.tail()
    finally:
        peer.kill()

def test_saved_adapter_loads_with_stock_peft_and_gives_the_same_logits(tmp_path, tiny_spec, text_data):
    # Prepare
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from atlas_swarm.config import RunSpec
    from atlas_swarm.model.lora import load_adapter_weights, load_model

    peer = start_peer(tmp_path, "peer", ["--run-spec", str(tiny_spec), "--data", str(text_data), "--max-steps", "12"])
    try:
        assert peer.wait_exit(120) == 0, peer.tail()
    finally:
        peer.kill()
    ours, tokenizer = load_model(RunSpec.from_toml(tiny_spec))
    load_adapter_weights(ours, peer.out / "adapter")
    # Execute
    base_path = RunSpec.from_toml(tiny_spec).model.base
    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(peer.out / "adapter"))
    plain = AutoModelForCausalLM.from_pretrained(base_path)
    ids = tokenizer(["what is a computer"], return_tensors="pt")
    # Assert
    ours.eval(), stock.eval(), plain.eval()
    with torch.no_grad():
        assert torch.allclose(ours(**ids).logits, stock(**ids).logits, atol=1e-6)
        assert not torch.allclose(stock(**ids).logits, plain(**ids).logits, atol=1e-4), "the adapter changed nothing"

