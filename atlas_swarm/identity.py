"""A peer's persistent libp2p identity: one RSA key that fixes its PeerID and signs its DHT records.

The file is the libp2p protobuf that p2pd reads (so the PeerID is the same across restarts), written with mode 0600.
The same key signs our DHT records, so a record "owned" by a PeerID can only be written by that peer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey

from atlas_swarm.errors import ConfigError


@dataclass(frozen=True)
class Identity:
    path: Path
    private_key: RSAPrivateKey
    peer_id: PeerID

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
                blob = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=der).SerializeToString()
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(blob)
            except OSError as e:
                raise ConfigError(f"Cannot create identity file {str(path)!r}: {e.strerror}. Pick a writable --identity.")
        try:
            blob = path.read_bytes()
            proto = crypto_pb2.PrivateKey.FromString(blob)
            if proto.key_type != crypto_pb2.KeyType.RSA:
                raise ValueError("not an RSA key")
            der_key = serialization.load_der_private_key(proto.data, password=None)
        except OSError as e:
            raise ConfigError(f"Cannot read identity file {str(path)!r}: {e.strerror}.") from None
        except Exception:
            raise ConfigError(
                f"Identity file {str(path)!r} is not a libp2p RSA private key (corrupted?). Move it away to create "
                f"a new identity (this changes your PeerID)."
            ) from None
        private_key = RSAPrivateKey.__new__(RSAPrivateKey)
        private_key._private_key = der_key  # hivemind's RSAPrivateKey has no from-bytes constructor
        return cls(path=path, private_key=private_key, peer_id=PeerID.from_identity(blob))
