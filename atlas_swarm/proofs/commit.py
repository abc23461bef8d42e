"""The data commitment in a proof: a Merkle root over hashes of the batches a peer trained on in one epoch.

The data never leaves the peer; the root commits it to exactly those batches, so it can later prove (by revealing a
batch and its Merkle path) what it trained on, and cannot claim two different histories for one epoch.
Tree: keccak256 leaves; a parent is keccak256(left || right); an odd node is carried up unchanged. Empty: 32 zeros.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from eth_utils import keccak


def batch_hash(batch: Mapping[str, torch.Tensor]) -> bytes:
    """keccak256 over the batch's tensors (sorted by name: name, shape, bytes)."""
    parts = []
    for name in sorted(batch):
        t = batch[name].detach().cpu().contiguous()
        parts.append(name.encode() + b"|" + ",".join(map(str, t.shape)).encode() + b"|" + t.numpy().tobytes())
    return keccak(b"\x00".join(parts))


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    if not leaves:
        return bytes(32)
    level = list(leaves)
    while len(level) > 1:
        nxt = [keccak(level[i] + level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]
