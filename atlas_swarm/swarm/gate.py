"""Who may average with us, shared with hivemind's averager processes, and what they refused, counted.

The policy is ``admission.admitted_peers`` (pure); this module only carries its answer across processes: hivemind
forks an averager process per averager when the optimizer is made, and those processes run matchmaking and rounds.
The main process refreshes the admitted set (bindings and stakes change) in shared memory; the averagers read it
on each request. Refusals are counted in shared memory too, for the peer's status and the monitor's ``/metrics``.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing as mp
import time
from typing import Iterable, Optional

MAX_SET_BYTES = 1 << 18  # 256 KiB: about 5,000 PeerIDs
COUNTS = ("refused_joins", "refused_leaders", "refused_members", "refused_updates", "dropped_updates",
          "refused_records", "refused_donors", "refused_states", "refused_pairs", "refused_relays",
          "refused_downloads", "slow_donors")  # fmt: skip


class SharedSet:
    """A set of strings the main process publishes and averager processes read (cached per version)."""

    def __init__(self, size: int, items: Iterable[str] = ()):
        self._raw = mp.Array(ctypes.c_char, size, lock=True)
        self._version = mp.Value(ctypes.c_long, 0, lock=True)
        self._cache: tuple[int, frozenset] = (-1, frozenset())
        self.set(items)

    def set(self, items: Iterable[str]) -> None:
        raw = json.dumps(sorted(set(items))).encode()
        if len(raw) >= len(self._raw):
            raise ValueError(f"{len(raw)} bytes of PeerIDs do not fit the shared {len(self._raw)}")
        with self._raw.get_lock():
            if raw != self._raw.value:
                self._raw.raw = raw + b"\0" * (len(self._raw) - len(raw))
                self._version.value += 1

    def get(self) -> frozenset:
        version = self._version.value
        if version != self._cache[0]:
            with self._raw.get_lock():
                version, raw = self._version.value, self._raw.raw.rstrip(b"\0")
            self._cache = (version, frozenset(json.loads(raw)))
        return self._cache[1]


class Gate:
    """``admits(peer_id)``: everyone in an open run, else the set the main process last published."""

    def __init__(self, open_run: bool, admitted: Iterable[str] = ()):
        self.open = open_run
        self._admitted = SharedSet(MAX_SET_BYTES, admitted)
        # peers whose progress this peer follows (itself included), each as "PeerID new", ``new`` when it arrived
        # (wall clock) if it was a newcomer, else 0 (see set_followed)
        self._followed = SharedSet(MAX_SET_BYTES // 4)
        self._first_seen: dict[str, float] = {}  # the main process's: when each peer's progress was first followed
        self._began: Optional[float] = None  # the main process's: when it first followed anyone
        self._counts = mp.Array(ctypes.c_long, len(COUNTS), lock=True)

    def set_admitted(self, peers: Iterable[str]) -> None:
        self._admitted.set(peers)

    def admitted(self) -> Optional[frozenset]:
        """The admitted PeerIDs, or None in an open run (everyone)."""
        return None if self.open else self._admitted.get()

    def admits(self, peer_id: str) -> bool:
        peers = self.admitted()
        return peers is None or peer_id in peers

    # A newcomer is a peer first followed SETTLE seconds or more after this peer first followed anyone: peers that
    # start a run together appear within a few seconds of each other (their first samples), and are never new.
    SETTLE = 10.0
    MAX_REMEMBERED = 4096  # peers whose first sighting is kept (a forgotten one that returns is a newcomer again)

    def set_followed(self, peers: Iterable[str]) -> None:
        now, peers = time.time(), set(peers)
        self._began = now if self._began is None else self._began
        for p in peers:
            self._first_seen.setdefault(p, now)
        if len(self._first_seen) > self.MAX_REMEMBERED:
            for p in sorted(set(self._first_seen) - peers, key=self._first_seen.get)[:len(self._first_seen) // 2]:
                del self._first_seen[p]
        new = {p: t if t >= self._began + self.SETTLE else 0.0 for p, t in self._first_seen.items() if p in peers}
        self._followed.set(f"{p} {t:.3f}" for p, t in new.items())

    def followed(self, since: Optional[float] = None) -> frozenset:
        """The peers whose progress this peer follows (itself included), as last fetched; with ``since`` (a wall
        clock time), not the newcomers that arrived after it."""
        entries = (e.rpartition(" ") for e in self._followed.get())
        return frozenset(p for p, _, t in entries if since is None or float(t) <= since)

    def count(self, what: str, n: int = 1) -> None:
        with self._counts.get_lock():
            self._counts[COUNTS.index(what)] += n

    def counts(self) -> dict[str, int]:
        with self._counts.get_lock():
            return dict(zip(COUNTS, self._counts[:]))
