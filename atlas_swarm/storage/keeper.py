"""Keeping a run's published adapters so the result outlives the peers that trained it.

A keeper (a trainer's notebook; a bootstrap node with --keep-adapters DIR) copies every adapter the runs it watches
publish into its own store, each block verified against its CID, serves the blocks, and lists the copies in its own
record of the run with ``keeper=True``. Peers stopping at --max-epochs wait until a keeper holds their final adapter.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable

from atlas_swarm.errors import StorageError
from atlas_swarm.storage.dag import first_good
from atlas_swarm.storage.store import LocalStore

REFRESH_EVERY = 3600.0  # republish the keeper's record (it lives ADAPTERS_TTL = 24 h without a refresh)


class Keeper:
    def __init__(self, swarm, store_root: str | Path, run_ids: Callable[[], Iterable[str]], every: float = 1.0):
        from atlas_swarm.swarm.records import PublishedAdapter

        self.swarm, self.run_ids, self.every, self._record = swarm, run_ids, every, PublishedAdapter
        self.store = LocalStore(store_root)
        self.kept: dict[str, dict[str, object]] = {}  # run id -> cid -> PublishedAdapter
        self.errors: dict[str, str] = {}  # cid -> why it could not be kept (yet)
        self._listed: dict[str, float] = {}  # run id -> when this keeper last published its record
        self._listed_cids: dict[str, set] = {}  # run id -> the CIDs that record lists
        self._lock = threading.Lock()
        self._stop = threading.Event()
        swarm.serve_blocks(str(self.store.root))
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
        votes: dict[int, Counter] = {}  # epoch -> CID -> publishers listing it now
        for pid, a in swarm.published_adapters(run_id):
            if pid == swarm.peer_id:
                continue
            votes.setdefault(a.epoch, Counter())[a.cid] += 1
            if a.cid in kept:
                continue
            try:
                self.store.pin(first_good([("this keeper's store", self.store.get_blocks),
                                           (f"peer {pid}", swarm.blocks_from(pid))]), a.cid)  # fmt: skip
            except StorageError as e:
                self.errors[a.cid] = str(e)
                continue
            kept[a.cid] = self._record(epoch=a.epoch, cid=a.cid, adapter_hash=a.adapter_hash, time=a.time)
            self.errors.pop(a.cid, None)
        # list what the publishers of each epoch agree on now: a CID they replaced (a finisher's pre-agreement
        # adapter) or that fewer of them list is kept on disk but not vouched for
        listed = sorted((r for cid, r in kept.items() if not votes.get(r.epoch)
                         or votes[r.epoch][cid] == max(votes[r.epoch].values())), key=lambda r: (r.epoch, r.time))  # fmt: skip
        changed = {r.cid for r in listed} != self._listed_cids.get(run_id)
        stale = time.monotonic() - self._listed.get(run_id, 0.0) > REFRESH_EVERY
        if changed or first_sight or stale:  # an empty record at first sight tells finishing peers a keeper is here
            swarm.publish_adapters(run_id, listed, wait=first_sight, keeper=True)
            self._listed[run_id], self._listed_cids[run_id] = time.monotonic(), {r.cid for r in listed}

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)
