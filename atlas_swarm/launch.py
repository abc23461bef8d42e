"""``python -m atlas_swarm.peer`` as a separate OS process whose JSON events are read back from a file: the one
launcher of peer processes for the notebook (``Run.contribute``), the scripts (demo, benchmarks, GPU check) and the
tests. A peer gets its own session (process group), so stopping it stops its DHT, averagers and p2pd too."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import psutil

POLL = 0.2
STOP_TIMEOUT = 15.0  # a peer promises to exit within 10 s of SIGTERM


class PeerFailed(AssertionError):
    """The peer exited, or did not report, before what was waited for. (An AssertionError so that a test waiting
    for an event fails as a test failure with the peer's last lines.)"""


class PeerProcess:
    def __init__(self, out: str | Path, args: Sequence[str], threads: Optional[int] = None, name: Optional[str] = None,
                 env: Optional[dict] = None, module: str = "atlas_swarm.peer", netns: Optional[str] = None):  # fmt: skip
        """``module``: what runs (the peer; the adversarial tests run it with an attack patched in). ``netns``: in
        that network namespace (``ip netns exec``; devnet/netns.py's hosts)."""
        self.out = Path(out)
        self.name = name or self.out.name
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_path, self.err_path = self.out / "events.jsonl", self.out / "stderr.txt"
        cmd = [sys.executable, "-m", module, "--log-format", "json", "--out", str(self.out),
               *(["--threads", str(threads)] if threads else []), *args]  # fmt: skip
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]  # exec()s the command: the same process (and group)
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.process = subprocess.Popen(cmd, stdout=self.log_path.open("w"), stderr=self.err_path.open("w"),
                                        start_new_session=True, env=env)  # fmt: skip

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def events(self, kind: Optional[str] = None) -> list[dict]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and (kind is None or event.get("event") == kind):
                out.append(event)
        return out

    def wait_event(self, kind: str, timeout: float, pred: Callable[[dict], bool] = lambda e: True) -> dict:
        """The first ``kind`` event that satisfies ``pred``; PeerFailed if the peer exits or ``timeout`` s pass."""
        deadline = time.monotonic() + timeout
        while True:
            exited = not self.running
            found = next((e for e in self.events(kind) if pred(e)), None)  # read after the exit check: last lines
            if found is not None:
                return found
            if exited:
                raise PeerFailed(f"{self.name} exited ({self.process.returncode}) before '{kind}':\n{self.tail()}")
            if time.monotonic() >= deadline:
                raise PeerFailed(f"{self.name}: no '{kind}' event within {timeout} s:\n{self.tail()}")
            time.sleep(POLL)

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise PeerFailed(f"{self.name} did not exit within {timeout} s:\n{self.tail()}") from None

    def error(self) -> Optional[str]:
        """The peer's own error message if it exited with one."""
        errors = self.events("error")
        if errors:
            return errors[-1].get("error")
        if self.process.poll() not in (None, 0):
            return self.err_path.read_text()[-2000:] or f"exit status {self.process.returncode}"
        return None

    def signal(self, sig: int) -> None:
        if self.running:
            self.process.send_signal(sig)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM (the peer saves and leaves); SIGKILL to its whole group if it has not exited after ``timeout``."""
        self.signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the peer and everything it started (its own session): DHT, averagers, p2pd."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def tail(self, n: int = 25) -> str:
        lines = self.log_path.read_text().splitlines()[-n:] + ["--- stderr ---"] + self.err_path.read_text().splitlines()[-n:]
        return "\n".join(lines)


def first_loopback(started: dict) -> str:
    """The loopback multiaddr in a peer's ``started`` event."""
    return next(a for a in started["maddrs"] if "/127.0.0.1/" in a)
