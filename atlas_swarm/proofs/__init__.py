"""Contribution proofs: the EIP-712 typed proof a peer signs each epoch, the data commitment it carries, and the
binding between a libp2p PeerID and an Ethereum address. Pure functions: no network, no chain.

    record.EpochRecord / proof_of   one ended epoch as this peer lived it -> its (unsigned) proof: the one place a
                                    proof is built
    eip712                          the typed proof exactly as the contract hashes it; sign and recover
    commit                          batch hashes and their Merkle root (the proof's data commitment)
    binding                         PeerID <-> address binding signatures
"""

from atlas_swarm.proofs.binding import binding_message, sign_binding, verify_binding
from atlas_swarm.proofs.commit import batch_hash, merkle_root
from atlas_swarm.proofs.eip712 import (
    ContributionProof,
    Domain,
    chain_run_id,
    peer_id_hash,
    recover_signer,
    run_tag,
    sign_proof,
)
from atlas_swarm.proofs.record import EpochRecord, proof_of

__all__ = [
    "ContributionProof", "Domain", "EpochRecord", "batch_hash", "binding_message", "chain_run_id", "merkle_root",
    "peer_id_hash", "proof_of", "recover_signer", "run_tag", "sign_binding", "sign_proof", "verify_binding",
]
