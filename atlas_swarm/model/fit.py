"""Fitting a base model into a consumer card: a quantized base (bitsandbytes NF4 / int8, QLoRA-style), gradient
checkpointing, and a cap on the GPU memory this peer may use. The adapter itself always stays fp32, so peers whose
bases differ in precision still average one adapter."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

import torch

from atlas_swarm.errors import ConfigError

QUANTIZE = ("none", "nf4", "int8")
CHECKPOINTING = ("auto", "on", "off")
SMALL_MICRO_BATCH = 4  # auto checkpointing: below this many samples per micro-batch, recomputing activations pays


def skip_bitsandbytes_unless_quantizing(argv: Sequence[str]) -> bool:
    """Before peft and transformers are imported: unless the command line asks for --quantize nf4/int8, make
    bitsandbytes look absent to them. Installed, peft imports it at import time, which imports torch's compiler stack
    (about 1 s more start-up for every peer, and warnings on CPU). Returns whether it was hidden."""
    argv = list(argv)
    values = [a.split("=", 1)[1] for a in argv if a.startswith("--quantize=")]
    values += [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--quantize"]
    if any(v != "none" for v in values) or "bitsandbytes" in sys.modules:
        return False
    sys.modules["bitsandbytes"] = None  # import raises ImportError; importlib.util.find_spec() answers None
    return True


def check_quantize(quantize: str, device: str, device_requested: str) -> Optional[str]:
    """Refuse a quantized base where it cannot (or should not) run, before the peer joins. Returns the bitsandbytes
    version in use, or None for ``none``.

    On CPU, bitsandbytes (>= 0.46) runs NF4 with plain torch kernels: it saves memory but is slower than fp32, so a
    peer that was not told ``--device cpu`` explicitly gets a clear error instead of a slow surprise."""
    if quantize == "none":
        return None
    if device.startswith("cuda"):
        pass
    elif device == "cpu" and device_requested == "cpu" and quantize == "nf4":
        pass  # asked for explicitly: bitsandbytes' CPU backend (tests use it to mix 4-bit and fp32 peers)
    else:
        raise ConfigError(
            f"--quantize {quantize} needs a CUDA GPU (bitsandbytes); this peer would train on {device}. Use "
            f"--quantize none here" + (" (or --device cpu --quantize nf4: 4-bit on CPU saves memory but is slower)"
                                       if device == "cpu" and quantize == "nf4" else "") + ".")  # fmt: skip
    try:
        import bitsandbytes
    except ImportError:  # not installed (a peer started without --quantize on its command line hides it too)
        raise ConfigError(f"--quantize {quantize} needs bitsandbytes: `pip install bitsandbytes`.") from None
    return bitsandbytes.__version__


def quantization_config(quantize: str, trained: Sequence[str] = ()):
    """transformers' BitsAndBytesConfig for ``quantize`` (QLoRA's recipe for nf4: double quantization, bf16
    compute where the card has it), or None. ``trained``: the spec's modules_to_save, kept in full precision with
    the output head: transformers' own guess of the head misses a classifier whose last parameter is its bias, and a
    4-bit copy of a module cannot be trained."""
    if quantize == "none":
        return None
    from transformers import BitsAndBytesConfig

    keep = sorted(set(trained) | {"lm_head"})
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype(), llm_int8_skip_modules=keep)  # fmt: skip


def compute_dtype() -> torch.dtype:
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def enable_checkpointing(model) -> None:
    """Recompute activations in the backward pass (non-reentrant, so frozen inputs need no grad hooks)."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # a KV cache is useless in training and conflicts with checkpointing


def limit_memory(max_memory_gb: Optional[float], device: str) -> Optional[float]:
    """Let this process use at most ``max_memory_gb`` of the GPU (torch's caching allocator then raises
    OutOfMemoryError past it, which the micro-batch probe and the training loop handle). Returns the fraction."""
    if max_memory_gb is None:
        return None
    if not device.startswith("cuda"):
        raise ConfigError(f"--max-memory caps GPU memory; this peer trains on {device}. Leave it out.")
    index = torch.device(device).index or 0
    total = torch.cuda.get_device_properties(index).total_memory
    fraction = min(1.0, max_memory_gb * 2**30 / total)
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return fraction
