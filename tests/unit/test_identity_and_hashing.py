import os
import stat

import pytest
import torch

from atlas_swarm.errors import ConfigError
from atlas_swarm.identity import Identity
from atlas_swarm.model.hashing import shapes_hash, tensors_hash


def test_identity_is_created_0600_and_stable(tmp_path):
    path = tmp_path / "sub" / "id.key"
    first = Identity.load_or_create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert Identity.load_or_create(path).peer_id == first.peer_id

def test_identity_matches_hivemind_and_p2pd(tmp_path):
    """Our libp2p encodings (key file, PeerID) are the ones hivemind and p2pd read: same PeerID, and hivemind's key
    object signs what our public key verifies."""
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.p2p import PeerID
    from hivemind.proto import crypto_pb2

    from atlas_swarm.swarm.node import hivemind_key, peer_id_of_owner

    ours = Identity.load_or_create(tmp_path / "id.key")
    blob = (tmp_path / "id.key").read_bytes()
    assert PeerID.from_identity(blob).to_base58() == ours.peer_id
    assert crypto_pb2.PrivateKey.FromString(blob).key_type == crypto_pb2.KeyType.RSA
    key = hivemind_key(ours)
    assert key.get_public_key().verify(b"payload", key.sign(b"payload"))
    assert peer_id_of_owner(RSASignatureValidator(key).local_public_key) == ours.peer_id
    # a key file written by hivemind's own protobuf loads to the same PeerID
    hm = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=ours.private_der()).SerializeToString()
    (tmp_path / "hm.key").write_bytes(hm)
    assert Identity.load_or_create(tmp_path / "hm.key").peer_id == ours.peer_id


def test_corrupted_identity_is_refused_and_kept(tmp_path):
    path = tmp_path / "id.key"
    path.write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="not a libp2p RSA private key"):
        Identity.load_or_create(path)
    assert path.read_bytes() == b"garbage"


def test_tensors_hash_is_canonical():
    a = {"x": torch.arange(6.0).reshape(2, 3), "y": torch.zeros(2)}
    assert tensors_hash(a) == tensors_hash(dict(reversed(list(a.items()))))
    assert tensors_hash(a) != tensors_hash({**a, "y": torch.ones(2)})
    assert tensors_hash(a) != tensors_hash({**a, "x": a["x"].reshape(3, 2)})
    assert tensors_hash(a) != tensors_hash({**a, "x": a["x"].double()})
    assert shapes_hash(a) == shapes_hash({**a, "y": torch.ones(2)})
    assert shapes_hash(a) != shapes_hash({**a, "y": torch.ones(3)})
