"""The receipt an averaging group co-signs, and the checkpoint vote, as EIP-712 typed data exactly as
contracts/src/AtlasStaking.sol hashes them (``Receipt.digest(domain)`` equals the contract's ``receiptDigest``;
tests check that against a real EVM).

A receipt says what one round was: run, epoch, the members (wallet, PeerID hash, the weight each had after clamping,
whether the robust rule flagged it) sorted by wallet, and the hash of the aggregate the round produced. Honest
members compute the same aggregate bit for bit (swarm/gather.py), so they build the same receipt and their
signatures add up; the contract pays a member only with signatures of more than half of the members listed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from eth_account import Account
from eth_account.messages import _hash_eip191_message, encode_typed_data
from eth_utils import keccak, to_checksum_address

from atlas_swarm.proofs.eip712 import DOMAIN_FIELDS, Domain, peer_id_hash

MEMBER_FIELDS = [
    {"name": "wallet", "type": "address"},
    {"name": "peerIdHash", "type": "bytes32"},
    {"name": "weight", "type": "uint64"},
    {"name": "flagged", "type": "bool"},
]
RECEIPT_FIELDS = [
    {"name": "runId", "type": "bytes32"},
    {"name": "epoch", "type": "uint64"},
    {"name": "resultHash", "type": "bytes32"},
    {"name": "members", "type": "Member[]"},
]
CHECKPOINT_FIELDS = [
    {"name": "runId", "type": "bytes32"},
    {"name": "epoch", "type": "uint64"},
    {"name": "cidDigest", "type": "bytes32"},
]
MAX_MEMBERS = 64  # the contract's MAX_MEMBERS
_MEMBER_TYPE = "Member(" + ",".join(f"{f['type']} {f['name']}" for f in MEMBER_FIELDS) + ")"
RECEIPT_TYPEHASH = keccak(text="Receipt(" + ",".join(f"{f['type']} {f['name']}" for f in RECEIPT_FIELDS) + ")"
                          + _MEMBER_TYPE)  # fmt: skip


@dataclass(frozen=True)
class Member:
    wallet: str  # checksummed address
    peer_id_hash: bytes  # 32 bytes
    weight: int
    flagged: bool = False

    def message(self) -> dict:
        return {"wallet": to_checksum_address(self.wallet), "peerIdHash": self.peer_id_hash, "weight": self.weight,
                "flagged": self.flagged}  # fmt: skip


@dataclass(frozen=True)
class Receipt:
    run_id: bytes  # 32 bytes: chain_run_id()
    epoch: int
    result_hash: bytes  # 32 bytes: sha256 of the round's aggregate
    members: tuple[Member, ...]  # sorted by wallet

    def message(self) -> dict:
        return {"runId": self.run_id, "epoch": self.epoch, "resultHash": self.result_hash,
                "members": [m.message() for m in self.members]}  # fmt: skip

    def as_tuple(self) -> tuple:
        """The struct as the contract's ABI takes it."""
        members = [(to_checksum_address(m.wallet), m.peer_id_hash, m.weight, m.flagged) for m in self.members]
        return self.run_id, self.epoch, self.result_hash, members

    def typed_data(self, domain: Domain) -> dict:
        return {"types": {"EIP712Domain": DOMAIN_FIELDS, "Receipt": RECEIPT_FIELDS, "Member": MEMBER_FIELDS},
                "primaryType": "Receipt", "domain": domain.as_dict(), "message": self.message()}  # fmt: skip

    def digest(self, domain: Domain) -> bytes:
        return _hash_eip191_message(encode_typed_data(full_message=self.typed_data(domain)))

    def index(self, wallet: str) -> Optional[int]:
        wallet = wallet.lower()
        return next((i for i, m in enumerate(self.members) if m.wallet.lower() == wallet), None)

    def to_json(self) -> dict:
        return {"run_id": "0x" + self.run_id.hex(), "epoch": self.epoch, "result_hash": "0x" + self.result_hash.hex(),
                "members": [{"wallet": m.wallet, "peer_id_hash": "0x" + m.peer_id_hash.hex(), "weight": m.weight,
                             "flagged": m.flagged} for m in self.members]}  # fmt: skip

    @classmethod
    def from_json(cls, d: dict) -> "Receipt":
        members = tuple(Member(to_checksum_address(m["wallet"]), bytes.fromhex(m["peer_id_hash"][2:]),
                               int(m["weight"]), bool(m["flagged"])) for m in d["members"])  # fmt: skip
        return cls(bytes.fromhex(d["run_id"][2:]), int(d["epoch"]), bytes.fromhex(d["result_hash"][2:]), members)


def receipt_of(run: bytes, epoch: int, result_hash: str, group: Sequence[str], weights: Sequence[float],
               flagged: Sequence[str], wallets: Mapping[str, str]) -> Optional[Receipt]:  # fmt: skip
    """The receipt of one round as every honest member builds it: the aggregated members (``group``, with their
    ``weights`` after clamping, ``flagged`` ones marked) that have a verified wallet binding, sorted by wallet. None
    when fewer than two such members remain (a solo epoch is not paid)."""
    members = [Member(to_checksum_address(wallets[pid]), peer_id_hash(pid), int(w), pid in flagged)
               for pid, w in zip(group, weights) if pid in wallets]  # fmt: skip
    members.sort(key=lambda m: int(m.wallet, 16))
    if len(members) < 2 or len(members) > MAX_MEMBERS or len({m.wallet for m in members}) < len(members):
        return None
    return Receipt(run, epoch, bytes.fromhex(result_hash), tuple(members))


def checkpoint_typed_data(run: bytes, epoch: int, cid_digest: bytes, domain: Domain) -> dict:
    return {"types": {"EIP712Domain": DOMAIN_FIELDS, "Checkpoint": CHECKPOINT_FIELDS}, "primaryType": "Checkpoint",
            "domain": domain.as_dict(), "message": {"runId": run, "epoch": epoch, "cidDigest": cid_digest}}  # fmt: skip


def checkpoint_digest(run: bytes, epoch: int, cid_digest: bytes, domain: Domain) -> bytes:
    return _hash_eip191_message(encode_typed_data(full_message=checkpoint_typed_data(run, epoch, cid_digest, domain)))


def sign_digest(digest: bytes, private_key) -> bytes:
    """65-byte signature (r, s, v) of an EIP-712 digest (a receipt's or a checkpoint vote's)."""
    return bytes(Account.unsafe_sign_hash(digest, private_key).signature)  # "unsafe": a raw digest; ours are EIP-712


def recover(digest: bytes, signature: bytes) -> Optional[str]:
    """The address that signed ``digest``, or None for bytes that are no signature."""
    try:
        return Account._recover_hash(digest, signature=bytes(signature))
    except Exception:
        return None
