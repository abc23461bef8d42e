"""Run `python -m atlas_swarm.peer` as separate OS processes and read their JSON events (test helper)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

import psutil

POLL = 0.2


class PeerProcess:
    def __init__(self, workdir: Path, name: str, args: list[str], threads: int = 1):
        self.name = name
        self.out = workdir / name
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out / "events.jsonl"
        self.err_path = self.out / "stderr.txt"
        cmd = [sys.executable, "-m", "atlas_swarm.peer", "--log-format", "json", "--out", str(self.out),
               "--threads", str(threads), "--host-maddrs", "/ip4/127.0.0.1/tcp/0", *args]  # fmt: skip
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        self.proc = subprocess.Popen(cmd, stdout=self.log_path.open("w"), stderr=self.err_path.open("w"),
                                     start_new_session=True, env=env)  # fmt: skip
        self._pgid = self.proc.pid

    def events(self, kind: Optional[str] = None) -> list[dict]:
        out = []
        for line in self.log_path.read_text().splitlines():
            if line.startswith("{"):
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if kind is None or event.get("event") == kind:
                    out.append(event)
        return out

    def wait_event(self, kind: str, timeout: float, pred: Callable[[dict], bool] = lambda e: True) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events(kind):
                if pred(event):
                    return event
            if self.proc.poll() is not None:
                for event in self.events(kind):  # the last lines may have landed just before exit
                    if pred(event):
                        return event
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}) before '{kind}':\n{self.tail()}")
            time.sleep(POLL)
        raise AssertionError(f"{self.name}: no '{kind}' event within {timeout} s:\n{self.tail()}")

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not exit within {timeout} s:\n{self.tail()}") from None

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill_group(self) -> None:
        """SIGKILL the peer and everything it started (its own session): DHT, averagers, p2pd."""
        try:
            os.killpg(self._pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def tail(self, n: int = 25) -> str:
        lines = self.log_path.read_text().splitlines()[-n:] + ["--- stderr ---"] + self.err_path.read_text().splitlines()[-n:]
        return "\n".join(lines)


def first_maddr(started: dict) -> str:
    return next(a for a in started["maddrs"] if "/127.0.0.1/" in a)


@contextmanager
def killed_at_exit(peers: list[PeerProcess]):
    """Whatever happens in the block, SIGKILL every peer in ``peers`` (the list may grow inside the block)."""
    try:
        yield peers
    finally:
        for p in peers:
            p.kill_group()


def wait_until(cond: Callable[[], object], timeout: float, what: str, poll: float = 0.3):
    """Poll ``cond`` until it returns something truthy (returned), or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def http_get(url: str) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def scrape(base_url: str) -> dict[tuple, float]:
    """/metrics parsed by Prometheus' own parser: {(sample name, sorted label items): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(http_get(base_url + "/metrics")[1].decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out
