"""One swarm peer alone vs a plain PyTorch + PEFT loop: same model (all-MiniLM-L6-v2 + the demo's LoRA), data, batch
and thread count. The two alternate, --repeats times each (a single run of the plain loop varies by +-12 % on a
2-core machine), and the ratio of the medians is reported with each run's figure. Writes JSON.

    python scripts/bench_peer.py [--steps 60] [--batch-size 8] [--threads 2] [--repeats 3] [--out bench-out/bench_peer.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from atlas_swarm.config import RunSpec
from atlas_swarm.model.lora import adapter_parameters, load_model
from atlas_swarm.train.data import Batches, load_examples
from atlas_swarm.train.steps import Precision, accumulate_gradients

SPEC = Path(__file__).resolve().parent.parent / "atlas_swarm" / "specs" / "demo-minilm-topics.toml"
WARMUP = 5


def plain_loop(steps: int, batch_size: int, threads: int) -> float:
    torch.set_num_threads(threads)
    spec = RunSpec.from_toml(SPEC)
    model, tokenizer = load_model(spec)
    model.train()
    batches = Batches(load_examples("builtin:chatterbot-topics", spec), tokenizer, spec)
    opt = torch.optim.AdamW([p for _, p in adapter_parameters(model)], lr=spec.optimizer.lr)
    precision = Precision.for_device("cpu")
    for step in range(WARMUP + steps):
        if step == WARMUP:
            t0 = time.perf_counter()
        accumulate_gradients(model, batches.next, batch_size, batch_size, "cpu", precision)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * batch_size / (time.perf_counter() - t0)


def swarm_peer(steps: int, batch_size: int, threads: int, workdir: Path) -> float:
    shutil.rmtree(workdir / "peer", ignore_errors=True)  # a fresh peer each time (an old --out would be resumed)
    cmd = [sys.executable, "-m", "atlas_swarm.peer", "--run-spec", str(SPEC), "--data", "builtin:chatterbot-topics",
           "--batch-size", str(batch_size), "--threads", str(threads), "--max-steps", str(WARMUP + steps),
           "--log-format", "json", "--out", str(workdir / "peer"), "--host-maddrs", "/ip4/127.0.0.1/tcp/0"]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0:
        raise SystemExit(f"peer failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    # steady state: from the progress event nearest WARMUP steps in, to the stop
    progress = [e for e in events if e["event"] == "progress" and e["local_samples"] >= WARMUP * batch_size]
    stopping = next(e for e in events if e["event"] == "stopping")
    first = progress[0]
    samples = (WARMUP + steps) * batch_size - first["local_samples"]
    return samples / (stopping["time"] - first["time"])


def run_isolated(what: str, args) -> float:
    """The plain loop in a fresh process, like the peer, so neither inherits the other's threads or caches."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from bench_peer import plain_loop; "
            f"print(plain_loop({args.steps}, {args.batch_size}, {args.threads}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"plain loop failed:\n{proc.stderr[-2000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench-out/bench_peer.json")
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plains, peers = [], []
    for _ in range(args.repeats):
        plains.append(run_isolated("plain", args))
        peers.append(swarm_peer(args.steps, args.batch_size, args.threads, out.parent))
    plain, peer = statistics.median(plains), statistics.median(peers)
    result = {
        "plain_peft_samples_per_s": round(plain, 2),
        "swarm_peer_samples_per_s": round(peer, 2),
        "ratio": round(peer / plain, 3),
        "plain_runs": [round(x, 2) for x in plains],
        "peer_runs": [round(x, 2) for x in peers],
        "steps": args.steps, "batch_size": args.batch_size, "threads": args.threads,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    out.write_text(json.dumps(result, indent=2))
    print(f"plain PEFT loop {plain:.2f} samples/s (runs {result['plain_runs']}) | swarm peer {peer:.2f} samples/s "
          f"(runs {result['peer_runs']}) | ratio of medians {peer / plain:.3f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
