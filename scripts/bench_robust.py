"""Robust aggregation on the demo task: held-out loss and accuracy of the trained adapter, clean vs. each attack, for
hivemind's plain mean (what a round did before), our checked mean, centered_clip and trimmed_mean, side by side.

What it runs: one MiniLM + LoRA model (the demo spec) in this process stands for the adapter every honest peer holds
(honest peers hold bit-identical adapters: train/aggregate.py). Each epoch every peer computes a real gradient on
its own label-skewed shard of the demo data (the demo's shards); the attacker computes its honest gradient and
then sends the attack instead. The updates go through what a round applies (gather.py): updates that are not
finite, or claim a weight that is not finite or negative, are dropped (not by "hivemind-mean": hivemind had no such
check), then train/aggregate.py's rule, then AdamW. The network is not in this benchmark (tests/integration/
test_byzantine.py runs the same attacks through real peers); the rules and the checks are the production code.

    python scripts/bench_robust.py [--sizes 4:1 8:3] [--epochs 12] [--samples-per-epoch 96] [--attacks ...]
                                   [--out bench-out/bench_robust.json]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from atlas_swarm.config import RunSpec
from atlas_swarm.model.lora import adapter_parameters, load_model
from atlas_swarm.train.aggregate import aggregate
from atlas_swarm.train.builtin import chatterbot_topics, shard_non_iid
from atlas_swarm.train.data import Batches, load_examples
from atlas_swarm.train.steps import evaluate

SPEC = Path(__file__).resolve().parent.parent / "atlas_swarm" / "specs" / "demo-minilm-topics.toml"
RULES = ("hivemind-mean", "mean", "centered_clip", "trimmed_mean")
ATTACKS = {  # update, claimed weight: what the attacker sends, from its honest gradient g and samples s
    "clean": None,
    "nan": lambda g, s, first: (torch.full_like(g, math.nan), s),
    "flip_x1e6_weight_x1e6": lambda g, s, first: (-1e6 * g, s * 1e6),
    "random_x100": lambda g, s, first: (100 * g.norm() / math.sqrt(g.numel()) * torch.randn_like(g), s),
    "stale": lambda g, s, first: (first, s),  # its gradient from the first epoch, every epoch
    "lying_weight": lambda g, s, first: (g, s * 1e6),  # its own (non-IID) gradient, claimed a million times
}


def shards_for(spec: RunSpec, n: int) -> list[list]:
    rows = chatterbot_topics("train")
    by_text = {e.text: e for e in load_examples("builtin:chatterbot-topics", spec)}
    return [[by_text[r["text"]] for r in shard_non_iid(rows, n, i) if r["text"] in by_text] for i in range(n)]


def run(spec: RunSpec, model, tokenizer, init: list, shards, heldout, rule: str, attack: str, bad: int,
        epochs: int, per_peer: int) -> dict:  # fmt: skip
    params = [p for _, p in adapter_parameters(model)]
    with torch.no_grad():
        for p, v in zip(params, init):
            p.copy_(v)
    opt = torch.optim.AdamW(params, lr=spec.optimizer.lr, weight_decay=spec.optimizer.weight_decay)
    batches = [Batches(s, tokenizer, spec, seed=i) for i, s in enumerate(shards)]
    n, first = len(shards), {}
    flagged = 0
    for _ in range(epochs):
        updates, claims = [], []
        for i in range(n):
            model.zero_grad(set_to_none=True)
            model(**batches[i].next(per_peer)).loss.backward()
            g = torch.cat([p.grad.reshape(-1) for p in params]).float()
            s = float(per_peer)
            if i >= n - bad and ATTACKS[attack] is not None:
                first.setdefault(i, g.clone())
                g, s = ATTACKS[attack](g, s, first[i])
            updates.append(g)
            claims.append(s)
        if rule == "hivemind-mean":  # hivemind: weights as sent, no checks
            w = torch.tensor(claims, dtype=torch.float64)
            value = (torch.stack(updates).double() * w[:, None]).sum(0) / w.sum()
        else:
            keep = [i for i in range(n) if math.isfinite(claims[i]) and claims[i] >= 0 and bool(torch.isfinite(updates[i]).all())]
            result = aggregate(rule, [updates[i].numpy() for i in keep], [claims[i] for i in keep],
                               cap=spec.averaging.target_batch_size, beta=spec.trust.trim)  # fmt: skip
            value = torch.from_numpy(result.value)
            flagged += sum(1 for j in result.flagged if keep[j] >= n - bad)
        offset = 0
        for p in params:
            p.grad = value[offset : offset + p.numel()].view_as(p).to(p.dtype).clone()
            offset += p.numel()
        opt.step()
    if not all(bool(torch.isfinite(p).all()) for p in params):
        return {"loss": math.nan, "accuracy": math.nan, "attacker_flagged": flagged}
    out = evaluate(model, heldout, "cpu", spec.model.task)
    return {"loss": round(out["loss"], 4), "accuracy": round(out["accuracy"], 4), "attacker_flagged": flagged}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="*", default=["4:1", "8:3"], help="peers:attackers")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--samples-per-epoch", type=int, default=96, help="the swarm's samples per epoch (the demo: 192)")
    ap.add_argument("--attacks", nargs="*", default=list(ATTACKS))
    ap.add_argument("--out", default="bench-out/bench_robust.json")
    a = ap.parse_args()
    torch.set_num_threads(2)
    spec = RunSpec.from_toml(SPEC)
    model, tokenizer = load_model(spec)
    model.train()
    init = [p.detach().clone() for _, p in adapter_parameters(model)]
    heldout = Batches(load_examples("builtin:chatterbot-topics-heldout", spec), tokenizer, spec)
    results, t0 = [], time.time()
    for size in a.sizes:
        n, bad = map(int, size.split(":"))
        shards = shards_for(spec, n)
        per_peer = max(1, a.samples_per_epoch // n)
        for attack in a.attacks:
            for rule in RULES:
                torch.manual_seed(0)
                r = run(spec, model, tokenizer, init, shards, heldout, rule, attack, 0 if attack == "clean" else bad,
                        a.epochs, per_peer)  # fmt: skip
                results.append({"peers": n, "attackers": bad if attack != "clean" else 0, "attack": attack,
                                "rule": rule, **r})  # fmt: skip
                print(json.dumps(results[-1]), flush=True)
    for r in results:  # held-out loss relative to the clean run of the same size and rule
        clean = next(c for c in results if c["peers"] == r["peers"] and c["rule"] == r["rule"] and c["attack"] == "clean")
        r["loss_vs_clean"] = round(r["loss"] / clean["loss"], 4) if math.isfinite(r["loss"]) else None
    report = {"bench": "robust", "time": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.platform(),
              "cpus": torch.get_num_threads(), "epochs": a.epochs, "samples_per_epoch": a.samples_per_epoch,
              "seconds": round(time.time() - t0),
              "results": results}  # fmt: skip
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
