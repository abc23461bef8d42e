"""Checks of the CUDA paths that CI (CPU only) cannot run; prints one JSON summary. Needs a CUDA GPU.

1. --batch-size auto probes micro-batches on the GPU; under an artificially small memory cap it backs off on OOM.
2. A peer trains with --precision bf16 and with --precision fp16 (dynamic loss scaling); losses stay finite.
3. Two peers on the GPU average together and end with the same adapter.
4. qlora: a lone 4-bit peer against the plain QLoRA recipe on random-weight Llamas of the --qlora-shapes (1b, 7b):
   samples/s ratio (goal >= 0.97) and each side's peak GPU memory (scripts/bench_peer.py --quantize nf4).
5. card: a 4-bit peer of the 7b shape on an 8 GB card's budget (--max-memory 7.5, --batch-size 16): the micro-batch
   it probes within the cap, its peak memory and samples/s over a few steps, any out-of-memory events.
6. serve: `python -m atlas_swarm.serve` on the GPU beside a one-at-a-time generate() loop (scripts/bench_serve.py,
   SmolLM2-135M's shape), with a full-precision base and with an NF4 one.

    python scripts/gpu_check.py [--workdir /tmp/gpu-check] [--checks probe,precision,swarm,qlora,card,serve]
                                [--qlora-shapes 1b,7b] [--windows 10] [--window-s 3]

The summary is printed and, after every check, written to $OUT/gpu_check.json when OUT is set (the device tool's
output folder), so a run cut short still returns what it did.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from atlas_swarm.launch import PeerProcess, first_loopback


def peer(workdir: Path, name: str, args: list[str]) -> PeerProcess:
    return PeerProcess(workdir / name, ["--device", "cuda", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", *args])


def save(summary: dict) -> None:
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "gpu_check.json").write_text(json.dumps(summary, indent=2))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/gpu-check")
    ap.add_argument("--checks", default="probe,precision,swarm",
                    help="comma-separated: probe, precision, swarm, qlora, card, serve")
    ap.add_argument("--qlora-shapes", default="1b,7b", help="shapes for the qlora check")
    ap.add_argument("--windows", type=int, default=10, help="bench_peer's windows per side (qlora)")
    ap.add_argument("--window-s", type=float, default=3.0, help="bench_peer's seconds per window (qlora)")
    args = ap.parse_args()
    checks = set(args.checks.split(","))
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    from atlas_swarm.config import RunSpec
    from atlas_swarm.devnet.tiny_model import build_tiny_model
    from atlas_swarm.model.lora import load_model
    from atlas_swarm.train.builtin import chatterbot_topics
    from atlas_swarm.train.data import Batches, load_examples
    from atlas_swarm.train.steps import Precision, find_micro_batch

    summary = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    if checks & {"probe", "precision", "swarm"}:
        model_dir = build_tiny_model(workdir / "tiny", [r["text"] for r in chatterbot_topics("train")])
        data = workdir / "data.txt"
        data.write_text("\n".join(r["text"] for r in chatterbot_topics("train")[:800]))
        spec_path = workdir / "spec.toml"
        spec_path.write_text(f'''name = "gpu-check"
[model]
base = "{model_dir}"
task = "causal-lm"
max_length = 48
[lora]
target_modules = ["q_proj", "v_proj"]
[averaging]
target_batch_size = 8192
matchmaking_time = 2.0
averaging_timeout = 15.0
average_state_every = 2
''')

    if "probe" in checks:  # 1. micro-batch probe, then the same probe under a cap that a batch of 64 cannot fit
        spec = RunSpec.from_toml(spec_path)
        model, tok = load_model(spec, device="cuda")
        batches = Batches(load_examples(str(data), spec), tok, spec)
        precision = Precision.for_device("cuda")
        summary["micro_batch_uncapped"] = find_micro_batch(model, batches.next, "cuda", precision)
        free = torch.cuda.mem_get_info()[0]
        in_use = torch.cuda.memory_allocated()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction((in_use + 24 * 2**20) / total)
        try:
            summary["micro_batch_capped_24MiB"] = find_micro_batch(model, batches.next, "cuda", precision)
        except Exception as e:  # a ConfigError is an acceptable, clear outcome too
            summary["micro_batch_capped_24MiB"] = f"{type(e).__name__}: {e}"
        summary["free_gpu_memory_gib"] = round(free / 2**30, 1)
        del model
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
        save(summary)

    for prec in ("bf16", "fp16") if "precision" in checks else ():  # 2. one peer per precision
        p = peer(workdir, prec, ["--run-spec", str(spec_path), "--data", str(data), "--batch-size", "auto",
                                 "--precision", prec, "--max-steps", "400"])  # fmt: skip
        code = p.wait_exit(300)
        ev = p.events()
        started = next((e for e in ev if e["event"] == "started"), {})
        losses = [e["loss"] for e in ev if e["event"] == "progress"]
        summary[prec] = {"exit": code, "precision": started.get("precision"), "micro_batch": started.get("micro_batch"),
                         "epochs": sum(e["event"] == "epoch" for e in ev), "first_loss": losses[:1],
                         "last_loss": [next(e for e in ev if e["event"] == "stopped")["last_loss"]] if not code else [],
                         "finite": all(x == x and abs(x) < 1e4 for x in losses),
                         "stderr_tail": p.err_path.read_text()[-600:] if code else ""}  # fmt: skip
        save(summary)

    for shape in args.qlora_shapes.split(",") if "qlora" in checks else ():  # 4. 4-bit peer vs plain QLoRA loop
        out = workdir / f"qlora-{shape}" / "bench.json"
        t0 = time.time()
        proc = subprocess.run([sys.executable, str(Path(__file__).parent / "bench_peer.py"), "--shape", shape,
                               "--quantize", "nf4", "--device", "cuda", "--batch-size", "4", "--windows",
                               str(args.windows), "--window-s", str(args.window_s), "--out", str(out)],
                              capture_output=True, text=True, timeout=900)  # fmt: skip
        summary[f"qlora_{shape}"] = json.loads(out.read_text()) if proc.returncode == 0 else \
            (proc.stdout + proc.stderr)[-2500:]
        summary[f"qlora_{shape}_wall_s"] = round(time.time() - t0, 1)
        save(summary)

    if "card" in checks:  # 5. the 7b shape in 4 bits on an 8 GB card's budget
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_peer import build_shape

        spec_7b, _, data_7b = build_shape("7b", workdir / "qlora-7b" / "shapes", 512)
        t0 = time.time()
        p = peer(workdir, "card8gb", ["--run-spec", str(spec_7b), "--data", str(data_7b), "--quantize", "nf4",
                                      "--max-memory", "7.5", "--batch-size", "16", "--max-steps", "4"])  # fmt: skip
        code = p.wait_exit(600)
        ev = p.events()
        started = next((e for e in ev if e["event"] == "started"), {})
        progress = [e for e in ev if e["event"] == "progress"]
        summary["card_7b_nf4_max_memory_7.5"] = {
            "exit": code, "micro_batch": started.get("micro_batch"), "batch_size": started.get("batch_size"),
            "checkpointing": started.get("checkpointing"), "oom_events": [e for e in ev if e["event"] == "oom"],
            "gpu_peak_gb": max((e.get("gpu_peak_gb") or 0 for e in progress), default=None),
            "samples_per_s": progress[-1]["samples_per_second"] if progress else None,
            "local_samples": progress[-1]["local_samples"] if progress else 0, "wall_s": round(time.time() - t0, 1),
            "stderr_tail": p.err_path.read_text()[-1500:] if code else "",
        }  # fmt: skip
        save(summary)

    for quantize in ("none", "nf4") if "serve" in checks else ():  # 6. serving on the GPU
        out = workdir / f"serve-{quantize}.json"
        proc = subprocess.run([sys.executable, str(Path(__file__).parent / "bench_serve.py"), "--shape", "smol",
                               "--device", "cuda", "--quantize", quantize, "--seconds", "20", "--clients", "64",
                               "--out", str(out)], capture_output=True, text=True, timeout=600)  # fmt: skip
        summary[f"serve_smol_{quantize}"] = json.loads(out.read_text()) if proc.returncode == 0 else \
            (proc.stdout + proc.stderr)[-2500:]
        save(summary)

    if "swarm" in checks:  # 3. two GPU peers average together
        both = ["--max-epochs", "4", "--wait-for-peers", "2", "--join-timeout", "120"]
        a = peer(workdir, "swarm0", ["--run-spec", str(spec_path), "--data", str(data), "--batch-size", "32", *both])
        started = a.wait_event("started", 120)
        b = peer(workdir, "swarm1", ["--initial-peers", first_loopback(started), "--run", started["run_id"],
                                     "--data", str(data), "--batch-size", "64", "--seed", "1", *both])  # fmt: skip
        codes = [a.wait_exit(400), b.wait_exit(400)]
        from safetensors.torch import load_file

        ad = [load_file(str(workdir / n / "adapter" / "adapter_model.safetensors")) for n in ("swarm0", "swarm1")]
        summary["two_gpu_peers"] = {
            "exit": codes,
            "max_abs_diff": max((ad[0][k] - ad[1][k]).abs().max().item() for k in ad[0]),
            "groups": [len(e["group"]) for e in a.events("epoch")],
            "averaging_s": [e["averaging_s"] for e in a.events("epoch")],
        }
        save(summary)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
