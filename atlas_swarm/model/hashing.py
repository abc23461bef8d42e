"""Canonical hashes of tensor dicts: the same adapter gives the same hash on every peer and every run."""

from __future__ import annotations

import hashlib
import struct
from typing import Mapping

import torch


def tensors_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, little-endian bytes) of each tensor, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(struct.pack("<I", len(name)) + name.encode())
        h.update(str(t.dtype).encode() + b"|" + ",".join(map(str, t.shape)).encode() + b"|")
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def shapes_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of names and shapes only: peers whose adapters can be averaged together have equal shapes_hash."""
    desc = ";".join(f"{n}:{tuple(tensors[n].shape)}" for n in sorted(tensors))
    return hashlib.sha256(desc.encode()).hexdigest()[:16]
