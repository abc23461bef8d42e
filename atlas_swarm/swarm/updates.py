"""A groupmate's update on the wire (swarm/gather.py's rounds): signed by its sender, checked by whoever receives it,
directly or through a relay, the request a client-mode member sends a relay for another one's update, and the notice
of a member that refused its pair. The parsers of network bytes (check_update, parse_relay_request, parse_refusal)
return a value, or a reason or None; they never raise."""

from __future__ import annotations

import hashlib
import math
from typing import Optional

import msgpack
import torch
from hivemind.utils.crypto import RSAPublicKey

from atlas_swarm.swarm.codec import deserialize
from atlas_swarm.swarm.node import peer_id_of_key

PROTOCOL = b"atlas-gather-v1"
REFUSAL = b"atlas-refused-pair-v1"
MAX_HEADER = 4096  # header + signature: ~700 bytes with a 2048-bit RSA key
# A stream's tail can be lost on the way (the callee's stream ends as it returns; the caller's p2pd now and then got
# the reset before the last part): the update's digest then does not match, and gather.py asks again.
TRUNCATED = "wrong size, compression or digest"


def sign_update(signer, prefix: str, group_id: bytes, peer_id: str, weight: float, serialized) -> bytes:
    digest = hashlib.sha256(serialized.buffer).digest()
    header = msgpack.packb([PROTOCOL, prefix, group_id, peer_id, float(weight), int(serialized.size[0]) if
                            serialized.size else 0, digest, signer.get_public_key().to_bytes()])  # fmt: skip
    return msgpack.packb([header, signer.sign(header)])


def check_update(blob: bytes, serialized, prefix: str, group_id: bytes, sender: str, numel: int,
                 compression: int) -> tuple[float, torch.Tensor] | str:  # fmt: skip
    """The sender's weight and tensor, or why the update is refused (a few words, for the counts)."""
    try:
        header, signature = msgpack.unpackb(blob, raw=True)
        proto, pre, gid, pid, weight, size, digest, key = msgpack.unpackb(header, raw=True)
        public = RSAPublicKey.from_bytes(key)
    except Exception:
        return "malformed header"
    if (proto, pre, gid, pid) != (PROTOCOL, prefix.encode(), group_id, sender.encode()):
        return "header for another round or sender"
    if peer_id_of_key(public) != sender or not public.verify(header, signature):
        return "bad signature"
    if not isinstance(weight, float) or not math.isfinite(weight) or weight < 0:
        return "weight not finite or negative"
    if serialized.compression != compression or size != numel or hashlib.sha256(serialized.buffer).digest() != digest:
        return TRUNCATED
    try:
        tensor = deserialize(serialized).detach().reshape(-1).float()
    except Exception:
        return "undecodable tensor"
    if tensor.numel() != numel:
        return "wrong size"
    if not bool(torch.isfinite(tensor).all()):
        return "non-finite values"
    return weight, tensor


def relay_request(group_id: bytes, wanted: str) -> bytes:
    return msgpack.packb([group_id, wanted.encode()])


def parse_relay_request(blob) -> Optional[tuple[bytes, str]]:
    """(group id, wanted PeerID) of a relay request's bytes; None for anything else."""
    if not isinstance(blob, bytes) or len(blob) > MAX_HEADER:
        return None
    try:
        group_id, wanted = msgpack.unpackb(blob, raw=True)
        if isinstance(group_id, bytes) and isinstance(wanted, bytes):
            return group_id, wanted.decode("ascii")
    except Exception:
        pass
    return None


def refusal(group_id: bytes) -> bytes:
    """What a member that refused its pair (gather.PAIR_REFUSED) sends instead of an update: its partner ends the round
    at once instead of waiting WAIT for an update that will not come. Unsigned: only the member itself, over its own
    authenticated connection, can refuse for itself, and a refusal costs nobody more than sending nothing."""
    return msgpack.packb([REFUSAL, group_id])


def parse_refusal(blob) -> Optional[bytes]:
    """The group id of a refusal's bytes; None for anything else."""
    if not isinstance(blob, bytes) or len(blob) > MAX_HEADER:
        return None
    try:
        kind, group_id = msgpack.unpackb(blob, raw=True)
        if kind == REFUSAL and isinstance(group_id, bytes):
            return group_id
    except Exception:
        pass
    return None
