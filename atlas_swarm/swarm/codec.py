"""Tensors on the wire: hivemind's serialization and compressions, with its 8-bit extract mended for numpy 2.

hivemind 1.1.12 reads an 8-bit tensor's codebook size with ``int(np.frombuffer(..., count=1))``: numpy 2 refuses
to convert a 1-element array, so every round and state download of a ``compression = "uniform8bit"`` run raised
TypeError (found by ``bench_averaging.py --compression``: 0 of 28 rounds averaged). ``Uniform8Bit`` reads it the
numpy 2 way and keeps hivemind's wire format, and ``deserialize`` is what every reader here calls.

``Blockwise4Bit`` is ours (hivemind's codecs stop at 8 bits): blocks of 64 values, each sent as its absolute maximum
(float32) and 64 4-bit indices into QLoRA's NormalFloat levels scaled by it, 0.5625 bytes per value. Its wire type is
``BLOCKWISE_4BIT``, a value hivemind's enum does not name (proto3 enums are open; no hivemind reader is given one).
"""

from __future__ import annotations

import numpy as np
import torch
from hivemind.compression import (
    Float16Compression,
    NoCompression,
    ScaledFloat16Compression,
    Uniform8BitQuantization,
    deserialize_torch_tensor,
)
from hivemind.compression.base import CompressionBase, CompressionInfo
from hivemind.proto import runtime_pb2


class Uniform8Bit(Uniform8BitQuantization):
    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        serialized = serialized_tensor
        buffer = serialized.buffer
        codebook_size = int(np.frombuffer(buffer, count=1, dtype=np.int64)[0])
        codebook = np.frombuffer(buffer, offset=8, count=codebook_size, dtype=self.codebook_dtype)
        quantized = np.frombuffer(buffer, offset=8 + codebook.nbytes, dtype=self.indices_dtype)
        quantized = torch.as_tensor(quantized, dtype=torch.int64).reshape(tuple(serialized.size))
        codebook = torch.as_tensor(codebook).to(dtype=getattr(torch, serialized.dtype))
        return codebook[quantized].requires_grad_(serialized.requires_grad)


BLOCKWISE_4BIT = 64  # not one of runtime_pb2.CompressionType's values
BLOCK = 64
# QLoRA's NF4 levels (Dettmers et al. 2023, bitsandbytes' table): quantiles of a normal distribution scaled to [-1, 1]
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0])  # fmt: skip
_MIDPOINTS = (NF4[1:] + NF4[:-1]) / 2


class Blockwise4Bit(CompressionBase):
    compression_type = BLOCKWISE_4BIT

    def compress(self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False) -> runtime_pb2.Tensor:
        flat = tensor.detach().reshape(-1).float().cpu()
        n = flat.numel()
        blocks = torch.nn.functional.pad(flat, (0, -n % BLOCK)).view(-1, BLOCK)
        scale = blocks.abs().amax(dim=1)
        normalized = blocks / torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(1)
        codes = torch.bucketize(normalized, _MIDPOINTS).to(torch.uint8).reshape(-1)  # nearest level; NaN -> 15
        packed = codes[0::2] | (codes[1::2] << 4)
        buffer = scale.numpy().tobytes() + packed.numpy().tobytes()
        return runtime_pb2.Tensor(compression=self.compression_type, buffer=buffer, size=tensor.shape,
                                  dtype="float32", requires_grad=tensor.requires_grad)  # fmt: skip

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        shape = tuple(serialized_tensor.size)
        n = int(np.prod(shape, dtype=np.int64)) if shape else 1
        blocks = -(-n // BLOCK)
        if serialized_tensor.dtype != "float32" or len(serialized_tensor.buffer) != blocks * 4 + blocks * BLOCK // 2:
            raise ValueError(f"a 4-bit tensor of {n} values is float32 in {blocks * (4 + BLOCK // 2)} bytes")
        buffer = serialized_tensor.buffer
        scale = torch.from_numpy(np.frombuffer(buffer, dtype=np.float32, count=blocks).copy())
        packed = torch.from_numpy(np.frombuffer(buffer, dtype=np.uint8, offset=blocks * 4).copy()).long()
        codes = torch.stack([packed & 15, packed >> 4], dim=1).view(blocks, BLOCK)
        values = (NF4[codes] * scale.unsqueeze(1)).reshape(-1)[:n]
        return values.reshape(shape).requires_grad_(serialized_tensor.requires_grad)

    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        return (0.5 + 4 / BLOCK) / 4  # of float32


COMPRESSION = {
    "none": NoCompression,
    "float16": Float16Compression,
    "scaled-float16": ScaledFloat16Compression,
    "uniform8bit": Uniform8Bit,
    "blockwise4bit": Blockwise4Bit,
}
_UNIFORM_8BIT, _BLOCKWISE_4BIT = Uniform8Bit(), Blockwise4Bit()


def deserialize(serialized: runtime_pb2.Tensor) -> torch.Tensor:
    """A tensor from its wire form; ValueError for bytes that do not make one (a sender's, so never trusted)."""
    try:
        if serialized.compression == runtime_pb2.UNIFORM_8BIT:
            return _UNIFORM_8BIT.extract(serialized)
        if serialized.compression == BLOCKWISE_4BIT:
            return _BLOCKWISE_4BIT.extract(serialized)
        return deserialize_torch_tensor(serialized)
    except Exception as e:  # numpy/torch errors of every kind for malformed buffers, sizes, dtypes, indices
        raise ValueError(f"undecodable tensor: {type(e).__name__}: {e}") from None
