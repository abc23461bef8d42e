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
    data = b"payload"
    assert first.private_key.get_public_key().verify(data, first.private_key.sign(data))


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
