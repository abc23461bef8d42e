"""PeerID <-> Ethereum address binding, provable both ways.

On chain, ``registerPeer(peerIdHash)`` is sent from the address (address -> PeerID). In the DHT, the peer publishes a
record signed by its libp2p key (PeerID -> address) that also carries this address's signature of
``binding_message`` (so the address agreed). An on-chain binding without such a record is ignored: anyone can
register someone else's PeerID hash, but nobody else can sign for that PeerID.
"""

from __future__ import annotations

from eth_account import Account
from eth_account.messages import encode_defunct


def binding_message(peer_id: str, address: str) -> str:
    return f"atlas-swarm binding: libp2p PeerID {peer_id} belongs to Ethereum address {address.lower()}"


def sign_binding(peer_id: str, private_key) -> bytes:
    account = Account.from_key(private_key)
    return bytes(Account.sign_message(encode_defunct(text=binding_message(peer_id, account.address)), private_key).signature)


def verify_binding(peer_id: str, address: str, signature: bytes) -> bool:
    try:
        signer = Account.recover_message(encode_defunct(text=binding_message(peer_id, address)), signature=signature)
    except Exception:
        return False
    return signer.lower() == address.lower()
