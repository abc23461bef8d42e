"""The one rule by which peers that cannot trust any single record agree: the value most voters hold wins, and a
tie goes to the smallest value, so every reader picks the same one. Pure: no network.

Used for the final adapter (swarm/consensus.py), the vouched checkpoint (checkpoints/vouch.py), the adapter shapes a
newcomer must match (swarm/records.py) and the runs a bootstrap keeper keeps (checkpoints/keeper.py).
"""

from __future__ import annotations

from collections import Counter
from typing import Hashable, Iterable, Mapping, Optional


def ranked(votes: Mapping[Hashable, int]) -> list:
    """The values, most votes first; equal votes, smallest value first."""
    return sorted(votes, key=lambda v: (-votes[v], v))


def majority(votes: Mapping[Hashable, int] | Iterable[Hashable]) -> Optional[Hashable]:
    """The value with the most votes (a mapping value -> votes, or one vote per item); ties go to the smallest.
    None if there are no votes."""
    votes = votes if isinstance(votes, Mapping) else Counter(votes)
    return min(votes, key=lambda v: (-votes[v], v)) if votes else None


def strict_majority(values: Iterable[Hashable]) -> Optional[Hashable]:
    """The value more than half of ``values`` hold, or None."""
    votes = Counter(values)
    top = majority(votes)
    return top if top is not None and 2 * votes[top] > sum(votes.values()) else None
