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


def sane_progress(records: Mapping[str, dict], own: str, admits: Callable[[str], bool],
                  cap: int) -> tuple[dict[str, dict], int]:  # fmt: skip
    """The progress records to follow (PeerID -> record, clamped) and how many were refused.

    A record counts only if its writer is admitted and its epoch is under the ceiling of the *other* admitted
    records (a newcomer at epoch 0 must still follow the swarm ahead of it); its samples are capped at ``cap`` and
    its rate at 4x the rate a majority reports at most (an infinite rate would end every epoch at once)."""
    admitted = {p: r for p, r in records.items() if p == own or admits(p)}
    ceiling = epoch_ceiling(r["epoch"] for p, r in admitted.items() if p != own)
    rates = sorted(r["samples_per_second"] for p, r in admitted.items() if math.isfinite(r["samples_per_second"]))
    rate_cap = 4 * rates[(len(rates) - 1) // 2] if rates else 0.0
    kept = {
        p: dict(r, samples_accumulated=min(r["samples_accumulated"], cap),
                samples_per_second=min(r["samples_per_second"], rate_cap))  # fmt: skip
        for p, r in admitted.items() if p == own or ceiling is None or r["epoch"] <= ceiling
    }
    return kept, len(records) - len(kept)
