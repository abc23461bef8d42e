"""The check a downloaded state passes before it is loaded (swarm/loaded_state.py): honest states of any gradient
history pass; a donor's short list, wrong shapes, NaN and unreachable moments are refused with a reason; and for any
state it lets through, hivemind's loader and the next Adam step give finite parameters that move at most lr x the
bound (what some gradient sequence could also do). While a state streams in, an honest one (any codec) fits its
budget, and whatever a donor streams, what the budget lets through is bounded by the downloader's own state."""

from __future__ import annotations

import copy

import pytest
import torch
from hivemind.compression import serialize_torch_tensor
from hivemind.optim.state_averager import dump_optimizer_state, load_optimizer_state
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import split_for_streaming
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atlas_swarm.swarm.loaded_state import HEADER, MAX_METADATA, PART_COST, SLACK, Budget, adam_bound, layout, problem

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
SHAPES = [(3, 4), (5,)]
LR = 0.01


def optimizer(dtype=torch.float32, name="adamw"):
    params = [torch.nn.Parameter(torch.zeros(s, dtype=dtype)) for s in SHAPES]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.01) if name == "adamw" else torch.optim.SGD(params, lr=LR)
    for p in params:  # hivemind's initialize_optimizer_state_: a step on zero gradients
        p.grad = torch.zeros_like(p)
    opt.step()
    return opt


def trained(grads, dtype=torch.float32):
    opt = optimizer(dtype)
    for g in grads:
        for i, p in enumerate(opt.param_groups[0]["params"]):
            p.grad = (torch.arange(p.numel(), dtype=torch.float64).reshape(p.shape) - i + 0.5).mul(g).to(dtype)
        opt.step()
    return opt


def state(opt):
    """What a donor's get_current_state sends (no extras): metadata and parameters + statistics."""
    layout, stats = dump_optimizer_state(opt)
    params = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    return {"epoch": 5, "optimizer_metadata": layout}, params + [t.clone() for t in stats]


gradient_scales = st.floats(min_value=-1e15, max_value=1e15, allow_nan=False) | st.sampled_from([1e-30, -1e-22, 1e-40])


@SETTINGS
@given(st.lists(gradient_scales, min_size=0, max_size=12), st.sampled_from([torch.float32, torch.bfloat16]))
def test_every_honest_state_passes(grads, dtype):
    opt = trained(grads, dtype)
    metadata, tensors = state(opt)
    assert problem(opt, [], metadata, tensors) is None


def test_sgd_without_statistics_passes_and_the_bound_is_adams():
    opt = optimizer(name="sgd")
    assert problem(opt, [], *state(opt)) is None
    assert adam_bound((0.9, 0.999)) == pytest.approx(7.27, abs=0.01)
    assert adam_bound((0.99, 0.9)) is None


@pytest.mark.parametrize("tamper, why", [
    (lambda t: t[:-1], "tensors"),
    (lambda t: t + [torch.zeros(1)], "tensors"),
    (lambda t: t[:2] + [t[2].reshape(-1)] + t[3:], "shape"),
    (lambda t: t[:2] + [t[2].double()] + t[3:], "tensor 2 is not"),
    (lambda t: t[:3] + [torch.full_like(t[3], float("nan"))] + t[4:], "NaN"),
    (lambda t: t[:3] + [-t[3] - 1] + t[4:], "negative exp_avg_sq"),
    (lambda t: t[:2] + [t[2] * 1000] + t[3:], "first moment"),
    (lambda t: t[:4] + [torch.tensor(-3.0)] + t[5:], "negative step"),
])  # fmt: skip
def test_a_donors_tampered_statistics_are_refused_with_a_reason(tamper, why):
    opt = trained([1.0, -0.5, 2.0])
    metadata, tensors = state(opt)
    assert [tuple(t.shape) for t in tensors[2:5]] == [(3, 4), (3, 4), ()]  # exp_avg, exp_avg_sq, step of param 0
    assert why in problem(opt, [], metadata, tamper(list(tensors)))


def test_a_layout_other_than_this_peers_is_refused():
    opt = trained([1.0])
    metadata, tensors = state(opt)
    for entries in (None, "x", [], metadata["optimizer_metadata"][:-1], [{"type": "tensor", "index": 99}] * 40):
        assert "layout" in problem(opt, [], {**metadata, "optimizer_metadata": entries}, tensors)
    assert problem(opt, [], "not a dict", tensors) == "not a state"


values = st.floats(allow_nan=True, allow_infinity=True, width=32)


@SETTINGS
@given(st.lists(gradient_scales, min_size=1, max_size=6), st.integers(0, 5), values, values, st.booleans())
def test_whatever_passes_loads_and_steps_within_the_bound(grads, which, scale, offset, replace):
    # a donor's moments: the honest ones scaled and shifted (or replaced by a constant), one statistic at a time
    opt = trained(grads)
    metadata, tensors = state(opt)
    i = 2 + which
    with torch.no_grad():
        t = tensors[i]
        tensors[i] = torch.full_like(t, offset) if replace else (t * scale + offset).to(t.dtype)
    why = problem(opt, [], metadata, tensors)
    assert why is None or isinstance(why, str)
    if why is not None:
        return
    victim = copy.deepcopy(opt)
    load_optimizer_state(victim, metadata["optimizer_metadata"], tensors[2:])
    params = victim.param_groups[0]["params"]
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    victim.step()
    bound = SLACK * adam_bound((0.9, 0.999)) * 1.001 + 1e-6
    for p, b in zip(params, before):
        assert bool(torch.isfinite(p).all())
        moved = (p.detach() - b * (1 - LR * 0.01)).abs().max().item()  # AdamW's decay, then the Adam step
        assert moved <= LR * bound, (why, moved)


def streamed(tensors, compression=runtime_pb2.CompressionType.NONE, chunk=2**16):
    """(metadata length, part) of each message a donor's rpc_download_state sends (hivemind's own serializers)."""
    out = []
    for i, t in enumerate(tensors):
        for j, part in enumerate(split_for_streaming(serialize_torch_tensor(t, compression), chunk)):
            out.append((300 if i == j == 0 else 0, part))
    return out


@pytest.mark.parametrize("compression", [runtime_pb2.CompressionType.NONE, runtime_pb2.CompressionType.FLOAT16,
                                         runtime_pb2.CompressionType.UNIFORM_8BIT])  # fmt: skip
def test_an_honest_state_streams_within_its_budget(compression):
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(300, 300), (5,), ()]]  # 360 kB: 6 parts of 64 kB
    opt = torch.optim.AdamW(params, lr=LR)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    tensors = params + list(dump_optimizer_state(opt)[1])
    budget = Budget(layout(opt, []))
    messages = streamed(tensors, compression)
    assert len(messages) > len(tensors) and [budget.take(n, part) for n, part in messages] == [None] * len(messages)


tensor_parts = st.builds(
    lambda dtype, size, n: runtime_pb2.Tensor(dtype=dtype, size=size, buffer=b"\0" * n),
    st.sampled_from(["", "float32", "int64"]), st.lists(st.integers(0, 2**20), max_size=3), st.integers(0, 2**17))


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 2**21), tensor_parts), max_size=60))
def test_whatever_a_donor_streams_the_budget_lets_through_at_most_the_downloaders_state(messages):
    opt = optimizer()
    own = layout(opt, [])
    budget = Budget(own)
    kept, metadata = 0, 0
    for n, part in messages:
        if budget.take(n, part) is not None:
            break
        kept, metadata = kept + max(len(part.buffer), PART_COST), metadata + n
    assert metadata <= MAX_METADATA
    assert kept <= PART_COST + sum(size + HEADER for _, size in own)


def test_a_stream_is_stopped_at_the_first_part_past_the_state_with_a_reason():
    opt = optimizer()
    tensors = [p for p in opt.param_groups[0]["params"]] + list(dump_optimizer_state(opt)[1])
    for extra, why in [([torch.zeros(1)], "more than the"), ([], "of shape")]:
        budget = Budget(layout(opt, []))
        sent = tensors + extra if extra else [torch.zeros(13)] + tensors[1:]
        answers = [budget.take(n, part) for n, part in streamed(sent)]
        assert why in next(a for a in answers if a is not None), answers
    budget = Budget(layout(opt, []))
    assert "metadata" in budget.take(MAX_METADATA + 1, runtime_pb2.Tensor())
    budget = Budget(layout(opt, []))
    assert "before its first" in budget.take(0, runtime_pb2.Tensor(buffer=b"\0" * 100))
