"""Keeping a run's published adapters so the result outlives the peers that trained it.

A keeper (a trainer's notebook; a bootstrap node with --keep-adapters DIR) copies the adapters the runs it watches
publish into its own store, each block verified against its CID, serves the blocks, and lists the copies in its own
record of the run with ``keeper=True``. Peers stopping at --max-epochs wait until a keeper holds their final adapter.

What a stranger can make it store is bounded: only adapters most of the run's peers vouch for (storage/vouch.py),
newest first, each at most ``max_adapter_bytes`` and all of a run's at most ``run_quota`` bytes; a CID that fails is
tried again only after a backoff (it never blocks the others).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable, Iterable

from atlas_swarm.checkpoints.vouch import reachable_first, vouched
from atlas_swarm.errors import StorageError
from atlas_swarm.majority import ranked
from atlas_swarm.storage.dag import MAX_ADAPTER_BYTES, first_good
from atlas_swarm.storage.store import LocalStore
from atlas_swarm.swarm.records import PublishedAdapter

REFRESH_EVERY = 3600.0  # republish the keeper's record (it lives ADAPTERS_TTL = 24 h without a refresh)
RUN_QUOTA = 2 << 30  # bytes of adapters kept per run
RETRY_MAX = 600.0  # seconds between tries of a CID that keeps failing, at most
KEEP_RUNS = 16  # runs a bootstrap keeper keeps adapters of (the most announced; --run pins more)


def most_announced(announcers: dict[str, int], n: int = KEEP_RUNS) -> set[str]:
    """The ``n`` runs announced by the most peers (each key announces one run, so Sybil runs need many keys)."""
    return set(ranked(announcers)[:n])


class Keeper:
    def __init__(self, swarm, store_root: str | Path, run_ids: Callable[[], Iterable[str]], every: float = 1.0,
                 run_quota: int = RUN_QUOTA, max_adapter_bytes: int = MAX_ADAPTER_BYTES):  # fmt: skip
        self.swarm, self.run_ids, self.every = swarm, run_ids, every
        self.run_quota, self.max_adapter_bytes = run_quota, max_adapter_bytes
        self.store = LocalStore(store_root)
        self.kept: dict[str, dict[str, object]] = {}  # run id -> cid -> PublishedAdapter
        self.used: dict[str, int] = {}  # run id -> bytes of blocks kept for it
        self.errors: dict[str, str] = {}  # cid -> why it could not be kept (yet)
        self._retry: dict[str, tuple[int, float]] = {}  # cid -> (failures, when to try again)
        self._listed: dict[str, float] = {}  # run id -> when this keeper last published its record
        self._listed_cids: dict[str, set] = {}  # run id -> the CIDs that record lists
        self._lock = threading.Lock()
        self._stop = threading.Event()
        swarm.serve_blocks(self.store.get_blocks)
        self._thread = threading.Thread(target=self._loop, name="atlas-keeper", daemon=True)

    def start(self) -> "Keeper":
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.keep_new()
            except Exception as e:  # never let a background copy kill its host; fetches report their own errors
                self.errors["*"] = f"{type(e).__name__}: {e}"
            self._stop.wait(self.every)

    def keep_new(self) -> None:
        with self._lock:
            for run_id in list(self.run_ids()):
                self._keep_run(run_id)

    def _keep_run(self, run_id: str) -> None:
        swarm = self.swarm
        first_sight = run_id not in self.kept
        kept = self.kept.setdefault(run_id, {})
        published = [(pid, a) for pid, a in swarm.published_adapters(run_id) if pid != swarm.peer_id]
        statuses = swarm.peer_statuses(run_id)
        good = vouched(published, {pid: s.epoch for pid, s in statuses.items()})
        now = time.monotonic()
        for epoch in sorted(good, reverse=True):  # newest first: a full quota keeps the newest
            cid = good[epoch]
            if cid in kept or self._retry.get(cid, (0, 0.0))[1] > now:
                continue
            room = min(self.max_adapter_bytes, self.run_quota - self.used.get(run_id, 0))
            if room <= 0:
                self.errors[cid] = f"not kept: run {run_id}'s quota of {self.run_quota} bytes is used up"
                continue
            publishers = reachable_first({pid for pid, a in published if a.cid == cid}, statuses)
            sources = [("this keeper's store", self.store.get_blocks)]
            sources += [(f"peer {pid}", swarm.blocks_from(pid)) for pid in publishers]
            try:
                size = self.store.pin(first_good(sources), cid, max_bytes=room)
            except StorageError as e:
                failures = self._retry.get(cid, (0, 0.0))[0] + 1
                self._retry[cid] = (failures, now + min(RETRY_MAX, self.every * 2**failures))
                self.errors[cid] = str(e)
                continue
            self.used[run_id] = self.used.get(run_id, 0) + size
            a = next(a for pid, a in published if a.cid == cid)
            kept[cid] = PublishedAdapter(epoch=epoch, cid=cid, adapter_hash=a.adapter_hash, time=a.time)
            self.errors.pop(cid, None)
            self._retry.pop(cid, None)
        # list what the run vouches for now; an epoch nobody claims any more (publishers gone) stays listed, and a
        # CID the publishers replaced (a finisher's pre-agreement adapter) is kept on disk but not vouched for
        claimed = {a.epoch for _, a in published}
        listed = sorted((r for cid, r in kept.items() if r.epoch not in claimed or good.get(r.epoch) == cid),
                        key=lambda r: (r.epoch, r.time))  # fmt: skip
        changed = {r.cid for r in listed} != self._listed_cids.get(run_id)
        stale = time.monotonic() - self._listed.get(run_id, 0.0) > REFRESH_EVERY
        if changed or first_sight or stale:  # an empty record at first sight tells finishing peers a keeper is here
            swarm.publish_adapters(run_id, listed, wait=first_sight, keeper=True)
            self._listed[run_id], self._listed_cids[run_id] = time.monotonic(), {r.cid for r in listed}

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)
