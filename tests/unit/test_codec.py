"""Tensors on the wire (swarm/codec.py): every compression a spec offers round-trips, and no bytes a sender makes
raise anything but ValueError."""

from __future__ import annotations

import pytest
import torch
from hivemind.compression.base import CompressionInfo
from hivemind.proto import runtime_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from atlas_swarm.config import COMPRESSIONS
from atlas_swarm.swarm.codec import BLOCKWISE_4BIT, COMPRESSION, deserialize


def test_every_spec_compression_has_a_codec():
    assert set(COMPRESSION) == set(COMPRESSIONS)


@pytest.mark.parametrize("name, tolerance", [("none", 0.0), ("float16", 1e-3), ("scaled-float16", 1e-3),
                                             ("uniform8bit", 0.05), ("blockwise4bit", 0.1)])
def test_round_trip(name, tolerance):
    torch.manual_seed(0)
    x = torch.randn(81_000) * 1e-3  # a LoRA gradient's scale
    wire = COMPRESSION[name]().compress(x, CompressionInfo.from_tensor(x), allow_inplace=False)
    y = deserialize(wire)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert (y - x).norm() <= tolerance * x.norm()
    if name == "uniform8bit":
        assert len(wire.buffer) < x.numel() * 1.01 + 8 + 256 * 4  # a byte per value plus the codebook
        assert deserialize(wire).equal(y)  # every reader decodes the same bytes to the same tensor
    if name == "blockwise4bit":
        assert len(wire.buffer) == -(-81_000 // 64) * (32 + 4)  # 4 bits per value, a float32 per block of 64
        assert deserialize(wire).equal(y)


def test_4bit_blocks_keep_each_block_scale_and_its_exact_levels():
    # a block of small values beside a block of large ones keeps its own scale (one tensor-wide scale would zero it)
    small, large = torch.linspace(-1e-6, 1e-6, 64), torch.linspace(-5.0, 5.0, 64)
    levels = torch.tensor([-1.0, 0.0, 1.0, 0.5626170039176941, -0.6961928009986877] * 13)[:64] * 3.0
    x = torch.cat([small, large, levels, torch.tensor([7.0])])  # and a last block of one value
    y = deserialize(COMPRESSION["blockwise4bit"]().compress(x, CompressionInfo.from_tensor(x)))
    assert y[:64].abs().max() == pytest.approx(1e-6) and (y[:64] - small).abs().max() <= 0.2e-6
    # no value further from its own than half the widest gap between levels (-1.0 to -0.70) times the scale
    assert y[64:128].abs().max() == 5.0 and (y[64:128] - large).abs().max() <= 0.153 * 5.0
    assert y[128:192].equal(levels.float()) and y[192] == 7.0  # values on the grid come back exactly


@settings(max_examples=300, deadline=None, derandomize=True)
@given(compression=st.sampled_from([runtime_pb2.NONE, runtime_pb2.FLOAT16, runtime_pb2.MEANSTD_16BIT,
                                    runtime_pb2.UNIFORM_8BIT, runtime_pb2.QUANTILE_8BIT, BLOCKWISE_4BIT, 99]),
       buffer=st.binary(max_size=600), size=st.lists(st.integers(0, 300), max_size=3),
       dtype=st.sampled_from(["float32", "float16", "bfloat16", "int64", "", "junk"]))  # fmt: skip
def test_any_bytes_give_a_tensor_or_a_value_error(compression, buffer, size, dtype):
    wire = runtime_pb2.Tensor(compression=compression, buffer=buffer, size=size, dtype=dtype)
    try:
        out = deserialize(wire)
    except ValueError:
        return
    assert isinstance(out, torch.Tensor)
