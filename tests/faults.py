"""Our own peer with a fault patched in: ``ATLAS_FAULT=NAME:ARGS python -m tests.faults PEER_ARGS...``.

``oom_above:ROWS:AFTER``: every forward pass of more than ROWS rows raises torch's OutOfMemoryError once AFTER
forward passes have run, as CUDA's caching allocator does when a card fills up mid-run. ``rounds_fail:N``: this
peer's first N gradient rounds raise after their group formed."""

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


def rounds_fail(count: str) -> None:
    """The first ``count`` gradient rounds raise once their group has formed (a groupmate's bug, a broken stream):
    the peer must then step on its own gradients, as hivemind's optimizer says it does."""
    from atlas_swarm.swarm.averagers import GradAverager

    left, honest = [int(count)], GradAverager._aggregate_with_group

    async def _aggregate_with_group(self, *args, **kwargs):
        if left[0] > 0:
            left[0] -= 1
            raise RuntimeError("fault: this round breaks after its group formed")
        return await honest(self, *args, **kwargs)

    GradAverager._aggregate_with_group = _aggregate_with_group

    # and report the gradient the optimizer then steps on (stderr) beside the local mean gradient hivemind computed
    # from its accumulators as the round began (before it zeroed them), so that a test can compare the two
    from hivemind.optim.grad_averager import GradientAverager
    from hivemind.optim.optimizer import Optimizer

    means, honest_step, fallback = [], GradientAverager.step, Optimizer._load_local_gradients_into_optimizer

    def step(self, *args, **kwargs):
        scale = 1.0 / self.local_times_accumulated if self.local_times_accumulated else 0.0
        means[:] = [acc.detach().clone() * scale for acc in self._grad_accumulators()]
        return honest_step(self, *args, **kwargs)

    def _load_local_gradients_into_optimizer(self):
        fallback(self)
        params = [p for group in self.state_averager.optimizer.param_groups for p in group["params"]]
        norm = sum(float(p.grad.norm()) ** 2 for p in params if p.grad is not None) ** 0.5
        mean = sum(float(m.norm()) ** 2 for m in means) ** 0.5
        diff = max((float((p.grad - m).abs().max()) for p, m in zip(params, means)), default=float("nan"))
        print(f"fault: stepping on local gradients of norm {norm:.6g} (local mean {mean:.6g}, max diff {diff:.3g})",
              file=sys.stderr, flush=True)

    GradientAverager.step = step
    Optimizer._load_local_gradients_into_optimizer = _load_local_gradients_into_optimizer


FAULTS = {"oom_above": oom_above, "rounds_fail": rounds_fail}


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
