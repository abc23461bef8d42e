"""What a peer signs for the chain: the receipt its averaging group co-signs after each round, the checkpoint vote,
and the binding between a libp2p PeerID and an Ethereum address. Pure functions: no network, no chain.

    record.EpochRecord               one ended epoch as this peer lived it (what the epoch hooks get)
    receipt.Receipt / receipt_of     the group's receipt and the checkpoint vote as EIP-712 typed data; sign, recover
    eip712                           the contract's EIP-712 domain, run ids and PeerID hashes
    binding                          PeerID <-> address binding signatures
"""

from atlas_swarm.proofs.binding import binding_message, sign_binding, verify_binding
from atlas_swarm.proofs.eip712 import Domain, chain_run_id, peer_id_hash, run_tag
from atlas_swarm.proofs.receipt import Member, Receipt, checkpoint_digest, receipt_of, recover, sign_digest
from atlas_swarm.proofs.record import EpochRecord

__all__ = [
    "Domain", "EpochRecord", "Member", "Receipt", "binding_message", "chain_run_id", "checkpoint_digest",
    "peer_id_hash", "receipt_of", "recover", "run_tag", "sign_binding", "sign_digest", "verify_binding",
]
