"""Local training steps, pure torch and no network: device choice, autocast, gradient accumulation, auto batch size."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from atlas_swarm.errors import ConfigError

CPU_MICRO_BATCH = 8  # on CPU larger micro-batches buy nothing but memory
MAX_AUTO_MICRO_BATCH = 64


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
    """Autocast settings: bf16 where the GPU supports it, else fp16 (which needs loss scaling), fp32 off-GPU."""

    dtype: Optional[torch.dtype]
    device_type: str

    @classmethod
    def for_device(cls, device: str) -> "Precision":
        if device.startswith("cuda"):
            return cls(torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16, "cuda")
        return cls(None, device)

    @property
    def needs_loss_scaling(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def __str__(self):
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]


def accumulate_gradients(
    model,
    next_batch: Callable[[int], dict],
    batch_size: int,
    micro_batch: int,
    device: str,
    precision: Precision,
    scale: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss,
) -> float:
    """Forward/backward ``batch_size`` samples in micro-batches; leaves the *mean* gradient in .grad; returns mean loss.

    Each micro-batch's loss is weighted by its share of the batch, so accumulation equals one big batch.
    """
    total, done = 0.0, 0
    while done < batch_size:
        n = min(micro_batch, batch_size - done)
        batch = {k: v.to(device, non_blocking=True) for k, v in next_batch(n).items()}
        with precision.autocast():
            loss = model(**batch).loss
        scale(loss.float() * (n / batch_size)).backward()
        total += loss.item() * n
        done += n
    return total / batch_size


def find_micro_batch(model, next_batch: Callable[[int], dict], device: str, precision: Precision) -> int:
    """Largest power-of-two micro-batch (<= 64) whose forward+backward fits the device's memory."""
    if not device.startswith("cuda"):
        return CPU_MICRO_BATCH
    fits = 0
    size = 1
    while size <= MAX_AUTO_MICRO_BATCH:
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
