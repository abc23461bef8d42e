"""Fitting a model into memory: quantized bases (bitsandbytes' real NF4 kernels, here on CPU), gradient
checkpointing, the memory cap, and recovery from running out of memory mid-step."""

from __future__ import annotations

import sys

import pytest
import torch

from atlas_swarm.config import PeerConfig, RunSpec
from atlas_swarm.errors import ConfigError
from atlas_swarm.model.fit import check_quantize, limit_memory
from atlas_swarm.model.hashing import shapes_hash
from atlas_swarm.model.lora import adapter_parameters, adapter_state, load_model
from atlas_swarm.train.data import Batches, load_examples
from atlas_swarm.train.steps import Precision, accumulate_gradients, shrink_on_oom
from tests.peers import run_together


def _spec(base) -> RunSpec:
    return RunSpec.from_dict({"name": "fit", "model": {"base": str(base), "task": "causal-lm", "max_length": 48},
                              "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}})  # fmt: skip


@pytest.mark.parametrize(
    "quantize, device, requested, message",
    [
        ("nf4", "cpu", "auto", "this peer would train on cpu. Use --quantize none here (or --device cpu --quantize nf4"),
        ("int8", "cpu", "cpu", "--quantize int8 needs a CUDA GPU"),
        ("nf4", "mps", "mps", "this peer would train on mps"),
    ],
)
def test_quantize_off_a_gpu_is_refused_unless_asked_for_explicitly(quantize, device, requested, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        check_quantize(quantize, device, requested)
    assert check_quantize("none", device, requested) is None
    assert check_quantize("nf4", "cpu", "cpu")  # bitsandbytes' version: its CPU backend runs NF4


def test_memory_cap_and_flag_values():
    assert limit_memory(None, "cpu") is None
    with pytest.raises(ConfigError, match="caps GPU memory"):
        limit_memory(8.0, "cpu")
    for bad in ({"quantize": "fp4"}, {"gradient_checkpointing": "always"}, {"max_memory": 0.0}):
        with pytest.raises(ConfigError):
            PeerConfig(run_spec="s.toml", **bad)


def test_a_4bit_base_trains_the_same_fp32_adapter_from_the_same_start(tiny_model):
    # Prepare
    spec = _spec(tiny_model)
    full, tokenizer = load_model(spec)
    nf4, _ = load_model(spec, quantize="nf4")
    # Assert: the base is bitsandbytes' 4-bit, the adapter is fp32, of the same shapes and the same seeded start
    import bitsandbytes as bnb

    assert isinstance(nf4.base_model.model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    assert all(p.dtype == torch.float32 for _, p in adapter_parameters(nf4))
    assert nf4.base_model.model.model.gradient_checkpointing  # always, with a quantized base (QLoRA)
    assert shapes_hash(dict(adapter_parameters(nf4))) == shapes_hash(dict(adapter_parameters(full)))
    ours, theirs = adapter_state(full), adapter_state(nf4)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # Execute: one step each on the same batch
    batch = Batches(load_examples("builtin:chatterbot-chat", spec)[:16], tokenizer, spec).next(8)
    losses = []
    for model in (full, nf4):
        model.train()
        losses.append(accumulate_gradients(model, lambda n: batch, 8, 4, "cpu", Precision.for_device("cpu"))[0])
    # Assert: a 4-bit base is a close, not equal, model: the losses and gradient directions agree
    assert abs(losses[0] - losses[1]) < 0.05 * losses[0]
    g_full = torch.cat([p.grad.flatten() for _, p in adapter_parameters(full)])
    g_nf4 = torch.cat([p.grad.flatten() for _, p in adapter_parameters(nf4)])
    assert torch.nn.functional.cosine_similarity(g_full, g_nf4, dim=0) > 0.9


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model):
    spec = _spec(tiny_model)
    grads = []
    for checkpointing in (False, True):
        model, tokenizer = load_model(spec, checkpointing=checkpointing)
        model.train()
        batch = Batches(load_examples("builtin:chatterbot-chat", spec)[:8], tokenizer, spec).next(8)
        accumulate_gradients(model, lambda n: batch, 8, 8, "cpu", Precision.for_device("cpu"))
        grads.append(torch.cat([p.grad.flatten() for _, p in adapter_parameters(model)]))
        assert model.base_model.model.model.gradient_checkpointing == checkpointing
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


class _AllocatorFails(torch.nn.Module):
    """A model whose allocator "fails" for micro-batches above ``limit`` rows, as CUDA's caching allocator does."""

    def __init__(self, limit: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))
        self.limit, self.sizes = limit, []

    def forward(self, x, labels):
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fake allocator failure)")
        return type("Out", (), {"loss": ((x @ self.w - labels) ** 2).mean()})()


def test_out_of_memory_halves_the_micro_batch_and_the_step_equals_the_full_batch():
    # Prepare: 16-sample steps; the allocator fails above 3 rows; the data stream goes on across failed attempts
    torch.manual_seed(0)
    x, y = torch.randn(64, 3), torch.randn(64)
    model, events, seen = _AllocatorFails(limit=3), [], []
    stream = iter(range(64))

    def next_batch(n):
        taken = [next(stream) for _ in range(n)]
        seen.append(taken)
        return {"x": x[taken], "labels": y[taken]}

    def shrunk(micro):
        model.zero_grad(set_to_none=True)  # what the peer does: the partial batch's gradients are dropped
        events.append(micro)
        seen.clear()

    # Execute
    (loss, done), micro = shrink_on_oom(lambda m: accumulate_gradients(model, next_batch, 16, m, "cpu",
                                                                       Precision.for_device("cpu")), 16, shrunk)  # fmt: skip
    # Assert: 16 -> 8 -> 4 -> 2, one call each; the step that fit took 16 samples in 8 pieces of 2 ...
    assert events == [8, 4, 2] and micro == 2 and done == 16
    assert model.sizes == [16, 8, 4] + [2] * 8
    taken = [i for piece in seen for i in piece]
    assert len(taken) == 16
    # ... and its gradient and loss are those of one 16-sample batch of the same samples
    w = torch.ones(3, requires_grad=True)
    reference = ((x[taken] @ w - y[taken]) ** 2).mean()
    reference.backward()
    assert torch.allclose(model.w.grad, w.grad, atol=1e-6) and abs(loss - reference.item()) < 1e-5


def test_out_of_memory_with_a_micro_batch_of_1_is_a_clear_error():
    model = _AllocatorFails(limit=0)
    batch = {"x": torch.randn(1, 3), "labels": torch.randn(1)}
    with pytest.raises(ConfigError, match="even with a micro-batch of 1"):
        shrink_on_oom(lambda m: accumulate_gradients(model, lambda n: batch, 1, m, "cpu", Precision.for_device("cpu")),
                      1, lambda m: None)  # fmt: skip


@pytest.mark.parametrize("fits, limit, tried, chosen", [(64, 64, [1, 2, 4, 8, 16, 32, 64], 64),
                                                      (5, 64, [1, 2, 4, 8], 4), (64, 4, [1, 2, 4], 4),
                                                      (64, 12, [1, 2, 4, 8], 8)])
def test_the_micro_batch_probe_stops_at_what_fits_and_at_the_batch_size(monkeypatch, fits, limit, tried, chosen):
    """On a GPU the probe doubles the micro-batch until out of memory; with an explicit --batch-size it stops there
    too (a 7B peer asked for batches of 4 no longer probes 8 to 64 first)."""
    from atlas_swarm.train import steps

    sizes = []

    def attempt(model, next_batch, batch_size, micro, device, precision):
        sizes.append(micro)
        if micro > fits:
            raise torch.OutOfMemoryError("CUDA out of memory (fake allocator failure)")
        return 0.0, micro

    monkeypatch.setattr(steps, "accumulate_gradients", attempt)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    model = torch.nn.Linear(2, 2)
    assert steps.find_micro_batch(model, lambda n: {}, "cuda", Precision.for_device("cpu"), limit) == chosen
    assert sizes == tried


def test_a_peer_imports_bitsandbytes_only_when_its_command_line_quantizes():
    # fresh interpreters, at once (each is imports: 3-7 s of a core): what `python -m atlas_swarm.peer ARGV` does
    # before peft is imported
    cases = [(["--data", "x"], True), (["--quantize", "none"], True), (["--quantize=nf4"], False),
             (["--device", "cpu", "--quantize", "nf4"], False)]  # fmt: skip
    code = ("import sys\nfrom atlas_swarm.model.fit import skip_bitsandbytes_unless_quantizing as skip\n"
            "print(skip({!r}))\nimport peft\nprint(sys.modules.get('bitsandbytes') is not None)\n")
    done = run_together([[sys.executable, "-c", code.format(argv)] for argv, _ in cases])
    for (argv, hidden), out in zip(cases, done):
        assert out.returncode == 0, (argv, out.stderr)
        assert out.stdout.split() == [str(hidden), str(not hidden)], argv


def test_a_4bit_classifier_run_keeps_its_trained_head_in_full_precision():
    # transformers' own guess of what not to quantize misses BERT's classifier (its last parameter is a bias); a
    # 4-bit copy of it as a module to save crashed the first step (found by scripts/bench_quantized.py)
    import bitsandbytes as bnb

    spec = RunSpec.from_toml("atlas_swarm/specs/demo-minilm-topics.toml")
    full, tokenizer = load_model(spec)
    nf4, _ = load_model(spec, quantize="nf4")
    assert not [n for n, m in nf4.named_modules() if "classifier" in n and isinstance(m, bnb.nn.Linear4bit)]
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in nf4.modules()) == 37  # 6 layers x 6 Linear + the pooler
    ours, theirs = adapter_state(full), adapter_state(nf4)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # the head's fresh init too
    batch = Batches(load_examples("builtin:chatterbot-topics", spec)[:8], tokenizer, spec).next(8)
    nf4.train()
    loss, _ = accumulate_gradients(nf4, lambda n: batch, 8, 8, "cpu", Precision.for_device("cpu"))
    assert torch.isfinite(torch.tensor(loss))
    assert all(p.grad is not None for n, p in adapter_parameters(nf4) if "classifier" in n)
