"""Local training steps, pure torch and no network: device choice, autocast, gradient accumulation, auto batch size,
and recovery from running out of GPU memory."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from atlas_swarm.errors import ConfigError

CPU_MICRO_BATCH = 8  # on CPU larger micro-batches buy nothing but memory
MAX_AUTO_MICRO_BATCH = 64
# A step that may reach the swarm's epoch end runs in micro-batches this small (or a quarter of the peer's own
# micro-batch, if larger: a GPU's, whose small batches cost more per sample; not measured) and ends once the epoch
# does, so that the group does not wait for a whole step (swarm.schedule.fine_step). On CPU they cost nothing: the
# demo's MiniLM, 1 thread, took 24-25 ms a sample in micro-batches of 2 against 28-31 ms in micro-batches of 8.
FINE_MICRO_BATCH = 2


def pick_device(requested: str) -> str:
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but torch sees no CUDA GPU; use --device cpu or auto.")
    if requested == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("--device mps was requested but this torch has no MPS support; use --device cpu or auto.")
    return requested


@dataclass(frozen=True)
class Precision:
    """Autocast settings: bf16 where the GPU supports it, else fp16 (which needs loss scaling), fp32 off-GPU unless
    bf16 is asked for (torch's CPU autocast: a bf16 peer on a CPU, as in a mixed-precision swarm's test)."""

    dtype: Optional[torch.dtype]
    device_type: str

    @classmethod
    def for_device(cls, device: str, requested: str = "auto") -> "Precision":
        """``requested``: auto (bf16 if the GPU has it, else fp16; fp32 off-GPU), fp32, bf16 or fp16 (GPU only)."""
        on_gpu = device.startswith("cuda")
        if requested == "fp32" or (requested == "auto" and not on_gpu):
            return cls(None, device)
        if requested == "bf16" and device == "cpu":
            return cls(torch.bfloat16, "cpu")
        if not on_gpu:
            raise ConfigError(f"--precision {requested} needs --device cuda; on {device} use fp32 or auto.")
        if requested == "bf16" and not torch.cuda.is_bf16_supported():
            raise ConfigError("--precision bf16: this GPU has no bfloat16 support; use fp16 or auto.")
        if requested == "auto":
            requested = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return cls(torch.bfloat16 if requested == "bf16" else torch.float16, "cuda")

    @property
    def needs_loss_scaling(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def __str__(self):
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]


class LossScaler:
    """Dynamic loss scaling for fp16, one local batch at a time: hivemind averages the *unscaled* .grad, so each batch
    is unscaled before it is handed over, and a batch whose gradients overflowed is dropped (the scale then halves)."""

    def __init__(self, init_scale: float = 2.0**16, growth_interval: int = 1000):
        self.value = init_scale
        self.growth_interval = growth_interval
        self._good_steps = 0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.value

    def unscale_(self, params) -> bool:
        """Divide .grad by the scale in place; False (and halve the scale) if any gradient is inf/NaN."""
        grads = [p.grad for p in params if p.grad is not None]
        if not all(torch.isfinite(g).all() for g in grads):
            self.value /= 2.0
            self._good_steps = 0
            return False
        for g in grads:
            g.div_(self.value)
        self._good_steps += 1
        if self._good_steps % self.growth_interval == 0:
            self.value *= 2.0
        return True


def accumulate_gradients(
    model,
    next_batch: Callable[[int], dict],
    batch_size: int,
    micro_batch: int,
    device: str,
    precision: Precision,
    scale: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss,
    stop: Optional[Callable[[], bool]] = None,
) -> tuple[float, int]:
    """Forward/backward ``batch_size`` samples in micro-batches; leaves the *mean* gradient in .grad; returns the
    mean loss and the samples done.

    Each micro-batch's loss is weighted by its share of the batch, so accumulation equals one big batch. ``stop`` is
    asked between micro-batches: when it says so, the step ends there with the samples done so far, and their
    gradient is rescaled to their mean (a step that the swarm's epoch end cuts short).
    """
    total, done = 0.0, 0
    while done < batch_size:
        if done and stop is not None and stop():
            break
        n = min(micro_batch, batch_size - done)
        batch = {k: v.to(device, non_blocking=True) for k, v in next_batch(n).items()}
        with precision.autocast():
            loss = model(**batch).loss
        scale(loss.float() * (n / batch_size)).backward()
        total += loss.item() * n
        done += n
    if done < batch_size:
        with torch.no_grad():
            for param in model.parameters():
                if param.grad is not None:
                    param.grad.mul_(batch_size / done)
    return total / done, done


def find_micro_batch(model, next_batch: Callable[[int], dict], device: str, precision: Precision,
                     limit: int = MAX_AUTO_MICRO_BATCH) -> int:
    """Largest power-of-two micro-batch (<= ``limit``, at most 64) whose forward+backward fits the device's memory."""
    if not device.startswith("cuda"):
        return CPU_MICRO_BATCH
    fits = 0
    size = 1
    while size <= min(limit, MAX_AUTO_MICRO_BATCH):
        try:
            accumulate_gradients(model, next_batch, size, size, device, precision)
            fits = size
            size *= 2
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    if fits == 0:
        raise ConfigError("Even a micro-batch of 1 does not fit this GPU's memory; use --device cpu.")
    return fits


def shrink_on_oom(attempt: Callable[[int], float], micro: int, shrunk: Callable[[int], None]) -> tuple[float, int]:
    """``attempt(micro)``; if it runs out of device memory, halve ``micro`` (``shrunk(micro)`` then drops the partial
    batch's gradients and tells the user), free the allocator's cache and try again. Returns (loss, the micro-batch
    that fit); a micro-batch of 1 that does not fit is a clear error, not a traceback."""
    while True:
        try:
            return attempt(micro), micro
        except torch.OutOfMemoryError:
            if micro == 1:
                raise ConfigError("Out of GPU memory even with a micro-batch of 1. Try --quantize nf4, "
                                  "--gradient-checkpointing, a run with a smaller model.max_length, or --device cpu.") from None
        micro //= 2  # outside the except block: the traceback's frames (and their tensors) are gone
        shrunk(micro)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@torch.no_grad()
def evaluate(model, batches, device: str, task: str, batch_size: int = 32) -> dict[str, float]:
    """Mean loss (and accuracy for classification) over every example of ``batches``."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for batch in batches.all_batches(batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**batch)
        n = batch["input_ids"].shape[0]
        loss_sum += out.loss.item() * n
        count += n
        if task == "sequence-classification":
            correct += (out.logits.argmax(-1) == batch["labels"]).sum().item()
    model.train(was_training)
    result = {"loss": loss_sum / max(count, 1)}
    if task == "sequence-classification":
        result["accuracy"] = correct / max(count, 1)
    return result
