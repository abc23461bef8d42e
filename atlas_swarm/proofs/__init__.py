"""Contribution proofs: the EIP-712 typed proof a peer signs each epoch, the data commitment it carries, and the
binding between a libp2p PeerID and an Ethereum address. Pure functions: no network, no chain."""

from atlas_swarm.proofs.binding import binding_message, sign_binding, verify_binding
from atlas_swarm.proofs.commit import batch_hash, merkle_root
from atlas_swarm.proofs.eip712 import (
    ContributionProof, Domain, chain_run_id, peer_id_hash, recover_signer, run_tag, sign_proof,
)

__all__ = [
    "ContributionProof", "Domain", "batch_hash", "binding_message", "chain_run_id", "merkle_root", "peer_id_hash",
    "recover_signer", "run_tag", "sign_binding", "sign_proof", "verify_binding",
]
