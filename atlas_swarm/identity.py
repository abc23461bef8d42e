"""A peer's persistent libp2p identity: one RSA key that fixes its PeerID and signs its DHT records.

The file is the libp2p protobuf that p2pd reads (so the PeerID is the same across restarts), written with mode 0600.
The same key signs our DHT records, so a record "owned" by a PeerID can only be written by that peer. swarm/ hands
the key to hivemind; this module needs no hivemind (libp2p's key and PeerID encodings are written out below).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from atlas_swarm.encoding import b58decode, b58encode, pb_bytes, pb_fields, pb_uint
from atlas_swarm.errors import ConfigError

_RSA = 0  # libp2p crypto.proto: KeyType.RSA


@dataclass(frozen=True)
class Identity:
    path: Path
    key: rsa.RSAPrivateKey
    peer_id: str  # base58

    @classmethod
    def load_or_create(cls, path: str | Path) -> "Identity":
        """Load the key at ``path``; create it (mode 0600, parent folders too) if it does not exist yet."""
        path = Path(path)
        if not path.exists():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
                der = key.private_bytes(
                    serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
                )
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(_key_proto(_RSA, der))
            except OSError as e:
                raise ConfigError(f"Cannot create identity file {str(path)!r}: {e.strerror}. Pick a writable --identity.")
        try:
            blob = path.read_bytes()
            key_type, der = _parse_key_proto(blob)
            if key_type != _RSA:
                raise ValueError("not an RSA key")
            key = serialization.load_der_private_key(der, password=None)
            if not isinstance(key, rsa.RSAPrivateKey):
                raise ValueError("not an RSA key")
        except OSError as e:
            raise ConfigError(f"Cannot read identity file {str(path)!r}: {e.strerror}.") from None
        except Exception:
            raise ConfigError(
                f"Identity file {str(path)!r} is not a libp2p RSA private key (corrupted?). Move it away to create "
                f"a new identity (this changes your PeerID)."
            ) from None
        return cls(path=path, key=key, peer_id=peer_id_of(key.public_key()))

    def private_der(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
                                      serialization.NoEncryption())  # fmt: skip


def peer_id_of(public_key: rsa.RSAPublicKey) -> str:
    """The libp2p PeerID (base58) of an RSA public key: the sha2-256 multihash of its PublicKey protobuf."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return b58encode(b"\x12\x20" + hashlib.sha256(_key_proto(_RSA, der)).digest())


def peer_id_bytes(peer_id: str) -> bytes:
    """A base58 PeerID's raw multihash bytes (what the contract hashes); ValueError if it is not base58."""
    return b58decode(peer_id)


def _key_proto(key_type: int, data: bytes) -> bytes:
    """libp2p's PublicKey/PrivateKey protobuf (proto2): field 1 the key type, field 2 the key bytes."""
    return pb_uint(1, key_type) + pb_bytes(2, data)


def _parse_key_proto(blob: bytes) -> tuple[int, bytes]:
    fields = dict(pb_fields(blob))
    key_type, data = fields.get(1), fields.get(2)
    if not isinstance(key_type, int) or not isinstance(data, bytes) or set(fields) - {1, 2}:
        raise ValueError("not a libp2p key")
    return key_type, data
