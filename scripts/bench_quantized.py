"""Does a 4-bit peer cost the swarm's adapter anything? Two swarms of the demo task, side by side in one run:
A, two full-precision peers; B, the same two peers with the second one's base loaded in NF4 (`--quantize nf4`).
Each trains the demo spec (MiniLM, LoRA, 20 topics) on the same two non-IID shards for the same epochs; the final
adapters are scored on the held-out dialogs with the full-precision base. Figures: held-out loss and accuracy of
each, the ratio B/A (goal: loss within 2 %), and each peer's samples/s. JSON on stdout and in --out.

    .venv/bin/python scripts/bench_quantized.py [--epochs 6] [--repeats 1] [--precision fp32|bf16]

``--precision bf16`` runs every peer under bf16 autocast (on a CPU: torch's CPU autocast): A is then an all-bf16
swarm and B a bf16 peer beside an NF4 one, the issue's "4-bit peer and bf16 peer" case.

On a CPU, NF4 runs on bitsandbytes' plain-torch CPU backend (the peer is told `--device cpu` explicitly); on a GPU
pass `--device cuda` to run both swarms there (the NF4 peer then uses bitsandbytes' CUDA kernels).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from atlas_swarm.config import RunSpec
from atlas_swarm.launch import PeerProcess, first_loopback
from atlas_swarm.model.lora import load_adapter_weights, load_model
from atlas_swarm.train.builtin import chatterbot_topics, shard_non_iid
from atlas_swarm.train.data import Batches, load_examples
from atlas_swarm.train.steps import evaluate

SPEC = Path(__file__).resolve().parent.parent / "atlas_swarm" / "specs" / "demo-minilm-topics.toml"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run_swarm(out: Path, shards: list[Path], epochs: int, device: str, quantize: list[str],
              precision: str = "fp32") -> dict:  # fmt: skip
    """Two peers, the second with ``quantize[1]``; returns its final adapter folder and each peer's figures."""
    shutil.rmtree(out, ignore_errors=True)
    common = ["--max-epochs", str(epochs), "--wait-for-peers", "2", "--join-timeout", "120", "--batch-size", "8",
              "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--device", device, "--precision", precision]  # fmt: skip
    peers = []
    try:
        peers.append(PeerProcess(out / "peer0", ["--run-spec", str(SPEC), "--data", str(shards[0]), "--seed", "0",
                                                 "--quantize", quantize[0], *common], threads=1, env=OFFLINE))
        started = peers[0].wait_event("started", 180)
        peers.append(PeerProcess(out / "peer1", ["--initial-peers", first_loopback(started), "--run",
                                                 started["run_id"], "--data", str(shards[1]), "--seed", "1",
                                                 "--quantize", quantize[1], *common], threads=1, env=OFFLINE))
        codes = [p.wait_exit(1200) for p in peers]
        if codes != [0, 0]:
            raise SystemExit("bench_quantized: a peer failed:\n" + "\n\n".join(p.tail() for p in peers))
        figures = []
        for p, q in zip(peers, quantize):
            epochs_ = p.events("epoch")
            stopped = p.events("stopped")[0]
            busy = stopped["time"] - p.events("started")[0]["time"]  # training, averaging and the final vote
            figures.append({"quantize": q, "samples": stopped["samples_total"], "steps": stopped["steps"],
                            "averaged_rounds": sum(len(e["group"]) >= 2 for e in epochs_),
                            "samples_per_s": round(stopped["samples_total"] / busy, 1),
                            "final_hash": p.events("final")[0]["adapter_hash"] if p.events("final") else None})
        return {"adapter": out / "peer1" / "adapter", "peers": figures}
    finally:
        for p in peers:
            p.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=1, help="run both swarms this many times (figures per repeat)")
    ap.add_argument("--device", default="cpu", help="cpu (bitsandbytes' CPU backend) or cuda")
    ap.add_argument("--precision", default="fp32", help="every peer's --precision: fp32 or bf16")
    ap.add_argument("--out", default="bench-out/quantized")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    train = chatterbot_topics("train")
    shards = []
    for i in range(2):
        path = out / f"shard{i}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in shard_non_iid(train, 2, i)))
        shards.append(path)
    spec = RunSpec.from_toml(SPEC)
    model, tokenizer = load_model(spec)
    heldout = Batches(load_examples("builtin:chatterbot-topics-heldout", spec), tokenizer, spec)
    base = evaluate(model, heldout, "cpu", spec.model.task)
    repeats = []
    for r in range(args.repeats):
        row = {}
        for name, quantize in (("full", ["none", "none"]), ("mixed_nf4", ["none", "nf4"])):
            t0 = time.monotonic()
            result = run_swarm(out / f"{name}{r}", shards, args.epochs, args.device, quantize, args.precision)
            model, _ = load_model(spec)
            load_adapter_weights(model, result["adapter"])
            scores = evaluate(model, heldout, "cpu", spec.model.task)
            row[name] = {"heldout_loss": round(scores["loss"], 4), "heldout_accuracy": round(scores["accuracy"], 4),
                         "wall_s": round(time.monotonic() - t0, 1), "peers": result["peers"]}  # fmt: skip
            print(f"repeat {r} {name}: {row[name]}", file=sys.stderr)
        row["loss_ratio_mixed_over_full"] = round(row["mixed_nf4"]["heldout_loss"] / row["full"]["heldout_loss"], 4)
        repeats.append(row)
    ratios = [r["loss_ratio_mixed_over_full"] for r in repeats]
    report = {
        "bench": "quantized", "date": time.strftime("%Y-%m-%d"), "machine": platform.machine(),
        "cpus": __import__("os").cpu_count(), "device": args.device, "precision": args.precision,
        "torch": torch.__version__,
        "bitsandbytes": __import__("bitsandbytes").__version__, "epochs": args.epochs,
        "base_heldout": {k: round(v, 4) for k, v in base.items()}, "repeats": repeats,
        "loss_ratio_median": statistics.median(ratios), "goal": "mixed swarm's held-out loss within 2 % of full's",
        "within_2_percent": all(abs(x - 1) <= 0.02 for x in ratios),
    }  # fmt: skip
    (out / "bench_quantized.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
