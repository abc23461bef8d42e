import pytest
import torch

from atlas_swarm.errors import ConfigError
from atlas_swarm.train.steps import LossScaler, Precision, accumulate_gradients


def test_loss_scaler_unscales_and_drops_overflowing_batches():
    p = torch.nn.Parameter(torch.ones(3))
    scaler = LossScaler(init_scale=8.0, growth_interval=2)
    scaler.scale((p * 2).sum()).backward()
    assert scaler.unscale_([p]) and torch.equal(p.grad, torch.full((3,), 2.0))
    p.grad = torch.tensor([1.0, float("inf"), 0.0])
    assert not scaler.unscale_([p]) and scaler.value == 4.0
    p.grad = torch.ones(3)
    assert scaler.unscale_([p]) and scaler.unscale_([p]) and scaler.value == 8.0  # grows after 2 good steps


def test_precision_choices_off_gpu():
    assert str(Precision.for_device("cpu")) == "fp32" and str(Precision.for_device("cpu", "fp32")) == "fp32"
    with pytest.raises(ConfigError, match="needs --device cuda"):
        Precision.for_device("cpu", "fp16")
    bf16 = Precision.for_device("cpu", "bf16")  # torch's CPU autocast
    assert str(bf16) == "bf16" and not bf16.needs_loss_scaling
    with bf16.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


class _Out:
    def __init__(self, loss):
        self.loss = loss


class _Squared(torch.nn.Module):
    """What accumulate_gradients needs of a model: an output with a loss, and parameters (a seeded Linear(4, 1))."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, x):
        return _Out(self.linear(x).pow(2).mean())


def test_accumulation_equals_one_big_batch():
    model = _Squared()
    data = torch.randn(8, 4)
    batches = iter([data[:2], data[2:4], data[4:6], data[6:8]])
    accumulate_gradients(model, lambda n: {"x": next(batches)}, 8, 2, "cpu", Precision.for_device("cpu"))
    accumulated = model.linear.weight.grad.clone()
    model.zero_grad()
    model(data).loss.backward()
    assert torch.allclose(accumulated, model.linear.weight.grad, atol=1e-6)


def test_a_step_stopped_between_micro_batches_holds_the_mean_gradient_of_what_it_did():
    # the swarm's epoch ended during the step (peer.py: stop=SwarmOptimizer.epoch_over)
    model = _Squared()
    data = torch.randn(8, 4)
    pieces = iter([data[:2], data[2:4], data[4:6], data[6:8]])
    asked = []

    def stop():
        asked.append(True)
        return len(asked) == 2  # asked before the 2nd and the 3rd micro-batch: stop before the 3rd

    loss, done = accumulate_gradients(model, lambda n: {"x": next(pieces)}, 8, 2, "cpu",
                                      Precision.for_device("cpu"), stop=stop)  # fmt: skip
    assert done == 4 and len(asked) == 2
    stopped = model.linear.weight.grad.clone()
    model.zero_grad()
    reference = model(data[:4]).loss
    reference.backward()
    assert torch.allclose(stopped, model.linear.weight.grad, atol=1e-6) and abs(loss - reference.item()) < 1e-6
    # never asked before the first micro-batch, nor when there is only one
    model.zero_grad()
    loss, done = accumulate_gradients(model, lambda n: {"x": data[:n]}, 2, 2, "cpu", Precision.for_device("cpu"),
                                      stop=lambda: True)  # fmt: skip
    assert done == 2
