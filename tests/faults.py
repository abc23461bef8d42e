"""Our own peer with a fault of its machine patched in: ``ATLAS_FAULT=oom_above:ROWS:AFTER python -m tests.faults
PEER_ARGS...`` makes every forward pass of more than ROWS rows raise torch's OutOfMemoryError once AFTER forward
passes have run, as CUDA's caching allocator does when a card fills up mid-run."""

from __future__ import annotations

import os
import sys

import torch


def oom_above(rows: str, after: str) -> None:
    limit, start, calls = int(rows), int(after), [0]
    honest = torch.nn.Embedding.forward  # every language model's first layer: sees each micro-batch once

    def forward(self, ids):
        calls[0] += 1
        if calls[0] > start and ids.dim() == 2 and ids.shape[0] > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 1.00 GiB (fake: {ids.shape[0]} rows "
                                         f"> {limit})")  # fmt: skip
        return honest(self, ids)

    torch.nn.Embedding.forward = forward


FAULTS = {"oom_above": oom_above}


def main() -> int:
    fault = os.environ.get("ATLAS_FAULT", "")
    if fault:
        name, *args = fault.split(":")
        FAULTS[name](*args)
    from atlas_swarm.model.fit import skip_bitsandbytes_unless_quantizing

    skip_bitsandbytes_unless_quantizing(sys.argv[1:])  # as `python -m atlas_swarm.peer` does
    from atlas_swarm.peer import main as peer_main

    return peer_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
