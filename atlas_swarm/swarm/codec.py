"""Tensors on the wire: hivemind's serialization and compressions, with its 8-bit extract mended for numpy 2.

hivemind 1.1.12 reads an 8-bit tensor's codebook size with ``int(np.frombuffer(..., count=1))``: numpy 2 refuses
to convert a 1-element array, so every round and state download of a ``compression = "uniform8bit"`` run raised
TypeError (found by ``bench_averaging.py --compression``: 0 of 28 rounds averaged). ``Uniform8Bit`` reads it the
numpy 2 way and keeps hivemind's wire format, and ``deserialize`` is what every reader here calls.
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


COMPRESSION = {
    "none": NoCompression,
    "float16": Float16Compression,
    "scaled-float16": ScaledFloat16Compression,
    "uniform8bit": Uniform8Bit,
}
_UNIFORM_8BIT = Uniform8Bit()


def deserialize(serialized: runtime_pb2.Tensor) -> torch.Tensor:
    """A tensor from its wire form; ValueError for bytes that do not make one (a sender's, so never trusted)."""
    try:
        if serialized.compression == runtime_pb2.UNIFORM_8BIT:
            return _UNIFORM_8BIT.extract(serialized)
        return deserialize_torch_tensor(serialized)
    except Exception as e:  # numpy/torch errors of every kind for malformed buffers, sizes, dtypes, indices
        raise ValueError(f"undecodable tensor: {type(e).__name__}: {e}") from None
