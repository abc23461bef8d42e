"""Contribution proofs: the EIP-712 typed proof a peer signs each epoch, the data commitment it carries, and the
binding between a libp2p PeerID and an Ethereum address. Pure functions: no network, no chain.

    record.EpochRecord / proof_of   one ended epoch as this peer lived it -> its (unsigned) proof: the one place a
                                    proof is built
    eip712                          the typed proof exactly as the contract hashes it; sign and recover
    receipt.Receipt / receipt_of    the receipt an averaging group co-signs, and the checkpoint vote (EIP-712)
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
from atlas_swarm.proofs.receipt import Member, Receipt, checkpoint_digest, receipt_of, recover, sign_digest
from atlas_swarm.proofs.record import EpochRecord, proof_of

__all__ = [
    "ContributionProof", "Domain", "EpochRecord", "Member", "Receipt", "batch_hash", "binding_message", "chain_run_id",
    "checkpoint_digest", "merkle_root", "peer_id_hash", "proof_of", "receipt_of", "recover", "recover_signer",
    "run_tag", "sign_binding", "sign_digest", "sign_proof", "verify_binding",
]
