"""``Run.contribute()``: this machine trains as a peer of the run, in a separate OS process running
``python -m atlas_swarm.peer`` (exactly what a hobbyist runs), so the notebook kernel stays responsive and a crash
or a stop in one cannot take the other down. Its JSON events are read back from a file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from atlas_swarm.errors import ConfigError, DataError

STOP_TIMEOUT = 15.0  # the peer promises to exit within 10 s of SIGTERM


def write_data(data, folder: Path) -> str:
    """A path is used as is; a list of strings or {"text", "label"} dicts is written to a .jsonl file first."""
    if isinstance(data, (str, os.PathLike)):
        return str(data)
    if not isinstance(data, (list, tuple)) or not data:
        raise DataError("contribute(data=...) takes a file path, 'builtin:NAME', or a non-empty list of strings or "
                        "{'text': ..., 'label': ...} dicts.")  # fmt: skip
    rows = [{"text": row} if isinstance(row, str) else row for row in data]
    if not all(isinstance(r, dict) and isinstance(r.get("text"), str) for r in rows):
        raise DataError("Every row of contribute(data=[...]) must be a string or a dict with a 'text' string.")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


class Contribution:
    """One background peer. ``events()`` reads what it reported; ``stop()`` asks it to save and leave."""

    def __init__(self, args: Sequence[str], out: Path):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_path, self.err_path = self.out / "events.jsonl", self.out / "stderr.txt"
        cmd = [sys.executable, "-m", "atlas_swarm.peer", "--log-format", "json", "--out", str(self.out), *args]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(cmd, stdout=self.log_path.open("w"), stderr=self.err_path.open("w"),
                                        start_new_session=True, env=env)  # fmt: skip

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def events(self, kind: Optional[str] = None) -> list[dict]:
        out = []
        for text in self.log_path.read_text().splitlines():
            try:
                event = json.loads(text)
            except ValueError:
                continue
            if isinstance(event, dict) and (kind is None or event.get("event") == kind):
                out.append(event)
        return out

    def error(self) -> Optional[str]:
        """The peer's own error message if it exited with one."""
        errors = self.events("error")
        if errors:
            return errors[-1].get("error")
        if self.process.poll() not in (None, 0):
            return self.err_path.read_text()[-2000:] or f"exit status {self.process.returncode}"
        return None

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        if self.running:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


def peer_args(run_id: str, initial_peers: Sequence[str], data: str, batch_size: Optional[int],
              max_epochs: Optional[int], publish_every: int, base_model: Optional[str], threads: Optional[int],
              extra: Sequence[str]) -> list[str]:  # fmt: skip
    if not initial_peers:
        raise ConfigError("contribute() needs the run's swarm: call run.launch() or Run.attach(...) first.")
    args = ["--run", run_id, "--initial-peers", *initial_peers, "--data", data, "--publish-every", str(publish_every),
            "--host-maddrs", "/ip4/127.0.0.1/tcp/0" if all("/127.0.0.1/" in a for a in initial_peers)
            else "/ip4/0.0.0.0/tcp/0"]  # fmt: skip
    for flag, value in (("--batch-size", batch_size), ("--max-epochs", max_epochs), ("--base-model", base_model),
                        ("--threads", threads)):  # fmt: skip
        if value is not None:
            args += [flag, str(value)]
    return args + list(extra)
