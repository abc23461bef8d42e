"""Whether a downloaded state can be loaded into this peer's optimizer: the check a state download's tensors pass
before hivemind loads them (``StateAverager._load_state_from_peers``).

A download's epoch, optimizer settings and parameters are checked against what a majority of the run's peers claim
(``state_digest``); its optimizer statistics (Adam's moments) cannot be, because honest peers' moments differ in the
last bits after a missed round. What a donor sends there was loaded unchecked: a short list made hivemind's
``load_optimizer_state`` raise ``IndexError`` on the downloader (a traceback, then another download), a moment of
another shape would fail its next optimizer step, and NaN, a negative second moment or a huge first moment would
ruin its adapter at that step. Here a state is refused unless its layout is this peer's own (the same tensors, in
the same order, of the same shapes and dtypes), every tensor is finite, and Adam's moments are ones Adam can reach:
``exp_avg_sq >= 0`` and ``|exp_avg| <= C sqrt(exp_avg_sq)`` (below), so a donor can at most scale the downloader's
next Adam steps within what some gradient sequence would give, not blow them up.

What a donor streams is also bounded while it comes in (``Budget``): the tensors this peer's own state has, each of
its own shape, each in at most its own size in bytes (plus a codec's header), and 1 MB of metadata. hivemind read
whatever a donor sent: 256 MB more than a state of a few kB held grew the downloader's averager process by 277 MB
(extra tensors) to 1,094 MB (one statistic of 2^26 values: its parts, joined, then decoded), and a stream that never
ends (read from the code, not run) by as much as the link carries until the download's timeout.

Adam's bound: ``m = (1 - b1) sum_k b1^k g_k`` and ``v = (1 - b2) sum_k b2^k g_k^2`` for any gradients ``g``, so by
Cauchy-Schwarz ``|m| <= (1 - b1) / sqrt((1 - b2) (1 - b1^2 / b2)) * sqrt(v)``: 7.27 for betas (0.9, 0.999). It holds
for any gradient sequence (averaged ones included) and for AdamW (its weight decay does not touch the moments).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from hivemind.optim.state_averager import dump_optimizer_state
from hivemind.utils.nested import nested_pack

SLACK = 1.05  # rounding of the moments' updates in float32 and bfloat16
MAX_METADATA = 1 << 20  # bytes: a state's metadata is the optimizer's settings and layout (kB)
HEADER = 4096  # bytes a codec may add to a tensor (uniform8bit: a 1 kB codebook)
PART_COST = 64  # bytes of budget any message costs, empty or not (an endless stream of empty parts is bounded too)


def adam_bound(betas) -> Optional[float]:
    """``C`` above, or None where it does not apply (b1^2 >= b2)."""
    try:
        b1, b2 = float(betas[0]), float(betas[1])
    except (TypeError, ValueError, IndexError):
        return None
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0) or b1 * b1 >= b2:
        return None
    return (1.0 - b1) / math.sqrt((1.0 - b2) * (1.0 - b1 * b1 / b2))


def problem(optimizer: torch.optim.Optimizer, extras: Sequence[torch.Tensor], metadata, tensors) -> Optional[str]:
    """Why ``(metadata, tensors)``, a state as hivemind's ``get_current_state`` sends it (the optimizer's parameters,
    then ``extras``, then the optimizer's statistics), cannot be loaded into ``optimizer``; None if it can."""
    own = [p for group in optimizer.param_groups for p in group["params"]] + list(extras)
    own_layout, own_stats = dump_optimizer_state(optimizer)
    if not isinstance(metadata, dict) or not isinstance(tensors, (list, tuple)):
        return "not a state"
    if len(tensors) != len(own) + len(own_stats):
        return f"{len(tensors)} tensors, this peer's state has {len(own)} parameters and {len(own_stats)} statistics"
    layout = metadata.get("optimizer_metadata")
    if not isinstance(layout, (list, tuple)) or [_kind(e) for e in layout] != [_kind(e) for e in own_layout]:
        return "its optimizer's layout is not this peer's"
    for i, (got, mine) in enumerate(zip(tensors, own + list(own_stats))):
        if not isinstance(got, torch.Tensor) or got.dtype != mine.dtype or got.shape != mine.shape:
            return f"tensor {i} is not a {mine.dtype} tensor of shape {tuple(mine.shape)}"
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            return f"tensor {i} holds NaN or inf"
    stats = tensors[len(own):]
    flat = [stats[e["index"]] if e["type"] == "tensor" else e.get("value") for e in own_layout]
    return _adam_problem(nested_pack(flat, structure=optimizer.state_dict()))


def layout(optimizer: torch.optim.Optimizer, extras: Sequence[torch.Tensor]) -> list:
    """(shape, bytes) of each tensor of this peer's state, in the order hivemind sends a state: the optimizer's
    parameters, ``extras``, its statistics."""
    own = [p for group in optimizer.param_groups for p in group["params"]] + list(extras)
    return [(tuple(t.shape), t.numel() * t.element_size()) for t in own + list(dump_optimizer_state(optimizer)[1])]


class Budget:
    """What a donor may stream of a state of ``layout`` (``layout()``): ``take`` each message's metadata length and
    tensor part (hivemind's ``runtime_pb2.Tensor``; the first part of each tensor carries its dtype and shape) before
    keeping it; it answers why the stream must stop, or None."""

    def __init__(self, layout: Sequence[tuple]):
        self.layout = list(layout)
        self.index = -1  # the tensor being received
        self.used = 0  # its bytes so far
        self.metadata = 0

    def take(self, metadata_bytes: int, part) -> Optional[str]:
        self.metadata += metadata_bytes
        if self.metadata > MAX_METADATA:
            return f"over {MAX_METADATA} bytes of metadata"
        if part.dtype:
            self.index, self.used = self.index + 1, 0
            if self.index >= len(self.layout):
                return f"more than the {len(self.layout)} tensors of this peer's state"
            shape = self.layout[self.index][0]
            if tuple(part.size) != shape:
                return f"tensor {self.index} of shape {tuple(part.size)}, this peer's is {shape}"
        self.used += max(len(part.buffer), PART_COST)
        limit = self.layout[self.index][1] + HEADER if self.index >= 0 else PART_COST
        if self.used > limit:
            return f"tensor {self.index} over {limit} bytes" if self.index >= 0 else "a tensor's part before its first"
        return None


def _kind(entry) -> Optional[tuple]:
    """What an entry of hivemind's flattened optimizer state is: ("tensor", its index) or ("value", None)."""
    return (entry.get("type"), entry.get("index")) if isinstance(entry, dict) else None


def _adam_problem(state: dict) -> Optional[str]:
    """The moments' bounds, per parameter, in a state dict of this peer's optimizer's structure (the statistics the
    donor sent, the settings this peer's own)."""
    for group in state["param_groups"]:
        bound = adam_bound(group.get("betas"))
        for pid in group["params"]:
            s = state["state"].get(pid, {})
            step = s.get("step")
            if isinstance(step, torch.Tensor) and step.numel() == 1 and float(step) < 0:
                return f"parameter {pid}: a negative step count"
            m, v = s.get("exp_avg"), s.get("exp_avg_sq")
            if not isinstance(v, torch.Tensor):
                continue
            for key in ("exp_avg_sq", "max_exp_avg_sq"):
                if isinstance(s.get(key), torch.Tensor) and bool((s[key] < 0).any()):
                    return f"parameter {pid}: a negative {key}"
            if bound is None or not isinstance(m, torch.Tensor):
                continue
            # what float arithmetic can leave of v where g^2 underflows: m up to C sqrt(tiny / (1 - b2))
            floor = bound * math.sqrt(torch.finfo(v.dtype).tiny / (1.0 - float(group["betas"][1])))
            limit = v.float().sqrt().mul_(SLACK * bound).add_(floor)  # (float32 is exact enough beside SLACK)
            if bool((m.float().abs() > limit).any()):
                return f"parameter {pid}: a first moment Adam cannot reach (|exp_avg| > {bound:.2f} sqrt(exp_avg_sq))"
    return None
