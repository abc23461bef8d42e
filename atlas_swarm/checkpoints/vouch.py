"""Which published adapter a run vouches for: pure functions over the run's records, no network.

A publisher's record is one signed claim, so one record must not decide. A peer vouches for epoch E when its live
status says it reached E, or when it published an adapter of epoch E or later. The run vouches for E when more than
half of the peers it knows (statuses and publishers) do; within E, the CID most publishers list wins (ties: the
smallest, so every reader picks the same). One stranger claiming epoch 10^6 is one voice of many.

What this cannot tell: which of two CIDs of one vouched epoch is right when their publishers are equally many (the
group's co-signed receipts and the chain's quorum checkpoints settle that; see README, Threat model).
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Mapping, Optional, Sequence

from atlas_swarm.errors import StorageError
from atlas_swarm.majority import majority


def vouched(published: Iterable[tuple[str, object]], reached: Mapping[str, int]) -> dict[int, str]:
    """Epoch -> CID for every published epoch that more than half of the known peers vouch for.
    ``published``: (publisher PeerID, PublishedAdapter) pairs; ``reached``: PeerID -> epoch in its live status."""
    published = list(published)
    newest_published: dict[str, int] = {}
    for pid, a in published:
        newest_published[pid] = max(newest_published.get(pid, -1), a.epoch)
    peers = set(reached) | set(newest_published)
    reach = {pid: max(reached.get(pid, -1), newest_published.get(pid, -1)) for pid in peers}
    votes: dict[int, Counter] = {}
    for pid, a in published:
        votes.setdefault(a.epoch, Counter())[a.cid] += 1
    out = {}
    for epoch, cids in votes.items():
        if 2 * sum(1 for r in reach.values() if r >= epoch) > len(peers):
            out[epoch] = majority(cids)
    return out


def reachable_first(publishers: Iterable[str], statuses: Mapping[str, object]) -> list[str]:
    """The order to ask ``publishers`` in: those whose live status says they accept connections first, then those
    without a status, then the ones in client mode (behind NAT: a fetcher not connected to one waits for a failed
    dial, about 2 s per request); PeerID order within each. A status that lies about it costs the fetcher one source
    (blocks are verified), as any publisher can."""
    def rank(pid: str) -> int:
        status = statuses.get(pid)
        mode = getattr(status, "client_mode", None)
        return 1 if mode is None else 2 if mode else 0

    return sorted(set(publishers), key=lambda pid: (rank(pid), pid))


def choose(published: Sequence[tuple[str, object]], reached: Mapping[str, int],
           epoch: Optional[int] = None) -> tuple[int, str, list[str]]:  # fmt: skip
    """(epoch, CID, its publishers) of the newest vouched epoch (or of ``epoch``, if vouched)."""
    good = vouched(published, reached)
    if epoch is not None:
        good = {e: c for e, c in good.items() if e == epoch}
    if not good:
        what = f"for epoch {epoch}" if epoch is not None else "yet"
        raise StorageError(f"Nothing published {what} that most of the run's peers vouch for: peers publish the "
                           f"adapter every --publish-every epochs (run.published() lists every claim).")  # fmt: skip
    newest = max(good)
    cid = good[newest]
    return newest, cid, sorted({pid for pid, a in published if a.epoch == newest and a.cid == cid})
