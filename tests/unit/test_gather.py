"""What a member checks in each groupmate's update before it aggregates it (swarm/gather.py): one bad update costs its
sender that round, never the round itself, and no bytes from the network raise."""

import msgpack
import pytest
import torch
from hivemind.compression import Float16Compression, NoCompression
from hivemind.compression.base import CompressionInfo
from hivemind.proto import runtime_pb2
from hivemind.utils.crypto import RSAPrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from atlas_swarm.swarm.gather import check_update, sign_update
from atlas_swarm.swarm.node import peer_id_of_key

KEY = RSAPrivateKey()
PEER = peer_id_of_key(KEY.get_public_key())
GROUP, PREFIX, NUMEL = b"g" * 20, "run_grad_averager", 12
NONE = runtime_pb2.CompressionType.NONE


def serialized(values, compression=NoCompression()):
    t = torch.as_tensor(values, dtype=torch.float32)
    return compression.compress(t, CompressionInfo.from_tensor(t), allow_inplace=False)


def update(values=None, weight=8.0, key=KEY, peer=PEER, group=GROUP):
    s = serialized(torch.arange(NUMEL, dtype=torch.float32) if values is None else values)
    return sign_update(key, PREFIX, group, peer, weight, s), s


def check(blob, s, sender=PEER):
    return check_update(blob, s, PREFIX, GROUP, sender, NUMEL, NONE)


def test_a_good_update_gives_its_weight_and_tensor():
    weight, tensor = check(*update())
    assert weight == 8.0 and torch.equal(tensor, torch.arange(NUMEL, dtype=torch.float32))


@pytest.mark.parametrize("bad, why", [
    (dict(values=torch.full((NUMEL,), float("nan"))), "non-finite values"),
    (dict(values=torch.zeros(NUMEL + 1)), "wrong size"),
    (dict(weight=-1.0), "weight not finite or negative"),
    (dict(weight=float("inf")), "weight not finite or negative"),
    (dict(key=RSAPrivateKey()), "bad signature"),  # signed by another key than the sender's PeerID
    (dict(group=b"h" * 20), "another round"),  # replayed from another round
])  # fmt: skip
def test_a_bad_update_is_refused_with_its_reason(bad, why):
    assert why in check(*update(**bad))


def test_an_update_sent_for_another_peer_is_refused():
    other = peer_id_of_key(RSAPrivateKey().get_public_key())
    assert "another round or sender" in check(*update(), sender=other)


def test_a_tampered_tensor_or_compression_is_refused():
    blob, s = update()
    tampered = runtime_pb2.Tensor()
    tampered.CopyFrom(s)
    tampered.buffer = bytes(len(s.buffer))
    assert "digest" in check(blob, tampered)
    half = serialized(torch.zeros(NUMEL), Float16Compression())  # well signed, but not the run's compression
    assert "compression" in check(sign_update(KEY, PREFIX, GROUP, PEER, 8.0, half), half)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048), st.binary(max_size=256), st.sampled_from([0, 1, 2, 3]),
       st.lists(st.integers(0, 64), max_size=3))  # fmt: skip
def test_no_bytes_from_a_groupmate_raise(blob, buffer, compression, size):
    s = runtime_pb2.Tensor(buffer=buffer, compression=compression, size=size, dtype="float32")
    assert isinstance(check(blob, s), str)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=64), st.floats(), st.integers(-2**63, 2**64 - 1), st.text(max_size=8)),
                max_size=10))
def test_no_well_formed_msgpack_of_the_wrong_shape_raises(fields):
    s = serialized(torch.zeros(NUMEL))
    assert isinstance(check(msgpack.packb([msgpack.packb(fields), b"sig"]), s), str)
