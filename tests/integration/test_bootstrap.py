"""Bootstrap nodes as their maintainers run them (`python -m atlas_swarm.bootstrap`, separate processes): a stable
PeerID across restarts, peers joining through the printed multiaddr, two nodes forming one mesh, /metrics that match
a 2-peer run, /health that turns 503 when the DHT dies, and the dashboard rendered by headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from atlas_swarm.config import RunSpec
from tests.conftest import write_spec
from tests.peers import http_get, kill_session, killed_at_exit, scrape, start_peer, wait_until

pytestmark = pytest.mark.integration
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


class Bootstrap:
    def __init__(self, workdir: Path, name: str, *args: str):
        self.out = workdir / name
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = self.out / "stdout.txt"
        cmd = [sys.executable, "-m", "atlas_swarm.bootstrap", "--identity", str(self.out / "identity.key"),
               "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--http", "127.0.0.1:0", "--poll-interval", "1", *args]  # fmt: skip
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)  # fmt: skip
        self.maddr, self.url, self.peer_id = self._banner(90)

    def _banner(self, timeout: float):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text()
            url = re.search(r"monitor: (http://127\.0\.0\.1:\d+)/", text)
            maddr = re.search(r"^(/ip4/127\.0\.0\.1/tcp/\d+/p2p/(\w+))$", text, re.M)
            if url and maddr:
                return maddr.group(1), url.group(1), maddr.group(2)
            if self.proc.poll() is not None:
                raise AssertionError(f"bootstrap exited {self.proc.returncode}:\n{text}")
            time.sleep(0.2)
        raise AssertionError(f"no banner within {timeout} s:\n{self.log.read_text()}")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def kill(self) -> None:
        kill_session(self.proc)








def test_same_peer_id_after_restart_and_a_peer_trains_through_it(tmp_path, tiny_spec, text_data):
    nodes = []
    with killed_at_exit([]) as peers:
        try:
            # the shipped example config, with the machine-specific values overridden by flags (flags win)
            example = Path(__file__).resolve().parents[2] / "bootstrap" / "bootstrap.toml"
            first = Bootstrap(tmp_path, "boot", "--config", str(example), "--announce-maddrs")
            nodes.append(first)
            assert oct((first.out / "identity.key").stat().st_mode & 0o777) == "0o600"
            assert "relay: ON" in first.log.read_text()
            assert first.stop() == 0
            again = Bootstrap(tmp_path, "boot")
            nodes.append(again)
            assert again.peer_id == first.peer_id

            peer = start_peer(tmp_path, "peer", ["--initial-peers", again.maddr, "--run-spec", str(tiny_spec),
                                                  "--data", str(text_data), "--batch-size", "4", "--max-epochs", "2"])  # fmt: skip
            peers.append(peer)
            assert peer.wait_exit(180) == 0, peer.tail()
            assert peer.events("epoch"), peer.tail()
        finally:
            for n in nodes:
                n.kill()


def test_two_node_mesh_metrics_health_and_dashboard(tmp_path, tiny_model, text_data):
    tiny_spec = write_spec(tmp_path / "spec.toml", str(tiny_model), target_batch_size=960)  # epochs of a few s
    nodes = []
    with killed_at_exit([]) as peers:
        try:
            a = Bootstrap(tmp_path, "a")
            nodes.append(a)
            b = Bootstrap(tmp_path, "b", "--initial-peers", a.maddr)
            nodes.append(b)
            # two peers that know only node A; node B's monitor must see them. 10 epochs (~3 s each): the dashboard
            # is rendered once both are at epoch 2, and a peer that has left is no longer listed; with 6 epochs both
            # had left before a loaded full suite's Chromium fetched the state, and the DOM named one of them
            first = start_peer(tmp_path, "p0", ["--initial-peers", a.maddr, "--run-spec", str(tiny_spec), "--data",
                                                 str(text_data), "--batch-size", "4", "--max-epochs", "10",
                                                 "--wait-for-peers", "2", "--join-timeout", "90"])  # fmt: skip
            peers.append(first)
            run_id = RunSpec.from_toml(tiny_spec).run_id  # the second starts at once: it finds the spec when p0 is up
            peers.append(start_peer(tmp_path, "p1", ["--initial-peers", a.maddr, "--run", run_id, "--data",
                                                      str(text_data), "--batch-size", "8", "--seed", "1",
                                                      "--max-epochs", "10", "--wait-for-peers", "2",
                                                      "--join-timeout", "90"]))  # fmt: skip

            def two_peers_at_epoch_2():
                m = scrape(b.url)
                ok = m.get(("atlas_run_peers", (("run", run_id),))) == 2 and \
                    m.get(("atlas_run_epoch", (("run", run_id),)), 0) >= 2
                return m if ok else None

            m = wait_until(two_peers_at_epoch_2, 150, "node B to see 2 peers at epoch >= 2")
            state = json.loads(http_get(b.url + "/api/state")[1])
            shot = screenshot(b.url, tmp_path)
            codes = [p.wait_exit(240) for p in peers]
            assert codes == [0, 0], "\n\n".join(p.tail() for p in peers)

            # the metrics match the swarm: the run, its target, each peer's own numbers (never ahead of the peer)
            assert m[("atlas_run_target_samples", (("run", run_id),))] == 960
            final = {p.wait_event("started", 1)["peer_id"]: p.wait_event("stopped", 1) for p in peers}
            for pid, stopped in final.items():
                labels = (("client_mode", "false"), ("device", "cpu"), ("peer", pid), ("run", run_id))
                samples = m[("atlas_peer_samples", labels)]
                assert 0 < samples <= stopped["samples_total"]
                assert 0 <= m[("atlas_peer_epoch", labels)] <= stopped["epoch"]
                rounds = m[("atlas_peer_averaging_rounds_total", tuple(sorted(labels + (("result", "averaged"),))))]
                assert rounds <= stopped["epoch"]
            # the dashboard showed both peers and drew the plots (rendered DOM from headless Chromium)
            run_section = next(r for r in state["runs"] if r["run_id"] == run_id)
            assert len(run_section["history"]) >= 2
            dom = shot["dom"]
            for p in peers:  # a missing peer that had stopped before the DOM was dumped: the test's timing
                pid, left = p.wait_event("started", 1)["peer_id"], p.wait_event("stopping", 1)["time"]
                assert f'data-peer="{pid}"' in dom, f"peer not on the dashboard (stopped {left - shot['at']:+.1f} s)"
            assert dom.count('class="series"') >= 3 and "healthy" in dom
            assert shot["png"].stat().st_size > 10_000

            # the DHT of node B dies: /health turns 503 with the reason
            assert http_get(b.url + "/health")[0] == 200
            dht_children = [c for c in psutil.Process(b.proc.pid).children() if "python" in c.name()]
            for c in dht_children:
                c.kill()
            code, body = wait_until(lambda: (lambda r: r if r[0] == 503 else None)(http_get(b.url + "/health")), 30,
                                    "/health to turn 503")  # fmt: skip
            assert "DHT" in json.loads(body)["reason"]
        finally:
            for n in nodes:
                n.kill()


def screenshot(url: str, tmp_path: Path) -> dict:
    """Render the dashboard in headless Chromium: the DOM after its scripts ran, and a PNG kept in test-artifacts/."""
    chromium = shutil.which("chromium")
    assert chromium, "chromium is needed (scripts/system_deps.sh installs it)"
    common = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=4000",
              f"--user-data-dir={tmp_path / 'chromium-profile'}"]  # fmt: skip
    dom = subprocess.run([*common, "--dump-dom", url + "/"], capture_output=True, text=True, timeout=120).stdout
    at = time.time()  # when the DOM was dumped
    ARTIFACTS.mkdir(exist_ok=True)
    png = ARTIFACTS / "dashboard.png"
    png.unlink(missing_ok=True)
    subprocess.run([*common, f"--screenshot={png}", "--window-size=1400,1000", url + "/"], capture_output=True,
                   timeout=120)  # fmt: skip
    assert png.exists(), "chromium wrote no screenshot"
    return {"dom": dom, "png": png, "at": at}
