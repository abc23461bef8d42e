"""The monitor's model of the swarm, rebuilt from DHT records every few seconds, with a bounded history.

Memory is bounded on a node that runs for months: at most MAX_RUNS runs, a run unseen for FORGET_AFTER seconds is
dropped, and each run keeps HISTORY points. When there are more, the runs with the most live peers stay (announcements
are signed, one run per key): 64 announced junk runs cannot push a live run off the dashboard. A poll reads at most
MAX_READ runs (the most announced first), POLL_WORKERS at a time, within POLL_BUDGET seconds; one run that cannot be
read (junk records, a slow DHT) costs only that run's row in that poll. Specs nobody serves are asked for again only
every SPEC_RETRY seconds. Evicted runs also leave the DHT's validators (Swarm.forget_run).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import Optional

from atlas_swarm.errors import AtlasError
from atlas_swarm.swarm.records import STATUS_TTL

HISTORY = 720  # points per run (an hour at one poll per 5 s)
MAX_RUNS = 64
MAX_READ = 2 * MAX_RUNS  # runs read per poll
POLL_WORKERS = 8
POLL_BUDGET = 4.0  # seconds a poll waits for its runs; later ones are read next time
SPEC_RETRY = 60.0
FORGET_AFTER = 3600.0


@dataclass
class PeerView:
    peer_id: str
    device: str
    client_mode: bool
    epoch: int
    samples_total: int
    samples_per_second: float
    loss: Optional[float]
    rounds_averaged: int
    rounds_failed: int
    receipts_posted: int
    receipts_pending: int
    rewards_eth: float
    last_seen: float
    refused: int = 0
    outliers: int = 0
    last_outliers: tuple = ()


@dataclass
class RunView:
    run_id: str
    name: str = ""
    target: int = 0
    epoch: int = 0
    samples: int = 0  # accumulated toward the target in the current epoch
    loss: Optional[float] = None  # mean of the peers' recent losses
    samples_per_second: float = 0.0
    peers: dict[str, PeerView] = field(default_factory=dict)
    last_seen: float = 0.0
    history: deque = field(default_factory=lambda: deque(maxlen=HISTORY))

    def summary(self) -> dict:
        d = asdict(self)
        d["peers"] = sorted(d["peers"].values(), key=lambda p: p["peer_id"])
        d["history"] = list(self.history)
        return d


class Monitor:
    """Polls ``swarm`` (an atlas Swarm, or anything with the same read methods) every ``interval`` seconds."""

    def __init__(self, swarm, interval: float = 5.0, runs: tuple[str, ...] = ()):
        self.swarm, self.interval = swarm, interval
        self.pinned = set(runs)
        self.runs: OrderedDict[str, RunView] = OrderedDict()
        self.rejected: dict[str, int] = {}
        self.polls = {"ok": 0, "error": 0, "run_errors": 0, "run_timeouts": 0}
        self.last_ok: Optional[float] = None
        self.last_error: Optional[str] = None
        self.started = time.time()
        self._specs: dict[str, object] = {}  # only for runs in self.runs
        self._spec_retry: dict[str, float] = {}  # run id -> when to ask again for a spec nobody served
        self._reads: dict[str, object] = {}  # run id -> a read still running from an earlier poll
        self._pool = ThreadPoolExecutor(POLL_WORKERS, thread_name_prefix="atlas-monitor-read")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="atlas-monitor", daemon=True)

    # -- polling ------------------------------------------------------------------------------------------------
    def start(self) -> "Monitor":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.interval + POLL_BUDGET + 5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            self._stop.wait(self.interval)

    def poll_once(self) -> None:
        try:
            if not self.swarm.is_alive():
                raise RuntimeError("the DHT process is not running")
            now = time.time()
            announcers = self.swarm.announcers()
            ranked = sorted(announcers, key=lambda r: (-announcers[r], r))
            wanted = list(self.pinned) + [r for r in ranked if r not in self.pinned][:MAX_READ]
            views, errors, slow = self._read_runs(wanted, now)
            rejected = self.swarm.rejected_records()
        except Exception as e:  # a monitor never dies of what it reads; /health reports it
            with self._lock:
                self.polls["error"] += 1
                self.last_error = f"{type(e).__name__}: {e}"
            return
        with self._lock:
            for run_id, view in views.items():
                old = self.runs.pop(run_id, None)
                if old is not None:
                    view.history = old.history
                view.history.append({"t": round(now, 1), "epoch": view.epoch, "loss": view.loss,
                                     "samples_per_second": round(view.samples_per_second, 3),
                                     "peers": len(view.peers)})  # fmt: skip
                self.runs[run_id] = view  # most recently seen last
            gone = [r for r, v in self.runs.items() if now - v.last_seen > FORGET_AFTER]
            if len(self.runs) - len(gone) > MAX_RUNS:  # keep the runs with the most live peers, pinned ones always
                keep = sorted((r for r in self.runs if r not in gone), key=lambda r: (
                    r not in self.pinned, -len(self.runs[r].peers), -self.runs[r].last_seen))[:MAX_RUNS]  # fmt: skip
                gone += [r for r in self.runs if r not in keep and r not in gone]
            for run_id in gone:
                del self.runs[run_id]
            self.polls["run_errors"] += len(errors)
            self.polls["run_timeouts"] += slow
            self.rejected = rejected
            self.polls["ok"] += 1
            self.last_ok = now
            self.last_error = next(iter(errors.values()), None)
        for run_id in set(gone) | {r for r in wanted if r not in self.runs}:  # read, but not shown: let go
            self._forget(run_id)
        for run_id in [r for r in self._spec_retry if r not in announcers and r not in self.pinned]:
            del self._spec_retry[run_id]

    def _read_runs(self, run_ids: list[str], now: float) -> tuple[dict, dict, int]:
        """Read ``run_ids`` concurrently within POLL_BUDGET s: (views, errors by run, reads left running). A read
        still running from an earlier poll is not started twice."""
        for run_id in run_ids:
            if run_id not in self._reads:
                self._reads[run_id] = self._pool.submit(self._read_run, run_id, now)
        futures = {r: self._reads[r] for r in run_ids}
        wait(futures.values(), timeout=POLL_BUDGET)
        views, errors = {}, {}
        for run_id, future in futures.items():
            if not future.done():
                continue
            del self._reads[run_id]
            try:
                view = future.result()
            except Exception as e:  # junk records of one run cost that run's row, nothing else
                errors[run_id] = f"run {run_id[:64]}: {type(e).__name__}: {str(e)[:200]}"
                continue
            if view is not None:
                views[run_id] = view
        for run_id in [r for r, f in self._reads.items() if f.done() and r not in futures]:
            del self._reads[run_id]  # a read for a run no longer wanted
        return views, errors, sum(1 for f in futures.values() if not f.done())

    def _forget(self, run_id: str) -> None:
        self._specs.pop(run_id, None)
        if run_id not in self.pinned:
            try:
                self.swarm.forget_run(run_id)
            except Exception:  # the DHT is going down: nothing left to free
                pass

    def _read_run(self, run_id: str, now: float) -> Optional[RunView]:
        view = RunView(run_id)
        spec = self._specs.get(run_id)
        if spec is None and self._spec_retry.get(run_id, 0.0) <= now:
            try:
                spec = self._specs[run_id] = self.swarm.fetch_spec(run_id, timeout=0.1)
            except AtlasError:
                self._spec_retry[run_id] = now + SPEC_RETRY
        if spec is not None:
            view.name, view.target = spec.name, spec.averaging.target_batch_size
        for pid, st in self.swarm.peer_statuses(run_id).items():
            if st.leaving or now - st.time > STATUS_TTL:
                continue
            view.peers[pid] = PeerView(
                peer_id=pid, device=st.device, client_mode=st.client_mode, epoch=st.epoch,
                samples_total=st.samples_total, samples_per_second=st.samples_per_second, loss=st.loss,
                rounds_averaged=st.rounds_averaged, rounds_failed=st.rounds_failed, receipts_posted=st.receipts_posted,
                receipts_pending=st.receipts_pending, rewards_eth=st.rewards_eth, last_seen=st.time, refused=st.refused,
                outliers=st.outliers, last_outliers=tuple(st.last_outliers),
            )  # fmt: skip
        progress = self.swarm.training_progress(run_id)
        epochs = [p["epoch"] for p in progress] + [p.epoch for p in view.peers.values()]
        if not epochs:
            return None  # announced, but nothing readable (yet)
        view.epoch = max(epochs)
        view.samples = sum(p["samples_accumulated"] for p in progress if p["epoch"] == view.epoch)
        losses = [p.loss for p in view.peers.values() if p.loss is not None]
        view.loss = round(sum(losses) / len(losses), 5) if losses else None
        view.samples_per_second = sum(p.samples_per_second for p in view.peers.values())
        view.last_seen = now
        return view

    # -- reading ------------------------------------------------------------------------------------------------
    def health(self) -> tuple[bool, str]:
        with self._lock:
            if not self.swarm.is_alive():
                return False, "the DHT process is not running"
            if self.last_ok is None:
                return False, "no successful poll yet" + (f" ({self.last_error})" if self.last_error else "")
            age = time.time() - self.last_ok
            if age > 3 * self.interval + 10:
                return False, f"last successful poll {age:.0f} s ago ({self.last_error or 'stalled'})"
            return True, "ok"

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "time": time.time(), "started": self.started, "peer_id": self.swarm.peer_id,
                "runs": [v.summary() for v in reversed(self.runs.values())], "rejected": dict(self.rejected),
                "polls": dict(self.polls), "last_error": self.last_error,
            }  # fmt: skip
