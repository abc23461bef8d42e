"""The monitor on real DHT nodes in this process: it counts (never crashes on) records with a bad signature, a
schema violation or forged content; its /metrics parse with Prometheus' own parser; /health turns 503 when the
DHT is down."""

from __future__ import annotations

import json
import time

import hivemind
import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from atlas_swarm.identity import Identity
from atlas_swarm.monitor import Monitor
from atlas_swarm.monitor.http import serve
from atlas_swarm.swarm import PeerStatus, Swarm
from tests.doubles import FakeSwarm
from tests.peers import http_get, scrape

pytestmark = pytest.mark.integration
RUN = "watched-0123456789abcdef"


def status(peer_id: str, **kw) -> PeerStatus:
    fields = dict(peer_id=peer_id, device="cpu", precision="fp32", client_mode=False, adapter_shapes="x", epoch=3,
                  samples_total=96, samples_per_second=12.5, loss=1.25, time=time.time(), rounds_averaged=2,
                  rounds_failed=1, receipts_posted=2, receipts_pending=1, rewards_eth=0.5, refused=3, outliers=2)  # fmt: skip
    fields.update(kw)
    return PeerStatus(**fields)






def test_monitor_counts_bad_records_and_reports_health(tmp_path):
    swarms, raws = [], []
    monitor_swarm = Swarm.join(Identity.load_or_create(tmp_path / "mon"), [], ["/ip4/127.0.0.1/tcp/0"], audit=True)
    swarms.append(monitor_swarm)
    monitor = Monitor(monitor_swarm, interval=0.5, runs=(RUN,))
    server = None
    try:
        monitor.poll_once()  # knows the run's schema from now on
        maddrs = monitor_swarm.visible_maddrs()
        honest = Swarm.join(Identity.load_or_create(tmp_path / "honest"), maddrs, ["/ip4/127.0.0.1/tcp/0"])
        liar = Swarm.join(Identity.load_or_create(tmp_path / "liar"), maddrs, ["/ip4/127.0.0.1/tcp/0"])
        swarms += [honest, liar]
        honest.publish_status(RUN, status(honest.peer_id), wait=True)
        honest.announce_run(RUN)
        # forged: correctly signed by the liar, but naming the honest peer
        liar.publish_status(RUN, status(honest.peer_id, samples_total=10**6), wait=True)
        # schema violation: signed, but not a PeerStatus (a node without our schema sends it)
        key = RSAPrivateKey()
        signer = RSASignatureValidator(key)
        raw = hivemind.DHT(initial_peers=maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=[signer],
                           start=True)  # fmt: skip
        raws.append(raw)
        raw.store(f"{RUN}_peers", subkey=signer.local_public_key, value={"bogus": True},
                  expiration_time=get_dht_time() + 60)  # fmt: skip
        # bad signature: claims an owner key but carries no signature
        unsigned = hivemind.DHT(initial_peers=maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
        raws.append(unsigned)
        unsigned.store(f"{RUN}_peers", subkey=signer.local_public_key, value={"peer_id": "x"},
                       expiration_time=get_dht_time() + 60)  # fmt: skip
        unsigned.store("atlas_runs", subkey=b"[owner:" + key.get_public_key().to_bytes() + b"]", value=b"junk",
                       expiration_time=get_dht_time() + 60)  # fmt: skip

        monitor.start()
        server = serve(monitor, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.server_address[1]}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            m = scrape(url)
            rejected = {r: m.get(("atlas_dht_records_rejected_total", (("reason", r),)), 0) for r in
                        ("signature", "schema", "forged")}  # fmt: skip
            if all(rejected.values()) and m.get(("atlas_run_peers", (("run", RUN),))) == 1:
                break
            time.sleep(0.3)
        assert all(v >= 1 for v in rejected.values()), rejected
        # only the honest record counts, with its own values
        labels = (("client_mode", "false"), ("device", "cpu"), ("peer", honest.peer_id), ("run", RUN))
        assert m[("atlas_run_peers", (("run", RUN),))] == 1
        assert m[("atlas_peer_samples", labels)] == 96
        assert m[("atlas_peer_samples_per_second", labels)] == 12.5
        assert m[("atlas_peer_averaging_rounds_total", tuple(sorted(labels + (("result", "failed"),))))] == 1
        assert m[("atlas_peer_receipts", tuple(sorted(labels + (("state", "posted"),))))] == 2
        # what the peer refused and whose updates it clipped: the Byzantine-averaging counts, per peer
        assert m[("atlas_peer_refused_total", labels)] == 3 and m[("atlas_peer_outliers_total", labels)] == 2
        assert m[("atlas_monitor_up", ())] == 1
        code, body = http_get(url + "/health")
        assert code == 200 and json.loads(body)["status"] == "ok"
        state = json.loads(http_get(url + "/api/state")[1])
        assert [p["peer_id"] for p in state["runs"][0]["peers"]] == [honest.peer_id]

        # the DHT goes down: /health says so
        monitor_swarm.dht.shutdown()
        code, body = http_get(url + "/health")
        assert code == 503 and "DHT" in json.loads(body)["reason"]
    finally:
        if server is not None:
            server.shutdown()
        monitor.stop() if monitor._thread.is_alive() else None
        for d in raws:
            d.shutdown()
        for s in swarms:
            s.shutdown()


def test_history_is_bounded(tmp_path, monkeypatch):
    import atlas_swarm.monitor.state as state

    monkeypatch.setattr(state, "MAX_RUNS", 3)

    fake = FakeSwarm(statuses={"QmA": status("QmA")}, progress=[{"epoch": 3, "samples_accumulated": 7}])
    monitor = Monitor(fake)
    for i in range(state.HISTORY + 50):
        fake.runs = {f"run{i % 5}-0123456789abcdef"}
        monitor.poll_once()
    assert len(monitor.runs) == 3
    assert all(len(v.history) <= state.HISTORY for v in monitor.runs.values())
    fake.runs = {"run0-0123456789abcdef"}
    for _ in range(state.HISTORY + 10):
        monitor.poll_once()
    assert len(monitor.runs["run0-0123456789abcdef"].history) == state.HISTORY
    assert monitor.snapshot()["runs"][0]["samples"] == 7


class FloodedSwarm(FakeSwarm):
    """FakeSwarm over a table of runs, each DHT read taking ``latency`` s as on a busy node (the monitor's
    scheduling, not the DHT, is under test)."""

    def __init__(self, runs: dict[str, tuple[int, int]], latency: float = 0.05, junk: frozenset = frozenset()):
        super().__init__()
        self.runs, self.latency, self.junk = runs, latency, junk  # run -> (announcers, live peers)
        self.spec_fetches = 0

    def announcers(self):
        return {r: a for r, (a, _) in self.runs.items()}

    def fetch_spec(self, run_id, timeout):
        from atlas_swarm.config import RunSpec

        self.spec_fetches += 1
        time.sleep(self.latency)
        return RunSpec.from_dict({"name": run_id.rsplit("-", 1)[0], "model": {"base": "m", "task": "causal-lm"},
                                  "lora": {"target_modules": ["q"]}})  # fmt: skip

    def peer_statuses(self, run_id):
        time.sleep(self.latency)
        if run_id in self.junk:
            raise RecursionError("maximum recursion depth exceeded")  # whatever a junk record may still cause
        return {f"Qm{run_id}{i}": status(f"Qm{run_id}{i}") for i in range(self.runs[run_id][1])}

    def training_progress(self, run_id):
        time.sleep(self.latency)
        return [{"epoch": 3, "samples_accumulated": 7}] if self.runs[run_id][1] else []


def test_a_flood_of_announced_runs_keeps_the_live_run_and_health_green():
    """M3 / issue 16 item 13: on 186506a a poll read 256 runs one after another (10-15 s, /health 503), the 64 runs
    kept were whichever came last, and one run's junk failed the whole poll."""
    live = "live-run-0123456789abcdef"
    runs = {f"bogus{i:03d}-0123456789abcdef": (1, 1) for i in range(256)}  # one Sybil key, one status each
    runs[live] = (3, 3)  # three peers announce it and train
    junk = frozenset(f"bogus{i:03d}-0123456789abcdef" for i in range(0, 256, 7))
    fake = FloodedSwarm(runs, junk=junk)
    monitor = Monitor(fake, interval=5.0)
    try:
        t0 = time.monotonic()
        monitor.poll_once()
        assert time.monotonic() - t0 < 6.0, "a poll is bounded in time (/health turns red after 3 x interval)"
        assert monitor.health() == (True, "ok") and monitor.polls["error"] == 0
        for _ in range(2):
            monitor.poll_once()
        assert live in monitor.runs and len(monitor.runs[live].peers) == 3, "the live run stays"
        assert len(monitor.runs) <= state_module().MAX_RUNS
        assert monitor.polls["run_errors"] >= 1, "junk runs are counted, not fatal"
        assert len(monitor._specs) <= state_module().MAX_RUNS, "the spec cache holds only shown runs"
        assert fake.forgotten, "runs read but not shown leave the DHT's validators"
    finally:
        monitor.stop()


def test_a_run_without_a_spec_is_not_asked_for_it_every_poll(monkeypatch):
    fake = FloodedSwarm({"nospec-0123456789abcdef": (1, 1)}, latency=0.0)

    def missing(run_id, timeout):
        from atlas_swarm.errors import RunNotFound

        fake.spec_fetches += 1
        raise RunNotFound(run_id)

    monkeypatch.setattr(fake, "fetch_spec", missing)
    monitor = Monitor(fake)
    try:
        for _ in range(10):
            monitor.poll_once()
        assert fake.spec_fetches == 1
    finally:
        monitor.stop()


def state_module():
    import atlas_swarm.monitor.state as state

    return state
