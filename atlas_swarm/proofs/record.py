"""One ended epoch as this peer lived it: what the epoch hooks (the chain session's receipt, the publisher) get."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EpochRecord:
    """Handed to each epoch hook: what a receipt or a checkpoint publisher needs."""

    run_id: str
    peer_id: str
    ended: int  # the epoch this peer's samples went into: the epoch its receipt names
    epoch: int  # the epoch the swarm moved to; ``adapter`` is the adapter this epoch starts from
    samples: int  # samples this peer put into the ended epoch
    group: tuple[str, ...]  # PeerIDs it averaged with (empty: local gradients only)
    adapter_hash: str  # hex sha256 of ``adapter`` (model.hashing.tensors_hash)
    adapter: dict = field(repr=False, compare=False, default_factory=dict)  # name -> CPU tensor
    weights: tuple[float, ...] = ()  # each ``group`` member's weight in the round, after clamping
    flagged: tuple[str, ...] = ()  # members the robust rule clipped or trimmed hard
    result_hash: str = ""  # hex sha256 of the round's aggregate (swarm/gather.py): the receipt's resultHash
    clients: tuple[str, ...] = ()  # ``group`` members in client mode: nobody can dial them (behind NAT)
