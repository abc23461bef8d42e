"""What the peer shows its user: a live rich progress bar, plain log lines, or one JSON object per event (for scripts).

Every event goes through ``Reporter.event(kind, **fields)``; ``progress`` updates are throttled to one per second.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any, Optional

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

PROGRESS_EVERY = 1.0


class Reporter:
    def __init__(self, fmt: str = "rich", stream=None):
        self.fmt = fmt
        self.stream = stream or sys.stdout
        self._last_progress = 0.0
        self._lock = threading.RLock()
        self._progress: Optional[Progress] = None
        self._task = None
        if fmt == "rich":
            self.console = Console(file=self.stream)
        else:
            self.console = None

    def event(self, kind: str, message: str = "", /, **fields: Any) -> None:
        with self._lock:  # the chain's poster thread reports too
            self._event(kind, message, **fields)

    def _event(self, kind: str, message: str = "", /, **fields: Any) -> None:
        if self.fmt == "json":
            self.stream.write(json.dumps({"event": kind, "time": round(time.time(), 3), **fields}, default=str) + "\n")
            self.stream.flush()
            return
        if not message:
            return
        if self.console is not None:
            self.console.print(message, highlight=False, markup=False, soft_wrap=True)
        else:
            self.stream.write(message + "\n")
            self.stream.flush()

    def progress(self, force: bool = False, **state: Any) -> None:
        """state: epoch, swarm_samples, target, peers, loss, samples_per_second, local_samples."""
        now = time.monotonic()
        if not force and now - self._last_progress < PROGRESS_EVERY:
            return
        self._last_progress = now
        if self.fmt == "json":
            self.event("progress", **state)
            return
        loss = "-" if state.get("loss") is None else f"{state['loss']:.4f}"
        line = (
            f"epoch {state['epoch']}  swarm samples {state['swarm_samples']}/{state['target']}  loss {loss}  "
            f"peers {state['peers']}  {state['samples_per_second']:.1f} samples/s  mine {state['local_samples']}"
        )
        chain = _chain_text(state)
        if chain:
            line += "  " + chain
        if self.fmt == "plain" or not self.console.is_terminal:
            if self.fmt == "plain":
                self.stream.write(line + "\n")
                self.stream.flush()
            return
        if self._progress is None:
            self._progress = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total} swarm samples"),
                TextColumn("loss {task.fields[loss]}  peers {task.fields[peers]}  {task.fields[sps]} samples/s"),
                TextColumn("{task.fields[chain]}"),
                console=self.console,
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("train", total=state["target"], epoch=0, loss="-", peers=1, sps="0",
                                                 chain="")  # fmt: skip
        self._progress.update(
            self._task,
            total=state["target"],
            completed=min(state["swarm_samples"], state["target"]),
            epoch=state["epoch"],
            loss=loss,
            peers=state["peers"],
            sps=f"{state['samples_per_second']:.1f}",
            chain=chain,
        )

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _chain_text(state: dict) -> str:
    if "receipts_posted" not in state:
        return ""
    return (f"receipts {state['receipts_posted']} settled/{state['receipts_pending']} pending  rewards "
            f"{state['rewards_wei'] / 1e18:.6f} ETH")  # fmt: skip
