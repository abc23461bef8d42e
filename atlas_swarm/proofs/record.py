"""One ended epoch as this peer lived it, and the contribution proof built from it: the only place a proof is
assembled (chain/ signs, stores and posts what this returns)."""

from __future__ import annotations

from dataclasses import dataclass, field

from eth_utils import to_checksum_address

from atlas_swarm.proofs.commit import merkle_root
from atlas_swarm.proofs.eip712 import ContributionProof, peer_id_hash


@dataclass(frozen=True)
class EpochRecord:
    """Handed to each epoch hook: what a contribution proof or a checkpoint publisher needs."""

    run_id: str
    peer_id: str
    ended: int  # the epoch this peer's samples went into: the epoch its proof claims
    epoch: int  # the epoch the swarm moved to; ``adapter`` is the adapter this epoch starts from
    samples: int  # samples this peer put into the ended epoch
    group: tuple[str, ...]  # PeerIDs it averaged with (empty: local gradients only)
    adapter_hash: str  # hex sha256 of ``adapter`` (model.hashing.tensors_hash)
    batch_hashes: tuple[bytes, ...] = ()  # proofs.commit.batch_hash of each batch trained on in the ended epoch
    adapter: dict = field(repr=False, compare=False, default_factory=dict)  # name -> CPU tensor
    weights: tuple[float, ...] = ()  # each ``group`` member's weight in the round, after clamping
    flagged: tuple[str, ...] = ()  # members the robust rule clipped or trimmed hard
    result_hash: str = ""  # hex sha256 of the round's aggregate (swarm/gather.py): the receipt's resultHash


def proof_of(record: EpochRecord, run: bytes, peer: str, deadline: int) -> ContributionProof:
    """The proof that ``peer`` (an address bound to the record's PeerID) contributed to on-chain run ``run``."""
    return ContributionProof(
        run_id=run, epoch=record.ended, peer=to_checksum_address(peer), peer_id_hash=peer_id_hash(record.peer_id),
        samples=record.samples, adapter_hash=bytes.fromhex(record.adapter_hash),
        data_root=merkle_root(record.batch_hashes), deadline=deadline,
    )  # fmt: skip
