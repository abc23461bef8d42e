"""The contribution proof as EIP-712 typed data, exactly as contracts/src/AtlasStaking.sol hashes it.

The domain (name "AtlasStaking", version "1", chain id, contract address) binds a signature to one deployment on one
chain, so a proof cannot be replayed elsewhere. ``ContributionProof.digest(domain)`` equals the contract's
``proofDigest(proof)``; tests check that against a real EVM.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from eth_account import Account
from eth_account.messages import _hash_eip191_message, encode_typed_data
from eth_utils import keccak, to_checksum_address

from atlas_swarm.identity import peer_id_bytes

PROOF_FIELDS = [
    {"name": "runId", "type": "bytes32"},
    {"name": "epoch", "type": "uint64"},
    {"name": "peer", "type": "address"},
    {"name": "peerIdHash", "type": "bytes32"},
    {"name": "samples", "type": "uint64"},
    {"name": "adapterHash", "type": "bytes32"},
    {"name": "dataRoot", "type": "bytes32"},
    {"name": "deadline", "type": "uint64"},
]
PROOF_TYPEHASH = keccak(text="Proof(" + ",".join(f"{f['type']} {f['name']}" for f in PROOF_FIELDS) + ")")
DOMAIN_FIELDS = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]


def run_tag(run_id: str) -> bytes:
    """What a trainer passes to createRun: keccak256 of the run id string."""
    return keccak(text=run_id)


def chain_run_id(run_id: str, trainer: str) -> bytes:
    """On-chain id of a run: keccak256(abi.encode(trainer, run_tag)), the contract's runIdOf. It names the trainer,
    so nobody else can open (squat) the run a spec describes, or take back money sent to it."""
    return keccak(bytes(12) + bytes.fromhex(to_checksum_address(trainer)[2:]) + run_tag(run_id))


def peer_id_hash(peer_id: str) -> bytes:
    """On-chain id of a libp2p PeerID: keccak256 of its raw multihash bytes (PeerID given in base58)."""
    return keccak(peer_id_bytes(peer_id))


@dataclass(frozen=True)
class Domain:
    chain_id: int
    contract: str
    name: str = "AtlasStaking"
    version: str = "1"

    def as_dict(self) -> dict:
        return {"name": self.name, "version": self.version, "chainId": self.chain_id,
                "verifyingContract": to_checksum_address(self.contract)}  # fmt: skip


@dataclass(frozen=True)
class ContributionProof:
    run_id: bytes  # 32 bytes, chain_run_id()
    epoch: int
    peer: str  # checksummed address
    peer_id_hash: bytes
    samples: int
    adapter_hash: bytes  # 32 bytes: sha256 of the averaged adapter (model.hashing.tensors_hash)
    data_root: bytes  # 32 bytes: proofs.commit.merkle_root of the batches trained on
    deadline: int  # unix seconds

    def message(self) -> dict:
        return {"runId": self.run_id, "epoch": self.epoch, "peer": to_checksum_address(self.peer),
                "peerIdHash": self.peer_id_hash, "samples": self.samples, "adapterHash": self.adapter_hash,
                "dataRoot": self.data_root, "deadline": self.deadline}  # fmt: skip

    def as_tuple(self) -> tuple:
        """The struct as the contract's ABI takes it."""
        m = self.message()
        return tuple(m[f["name"]] for f in PROOF_FIELDS)

    def typed_data(self, domain: Domain) -> dict:
        return {"types": {"EIP712Domain": DOMAIN_FIELDS, "Proof": PROOF_FIELDS}, "primaryType": "Proof",
                "domain": domain.as_dict(), "message": self.message()}  # fmt: skip

    def digest(self, domain: Domain) -> bytes:
        return _hash_eip191_message(encode_typed_data(full_message=self.typed_data(domain)))

    def to_json(self) -> dict:
        d = asdict(self)
        return {k: ("0x" + v.hex() if isinstance(v, bytes) else v) for k, v in d.items()}

    @classmethod
    def from_json(cls, d: dict) -> "ContributionProof":
        b = {k: bytes.fromhex(d[k][2:]) for k in ("run_id", "peer_id_hash", "adapter_hash", "data_root")}
        return cls(epoch=int(d["epoch"]), peer=to_checksum_address(d["peer"]), samples=int(d["samples"]),
                   deadline=int(d["deadline"]), **b)  # fmt: skip


def sign_proof(proof: ContributionProof, domain: Domain, private_key) -> bytes:
    """65-byte signature (r, s, v) of the proof's EIP-712 digest."""
    signed = Account.sign_message(encode_typed_data(full_message=proof.typed_data(domain)), private_key)
    return bytes(signed.signature)


def recover_signer(proof: ContributionProof, domain: Domain, signature: bytes) -> str:
    return Account._recover_hash(proof.digest(domain), signature=signature)
