"""What a peer signs for the chain: the receipt its averaging group co-signs after each round, the checkpoint vote,
and the binding between a libp2p PeerID and an Ethereum address. Pure functions: no network, no chain.

    record.EpochRecord               one ended epoch as this peer lived it (what the epoch hooks get)
    receipt.Receipt / receipt_of     the group's receipt and the checkpoint vote as EIP-712 typed data; sign, recover
    eip712                           the contract's EIP-712 domain, run ids and PeerID hashes
    binding                          PeerID <-> address binding signatures
"""

import importlib

# Imported on first use (PEP 562): eth_account takes most of a second, and a peer without a chain needs none of it.
_WHERE = {
    "binding": ["binding_message", "sign_binding", "verify_binding"],
    "eip712": ["Domain", "chain_run_id", "peer_id_hash", "run_tag"],
    "receipt": ["Member", "Receipt", "checkpoint_digest", "receipt_of", "recover", "sign_digest"],
    "record": ["EpochRecord"],
}
_MODULE = {name: module for module, names in _WHERE.items() for name in names}
__all__ = sorted(_MODULE)


def __getattr__(name: str):
    if name not in _MODULE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE[name]}"), name)
