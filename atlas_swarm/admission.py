"""Who may train in a run, and which progress claims to follow: pure functions over tables (no network).

    admitted_peers   the run spec's [trust] admission: open (None: everyone), allowlist (PeerIDs, or wallet addresses
                     whose binding names the PeerID), staked (bound on chain both ways, stake >= the run's minStake)
    epoch_ceiling    the highest epoch a progress record may claim and still be followed
    sane_progress    the progress records to follow: admitted writers, under the ceiling, rates and samples capped
    trusted_states   the (epoch, state digest) pairs a strict majority of admitted peers hold: what a download must match
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Callable, Iterable, Mapping, Optional

from atlas_swarm.config import TrustSpec

EPOCH_SLACK = 1  # a peer that just ended an epoch is one ahead of the others for a moment


def admitted_peers(trust: TrustSpec, bindings: Mapping[str, str] = {},
                   stakes: Mapping[str, tuple[bool, int]] = {}, min_stake: int = 0) -> Optional[frozenset[str]]:  # fmt: skip
    """The PeerIDs admitted now, or None when everyone is (an open run).

    ``bindings``: PeerID -> wallet address, only bindings signed by both keys (swarm.Swarm.wallet_bindings).
    ``stakes``: address -> (the contract binds it to that PeerID too, its stake in wei), for staked runs."""
    if trust.admission == "open":
        return None
    if trust.admission == "allowlist":
        listed = set(trust.allowlist)
        return frozenset({p for p in listed if not p.startswith("0x")}
                         | {pid for pid, addr in bindings.items() if addr.lower() in listed})  # fmt: skip
    if trust.admission == "staked":
        return frozenset(pid for pid, addr in bindings.items()
                         if stakes.get(addr.lower(), (False, 0))[0] and stakes[addr.lower()][1] >= min_stake)  # fmt: skip
    raise ValueError(f"unknown admission {trust.admission!r}")


def epoch_ceiling(epochs: Iterable[int], slack: int = EPOCH_SLACK) -> Optional[int]:
    """``slack`` above the highest epoch a strict majority of the records has reached; None without records.

    One admitted liar among honest peers cannot raise it (it needs more than half of the records), and honest peers,
    who are at most one epoch apart, are always under it."""
    ordered = sorted(epochs)
    if not ordered:
        return None
    return ordered[(len(ordered) - 1) // 2] + slack


def trusted_states(claims: Mapping[str, Iterable[tuple[int, str]]]) -> set[tuple[int, str]]:
    """The (epoch, digest) pairs more than half of the admitted claimants hold (PeerID -> the pairs it claims for its
    last few epochs: peers leave an epoch at different moments, so their latest pairs need not be the same).

    Honest peers that averaged together hold bit-identical parameters (train/aggregate.py), so their claims agree."""
    votes = Counter(pair for pairs in claims.values() for pair in set(pairs))
    return {pair for pair, n in votes.items() if 2 * n > len(claims)}


def lower_median(values: Iterable[float]) -> Optional[float]:
    """The largest value that a strict majority of ``values`` reach (None if empty): one liar cannot raise it."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2] if ordered else None


def sane_progress(records: Mapping[str, dict], own: str, admits: Callable[[str], bool], cap: float,
                  target: int, others_epochs: Mapping[str, int] = {}, began: Optional[tuple[int, float]] = None,
                  now: float = math.inf, held: Optional[tuple[int, Mapping[str, int]]] = None,
                  own_epoch: Optional[int] = None) -> tuple[dict[str, dict], int]:  # fmt: skip
    """The progress records to follow (PeerID -> record, clamped) and how many were refused.

    A record counts only if its writer is admitted and its epoch is under the ceiling of the *other* admitted peers
    (a newcomer at epoch 0 must still follow a swarm ahead of it). The electorate is every other admitted peer with a
    progress record or, before its first step, a status (``others_epochs``: PeerID -> its status epoch): a peer
    waiting for company has no progress record yet, and a lone liar beside it must not be the majority.

    What one writer can claim is bounded too, so that one liar can shorten an epoch by a bounded share, not end every
    epoch at once. ``began``: (epoch, time) this peer entered its epoch in a transition (None: it did not, it started
    or synced into it). A record at that epoch then counts at most twice the rate a majority reports (an infinite
    rate ends every epoch at once), and at most the samples that rate gives from ``began`` to the record's time (not
    after ``now``). A capped record so still grows with time as an honest one does, and the estimate of the epoch's
    end (each record's samples plus its rate times its age) is the same from a fresh copy as from a stale one. Capped
    at a constant instead (twice the samples a majority reports), a fast peer's fresh records stopped adding while a
    stale copy of them went on adding its rate: three peers on two cores, one doing nine tenths of the work, ended an
    epoch 5.6 s apart (the fast one last: it read its own records fresh), missed each other's rounds and left the run
    with three adapters. Without ``began``, that constant cap is what there is: samples at twice what a majority at
    the record's epoch reports (floor: target / 2n), rates at 4x; such a record is kept with its cap (``cap``) and a
    time late enough that its samples plus its rate times its age stop at the cap, so that a stale copy counts no more
    than a fresh one (in a first epoch, a NATed peer doing 1,432 of 1,440 samples ended it 1.3 s after the others).
    In either case a kept record's time is no earlier than its samples at its rate allow, and a time that is no number
    counts as the oldest: a reader adds rate x age, and a record dated 10^4 s back ended every epoch at once.

    ``held``: (this peer's epoch, PeerID -> the samples its record last counted at that epoch): records ahead of
    that epoch are held there while their writers are no strict majority of the electorate (hold_lone_leaders).

    The medians and the floor are of every peer the reader knows of: a peer known only by its status (before its
    first record is stored, this one included at ``own_epoch``) counts as one that has done nothing yet, so that every
    reader caps a record alike from what all can read. A peer's record is stored after its first step, so as a run
    starts a reader may have read a liar's record (the liar, waiting least, steps first) and neither its own nor the
    others': the liar was its own median, counted the whole target and ended the epoch at once (test_a_samples_liar:
    an honest peer's first epoch ended under target / 8, mostly after one batch, in 14 of 18 runs). Each kept record
    carries the median rate used (``median_rate``; like ``cap``, not hivemind's)."""
    admitted = {p: r for p, r in records.items() if p == own or admits(p)}
    electorate = {p: e for p, e in others_epochs.items() if p != own and admits(p)}
    electorate.update({p: r["epoch"] for p, r in admitted.items() if p != own})
    ceiling = epoch_ceiling(electorate.values())
    followed = {p: r for p, r in admitted.items() if p == own or ceiling is None or r["epoch"] <= ceiling}
    basis = dict(followed)  # what the caps are of: these, and the peers known only by their statuses
    unseen = {p: e for p, e in electorate.items() if p not in admitted}  # a status, no record
    if own_epoch is not None and own not in admitted:
        unseen[own] = own_epoch
    basis.update({p: {"epoch": e, "samples_accumulated": 0, "samples_per_second": 0.0} for p, e in unseen.items()})
    median_rate = lower_median(r["samples_per_second"] for r in basis.values()
                               if math.isfinite(r["samples_per_second"])) or 0.0  # fmt: skip
    peers = len(electorate) + 1  # every other peer the reader knows of, and itself (basis holds no others)
    kept = {}
    for p, r in followed.items():
        if began is not None and r["epoch"] == began[0] and median_rate > 0:
            rate = min(r["samples_per_second"], 2 * median_rate)
            written = _time(r, began[1])  # a time that is no number: as if written as the epoch began
            samples = min(r["samples_accumulated"], int(min(cap, rate * max(0.0, min(written, now) - began[1]))))
            # dated no earlier than its samples at its rate allow: a reader adds rate x age, and a record dated
            # 10^4 s back ended every epoch at once (test_a_samples_liar...); one written since the transition at the
            # rate it gives is not moved (one written before it counts from the transition on, as its samples do)
            written = max(written, began[1] + samples / rate) if rate > 0 else min(written, now)
            kept[p] = dict(r, samples_accumulated=samples, samples_per_second=rate, time=float(written),
                           median_rate=median_rate)  # fmt: skip
            continue
        # (a peer behind has done nothing at this epoch yet: a lone record at an epoch is no median of its own)
        peers_at_epoch = [q["samples_accumulated"] if q["epoch"] == r["epoch"] else 0
                          for q in basis.values() if q["epoch"] <= r["epoch"]]  # fmt: skip
        sample_cap = int(min(cap, max(2 * lower_median(peers_at_epoch), target / (2 * peers))))
        samples, rate = min(r["samples_accumulated"], sample_cap), min(r["samples_per_second"], 4 * median_rate)
        kept[p] = dict(r, samples_accumulated=samples, samples_per_second=rate, cap=sample_cap, median_rate=median_rate)
        written = _time(r, -math.inf)  # a time that is no number: as old as can be
        if rate > 0 and math.isfinite(now) and written < now - (sample_cap - samples) / rate:
            kept[p]["time"] = float(now - (sample_cap - samples) / rate)  # its rate x age stops at the cap
        elif not math.isfinite(written) and math.isfinite(now):
            kept[p]["time"] = float(now)  # (rate 0: an infinite age x 0 is NaN)
    if held is not None:
        hold_lone_leaders(kept, electorate, *held)
    return kept, len(records) - len(kept)


def hold_lone_leaders(kept: dict[str, dict], electorate: Mapping[str, int], epoch: int,
                      last_counted: Mapping[str, int]) -> None:
    """In place: records ahead of the highest epoch a strict majority of the other peers has reached (``epoch``, this
    peer's, if that is higher) count as at it and with no rate: at ``epoch`` with the samples their writer's record
    last counted there (``last_counted``; 0 if none), at an epoch ahead of it with none.

    hivemind ends a peer's epoch at once when any followed record is one epoch ahead (a peer that missed its group's
    round catches up), and EPOCH_SLACK lets one record be: a liar publishing its epoch + 1 ended every honest epoch
    as it began, and no honest round formed (test_a_liar_one_epoch_ahead...). Held, it ends none: its samples count
    for nothing. An honest peer ahead alone (the others missed its round) still counts what it did in the epoch, so
    the others end it about when they would have with it. When the honest majority has moved on (this peer ends the
    epoch a moment after them), the liar's record, one ahead of theirs, is held at theirs: followed, it made this
    peer two epochs behind, and hivemind then downloads the state instead of joining their round (1 run in 20 of the
    liar test: that honest peer synced into epoch 4 and missed four of its epochs)."""
    majority = epoch_ceiling(electorate.values(), slack=0)
    at = epoch if majority is None else max(epoch, majority)
    for p, r in kept.items():
        if r["epoch"] > at:
            samples = int(last_counted.get(p, 0)) if at == epoch else 0
            kept[p] = dict(r, epoch=at, samples_accumulated=samples, samples_per_second=0.0)


def _time(record: dict, default: float) -> float:
    """A progress record's own time (hivemind's get_dht_time() when it was written); ``default`` if it has none."""
    t = record.get("time")
    return float(t) if type(t) in (int, float) and math.isfinite(t) else default
