"""The EIP-712 domain of contracts/src/AtlasStaking.sol and the ids the contract uses for runs and PeerIDs.

The domain (name "AtlasStaking", version "1", chain id, contract address) binds a signature to one deployment on one
chain, so a receipt or a vote cannot be replayed elsewhere (proofs/receipt.py signs under it).
"""

from __future__ import annotations

from dataclasses import dataclass

from eth_utils import keccak, to_checksum_address

from atlas_swarm.identity import peer_id_bytes

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
