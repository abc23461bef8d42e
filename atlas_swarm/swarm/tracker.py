"""The progress tracker each peer runs: hivemind's ProgressTracker, following only admitted, sane progress records
(admission.sane_progress), storing its own at most once a second, and fetching sooner while a peer it knows of has
no record read (SwarmOptimizer makes it; swarm/__init__.py lists what it overrides)."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from types import SimpleNamespace

from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.utils import get_dht_time

from atlas_swarm.admission import sane_progress
from atlas_swarm.swarm.node import peer_id_of_owner


class OwnedLoop(asyncio.SelectorEventLoop):
    """An event loop that only the thread that made it runs. hivemind's MPFuture (a DHT call's future) remembers the
    loop current where it was made, and when its result comes while that loop is not running, its background thread
    runs the loop itself to set the future's event (``MPFuture._set_event_threadsafe``). Our tracker thread closes its
    loop once both its tasks end: a DHT store answered just then ran the loop in that other thread while the tracker
    closed it ("Cannot close a running event loop", a traceback on the peer's stderr: 1 full-suite run,
    2026-12-06). Here such a call from another thread does nothing: nobody waits on this loop once it has stopped."""

    def __init__(self) -> None:
        super().__init__()
        self._owner = threading.get_ident()

    def run_until_complete(self, future):
        if threading.get_ident() != self._owner:
            if asyncio.iscoroutine(future):
                future.close()  # never run: no "coroutine was never awaited" warning
            return None
        return super().run_until_complete(future)


class ThrottledTracker(ProgressTracker):
    """hivemind's ProgressTracker stores a DHT record after every local step; this one at most every ``report_every``
    seconds, and at once when the step completes the target batch, starts a new epoch, or falls in the epoch's last
    ``report_every`` seconds (others decide from these records when the epoch ends).

    Each report wakes four threads and the DHT process (executor, event loop, fd sharing, the signing store, the
    reply): on 2 cores each wake-up can preempt the training thread. Measured on a lone MiniLM peer, the training
    thread was off-CPU 5.8 % of the time with per-step reports and 4.5 % without (a plain loop: 0 %). Peers
    extrapolate each other's progress from the reported samples/s, so a report up to a second late changes no
    estimate that matters; the report that completes an epoch is never delayed.
    """

    report_every = 1.0

    status_epochs: dict = {}  # PeerID -> epoch, of admitted peers' statuses, as the peer last read them (note_statuses)
    began = None  # (epoch, get_dht_time()) of this peer's last transition (SwarmOptimizer): admission.sane_progress
    _counted = (-1, {})  # (this peer's epoch, PeerID -> the samples its record last counted there): hold_lone_leaders

    def __init__(self, *args, gate=None, own_peer_id: str = "", sample_cap: float = math.inf, **kwargs):
        self._last_report = 0.0
        self.gate, self.own_peer_id, self.sample_cap = gate, own_peer_id, sample_cap
        self.ignored_writers: set[str] = set()  # PeerIDs whose progress records were not followed
        super().__init__(*args, **kwargs)

    def followed_records(self, metadata) -> dict[str, dict]:
        """The peers' progress records this peer follows (admission.sane_progress): PeerID -> record."""
        records = {}
        for subkey, item in (metadata.items() if isinstance(metadata, dict) else ()):
            pid, value = peer_id_of_owner(subkey), getattr(item, "value", None)
            if pid is not None and isinstance(value, dict) and type(value.get("epoch")) is int \
                    and isinstance(value.get("samples_per_second"), float) \
                    and type(value.get("samples_accumulated")) is int:  # fmt: skip
                records[pid] = value
        epoch = self.local_progress.epoch
        if self._counted[0] != epoch:
            self._counted = (epoch, {})
        kept, _ = sane_progress(records, self.own_peer_id, self.admits, self.sample_cap, self.target_batch_size,
                                self.status_epochs, self.began, get_dht_time(), self._counted, epoch)  # fmt: skip
        self._counted[1].update((p, r["samples_accumulated"]) for p, r in kept.items() if r["epoch"] == epoch)
        if self.gate is not None:
            self.gate.set_followed(kept)
        self.ignored_writers.update(set(records) - set(kept))
        return kept

    def _parse_swarm_progress_data(self, metadata):
        kept = {}
        read = {peer_id_of_owner(k) for k in metadata} if isinstance(metadata, dict) else set()
        if isinstance(metadata, dict) and metadata:  # none followed: hivemind's own "no active peers" view
            kept = self.followed_records(metadata)
            # hivemind's record model forbids fields it does not know: sane_progress's "cap" and "median_rate" stay
            metadata = {pid: SimpleNamespace(value={k: x for k, x in v.items() if k not in ("cap", "median_rate")})
                        for pid, v in kept.items()}  # fmt: skip
        progress = super()._parse_swarm_progress_data(metadata)
        own = kept.get(self.own_peer_id)
        counted_own = own["samples_accumulated"] if own and own["epoch"] == progress.epoch else 0
        self._others = progress.samples_accumulated - counted_own if kept else 0
        median = next(iter(kept.values()))["median_rate"] if kept else 0.0  # the one sane_progress capped with
        self._own_rate_cap = 2 * median if median > 0 else math.inf  # as sane_progress counts this peer's record
        self._own_sample_cap = own.get("cap", math.inf) if own and own["epoch"] == progress.epoch else math.inf
        self.swarm_rate = sum(r["samples_per_second"] for r in kept.values() if math.isfinite(r["samples_per_second"]))
        self._read = frozenset(read)
        if self.unread(read, progress.epoch):
            progress.next_fetch_time = min(progress.next_fetch_time, get_dht_time() + self.refetch_unread)
        return progress

    _read = frozenset()  # the PeerIDs of the records the last fetch brought

    def note_statuses(self, epochs: dict) -> None:
        """The admitted peers' status epochs (PeerID -> epoch), read by the peer. If they list a peer at this epoch or
        later whose record the last fetch did not bring, the next fetch is moved up to ``refetch_unread`` from now: a
        tracker that had read one record before the peer's wait for company ended slept 2 s before its next fetch."""
        self.status_epochs = dict(epochs)
        progress, soon = self.global_progress, get_dht_time() + self.refetch_unread
        if progress.next_fetch_time > soon and self.unread(self._read, progress.epoch):
            progress.next_fetch_time = soon
            self.global_state_updated.set()  # hivemind's fetcher then waits again, to the new time

    refetch_unread = 0.5  # s: the next fetch while a peer's status is at this epoch or later, its record unread

    def unread(self, read: set, epoch: int) -> set[str]:
        """Admitted peers (this one included) whose statuses say they are at ``epoch`` or later and whose progress
        records the last fetch did not bring (``read``: the PeerIDs of the records it brought, followed or not).
        hivemind sets the next fetch from the records it read, up to max_refresh_period (2 s) away when it read few:
        a tracker that read only its own record at the start of a run counted the epoch as a lone peer's for 2-4 s
        while the others ended it together, and then synced into theirs (README, Known limits)."""
        return {p for p, e in self.status_epochs.items()
                if e >= epoch and p not in read and (p == self.own_peer_id or self.admits(p))}  # fmt: skip

    def admits(self, peer_id: str) -> bool:
        """Whether the run admits ``peer_id`` (everyone without a gate)."""
        return self.gate is None or self.gate.admits(peer_id)

    def run(self):
        """hivemind's, and then the loop's leftover tasks are ended before the thread does. Its fetcher's shutdown
        watcher (a task waiting on an executor) is often still pending when both loops return, and the loop is never
        run again: at exit Python printed "Task was destroyed but it is pending!" on about one peer in six (14 of 77
        stderr files of a full test run; source found with PYTHONASYNCIODEBUG=1)."""
        loop = OwnedLoop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(asyncio.gather(self._progress_reporter(), self._progress_fetcher()))
        except Exception as e:  # the peer's watch stops the peer with it (stopping.watch): a peer whose tracker
            # thread died (a bug of ours in sane_progress, 2026-12-06) trained on alone, each epoch on its own samples,
            # with a traceback in its stderr and nothing else to say so
            self.failure = f"{type(e).__name__}: {e}"
        finally:
            left = asyncio.all_tasks(loop)
            for task in left:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            loop.close()
            self.shutdown_complete.set()

    _others = 0  # at the last fetch: the samples the other followed records count toward the swarm's epoch
    _own_rate_cap = math.inf
    _own_sample_cap = math.inf  # at the last fetch: the constant cap on its own record (an epoch not transitioned to)
    swarm_rate = 0.0  # at the last fetch: the followed records' summed samples/s (this peer's own included)
    failure = None  # why the thread ended, if an error ended it (run)

    def report_local_progress(self, local_epoch: int, samples_accumulated: int, update_global_samples: bool = True):
        # Between fetches hivemind adds this peer's new samples to its view of the swarm's, uncapped, while the others
        # count them capped (admission.sane_progress): a peer doing most of the work ended epochs seconds before the
        # others (3 peers on 2 cores, one at 5x the others' rate: 4.5 s early). In an epoch it entered in a
        # transition, its own samples count in its view as they do in the others': at most twice the median rate
        # since the transition (alone, never less than it did); in another (the first), at most the constant cap.
        transitioned = self.began is not None and self.began[0] == local_epoch
        counted = update_global_samples and (transitioned or math.isfinite(self._own_sample_cap)) \
            and local_epoch == self.local_progress.epoch == self.global_progress.epoch  # fmt: skip
        extra = samples_accumulated - self.local_progress.samples_accumulated
        now = time.monotonic()
        due = (
            now - self._last_report >= self.report_every
            or self.global_progress.eta_next_epoch - get_dht_time() < self.report_every
            or extra <= 0
            or local_epoch != self.local_progress.epoch
            or self.global_progress.samples_accumulated + extra >= self.target_batch_size
        )
        if due:
            self._last_report = now
            super().report_local_progress(local_epoch, samples_accumulated, update_global_samples and not counted)
        else:  # the rest of hivemind 1.1.12's report_local_progress, without waking the reporter
            if update_global_samples and not counted and local_epoch == self.local_progress.epoch == \
                    self.global_progress.epoch:  # fmt: skip
                self.global_progress.samples_accumulated += extra
            self.performance_ema.update(task_size=extra)
            self.local_progress = self._get_local_progress(local_epoch, samples_accumulated)
        if counted and not transitioned:
            self.global_progress.samples_accumulated = self._others + min(samples_accumulated, self._own_sample_cap)
        elif counted:
            seconds = max(0.0, get_dht_time() - self.began[1])
            own = samples_accumulated if math.isinf(self._own_rate_cap) else \
                min(samples_accumulated, int(self._own_rate_cap * seconds))  # fmt: skip
            self.global_progress.samples_accumulated = self._others + own
