"""A stranger's records: a hostile DHT node (its own key, its own DHT process and p2pd; tests/attacks.py) stores what
our schemas would never write. Each test failed on 186506a (shared/reviews/security-186506a.md H4, H5, M1)."""

from __future__ import annotations

import json
import time

import pytest

from atlas_swarm.config import RunSpec
from atlas_swarm.identity import Identity
from atlas_swarm.monitor import Monitor
from atlas_swarm.monitor.http import serve
from atlas_swarm.swarm import PeerStatus, Swarm
from tests.attacks import HostileNode
from tests.integration.test_bad_input import run_peer
from tests.peers import http_get

pytestmark = pytest.mark.integration
JUNK = "junk-0123456789abcdef"


def honest_status(swarm: Swarm, **kw) -> PeerStatus:
    fields = dict(peer_id=swarm.peer_id, device="cpu", precision="fp32", client_mode=False, adapter_shapes="x",
                  epoch=3, samples_total=96, samples_per_second=12.5, loss=1.25, time=time.time())  # fmt: skip
    fields.update(kw)
    return PeerStatus(**fields)


@pytest.fixture
def swarm_with_attacker(tmp_path, tiny_spec):
    """An honest node that publishes a real run's spec and status, a monitor node, and a hostile node."""
    honest = Swarm.join(Identity.load_or_create(tmp_path / "honest.key"), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    nodes = [honest]
    try:
        maddrs = honest.visible_maddrs()
        watcher = Swarm.join(Identity.load_or_create(tmp_path / "mon.key"), maddrs, ["/ip4/127.0.0.1/tcp/0"],
                             audit=True)  # fmt: skip
        nodes.append(watcher)
        attacker = HostileNode(maddrs)
        nodes.append(attacker)
        spec = RunSpec.from_toml(tiny_spec)
        honest.publish_spec(spec)
        honest.announce_run(spec.run_id)
        yield honest, watcher, attacker, spec
    finally:
        for node in nodes:
            node.shutdown()


def strict_json(body: bytes):
    def refuse(constant):
        raise ValueError(f"invalid JSON constant {constant}")

    return json.loads(body, parse_constant=refuse)


def test_a_junk_spec_costs_nothing_but_its_own_run(capsys, tmp_path, text_data, swarm_with_attacker):
    """H4: a spec record of nested brackets raised RecursionError, failing every monitor poll and crashing joiners."""
    honest, watcher, attacker, spec = swarm_with_attacker
    attacker.announce_junk_run(JUNK, b"[" * 8_000)  # within the record schema: our parser must refuse it
    honest.publish_status(spec.run_id, honest_status(honest), wait=True)
    monitor = Monitor(watcher, interval=0.5)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (JUNK not in watcher.announced_runs() or spec.run_id not in monitor.runs):
            monitor.poll_once()
            time.sleep(0.3)
    finally:
        monitor.stop()
    assert JUNK in watcher.announced_runs(), "the attacker's announcement arrived"
    assert monitor.polls["error"] == 0 and monitor.health() == (True, "ok"), "no poll failed"
    assert spec.run_id in monitor.runs and monitor.runs[spec.run_id].name == "tiny-test", "the real run is shown"

    code, err = run_peer(capsys, "--initial-peers", honest.visible_maddrs()[0], "--run", JUNK, "--join-timeout", "4",
                         "--data", str(text_data), "--out", str(tmp_path / "joiner"))  # fmt: skip
    assert code == 2 and err["kind"] == "RunNotFound", "a clear error, not a traceback"


def test_nan_and_infinity_in_a_status_are_refused_and_the_dashboard_stays_json(swarm_with_attacker):
    """M1: NaN in a status float made /api/state invalid JSON (the dashboard went blank)."""
    honest, watcher, attacker, spec = swarm_with_attacker
    monitor = Monitor(watcher, interval=0.5, runs=(spec.run_id,))
    monitor.poll_once()  # the monitor knows the run's schema from now on
    honest.publish_status(spec.run_id, honest_status(honest, loss=None, loss_nonfinite=True), wait=True)
    attacker.status(spec.run_id, loss=float("nan"), samples_per_second=float("inf"), time=time.time())
    server = serve(monitor, "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            monitor.poll_once()
            if watcher.rejected_records().get("schema") and spec.run_id in monitor.runs:
                break
            time.sleep(0.3)
        assert watcher.rejected_records()["schema"] >= 1, "the NaN record was refused by the schema"
        state = strict_json(http_get(url + "/api/state")[1])
        (run,) = [r for r in state["runs"] if r["run_id"] == spec.run_id]
        assert [p["peer_id"] for p in run["peers"]] == [honest.peer_id], "only the honest peer counts"
        assert run["peers"][0]["loss"] is None, "an honest NaN loss is shown as no loss"
    finally:
        server.shutdown()
        monitor.stop()


def test_a_forged_minority_status_does_not_keep_a_newcomer_out(capsys, tmp_path, text_data, swarm_with_attacker):
    """H5: one status record with other adapter shapes made every joiner exit 2."""
    from atlas_swarm.model.hashing import shapes_hash
    from atlas_swarm.model.lora import adapter_parameters, load_model

    honest, _, attacker, spec = swarm_with_attacker
    model, _ = load_model(spec, None, "cpu")
    shapes = shapes_hash(dict(adapter_parameters(model)))
    honest.publish_status(spec.run_id, honest_status(honest, adapter_shapes=shapes), wait=True)
    third = Swarm.join(Identity.load_or_create(tmp_path / "third.key"), honest.visible_maddrs(),
                       ["/ip4/127.0.0.1/tcp/0"])  # fmt: skip
    try:
        third.publish_status(spec.run_id, honest_status(third, adapter_shapes=shapes), wait=True)
        # (at epoch 3 like the others: one at the joiner's last epoch without a final hash held its exit in the final
        # vote for the vote's whole wait, 30 s of this test's 32)
        assert attacker.status(spec.run_id, adapter_shapes="0000000000000000", epoch=3, time=time.time())
        deadline = time.monotonic() + 20
        while len(honest.peer_statuses(spec.run_id)) < 3 and time.monotonic() < deadline:
            time.sleep(0.3)
        assert len(honest.peer_statuses(spec.run_id)) == 3, "the forged status is visible to everyone"
        code, err = run_peer(capsys, "--initial-peers", honest.visible_maddrs()[0], "--run", spec.run_id,
                             "--max-epochs", "1", "--data", str(text_data), "--out", str(tmp_path / "joiner"))  # fmt: skip
        assert err.get("kind") != "ModelError" and code == 0, err
    finally:
        third.shutdown()


def test_a_record_too_large_for_the_dht_fails_fast(tmp_path):
    """Item 14: with another node to send to, hivemind's DHT process drops a ~200 kB store (BlockingIOError on its
    pipe) and the caller's future never resolves, so a blocking store of such a record hung on 186506a."""
    from atlas_swarm.errors import SwarmError

    first = Swarm.join(Identity.load_or_create(tmp_path / "first.key"), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    swarm = None
    try:
        swarm = Swarm.join(Identity.load_or_create(tmp_path / "me.key"), first.visible_maddrs(),
                           ["/ip4/127.0.0.1/tcp/0"])  # fmt: skip
        key = "tiny-test-0123456789abcdef_wallets"
        t0 = time.monotonic()
        for size in (200_000, 30_000):  # both killed hivemind's DHT process when sent to it
            with pytest.raises(SwarmError, match="over the 8192-byte limit"):
                swarm._store(key, {"blob": b"\0" * size}, 60, True, "a big record")
        assert time.monotonic() - t0 < 1.0
        for _ in range(20):  # just under the limit: stored, and the DHT process lives on
            swarm._store(key, {"blob": b"\0" * 8_000}, 60, True, "a record under the limit")
        assert swarm.dht.is_alive()
    finally:
        if swarm is not None:
            swarm.shutdown()
        first.shutdown()
