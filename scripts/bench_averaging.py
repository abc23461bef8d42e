"""Averaging cost on loopback, 2 and 4 peers (separate processes, the demo's MiniLM spec at its default settings).

Per swarm size it reports:
- seconds per averaging round (each epoch transition, as each peer timed it inside step(): waiting for the group's
  slowest member, gradient all-reduce, optimizer step, and the synchronous state averaging every
  `average_state_every` epochs);
- the share of each peer's epoch wall time spent in those rounds, and its mean over the peers;
- bytes each peer sends per epoch (loopback bytes over the window / number of peers, so DHT traffic is included),
  compared with a butterfly all-reduce of every parameter of the base model, 2 (n-1)/n * 4 bytes * params;
- how many of the peers' rounds averaged with every peer (a warning when some did not: a swarm whose rounds fail
  can look cheap).

    python scripts/bench_averaging.py [--peers 2 4] [--epochs 6] [--out bench-out/bench_averaging.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import psutil

from atlas_swarm.config import RunSpec
from atlas_swarm.launch import PeerProcess, first_loopback
from atlas_swarm.model.lora import load_model

SPEC = Path(__file__).resolve().parent.parent / "atlas_swarm" / "specs" / "demo-minilm-topics.toml"


def swarm_round(n: int, epochs: int, workdir: Path) -> dict:
    shutil.rmtree(workdir, ignore_errors=True)  # fresh peers (an old --out would be resumed)
    workdir.mkdir(parents=True)
    common = ["--data", "builtin:chatterbot-topics", "--batch-size", "8", "--max-epochs", str(epochs),
              "--wait-for-peers", str(n), "--join-timeout", "180", "--host-maddrs", "/ip4/127.0.0.1/tcp/0"]  # fmt: skip
    procs: list[PeerProcess] = []
    try:
        def launch(i: int, extra: list[str]) -> PeerProcess:
            return PeerProcess(workdir / f"p{i}", ["--seed", str(i), *common, *extra], threads=1,
                               env={"HF_HUB_OFFLINE": "1"})  # fmt: skip

        procs.append(launch(0, ["--run-spec", str(SPEC)]))
        started = wait(procs, "started", 180)
        for i in range(1, n):
            procs.append(launch(i, ["--initial-peers", first_loopback(started), "--run", started["run_id"]]))
        # bytes: from peer0's first epoch transition to its stop
        wait(procs, "epoch", 300)
        lo0 = psutil.net_io_counters(pernic=True)["lo"].bytes_sent
        # a peer can also reach the last epoch by downloading state (no epoch event then): stop at "stopping"
        wait(procs, "stopping", 600)
        lo1 = psutil.net_io_counters(pernic=True)["lo"].bytes_sent
        for p in procs:
            p.wait_exit(60)
    finally:
        for p in procs:
            p.kill()
    # each peer's window: from its first epoch transition to its "stopping" event; the share is the mean over peers
    # (a peer that reaches the boundary first waits for the others, so one peer's share can hide another's)
    shares, rounds, epoch_seconds, groups = [], [], [], []
    for i in range(n):
        ev = procs[i].events()
        start = next(e for e in ev if e["event"] == "epoch")["time"]
        end = next(e for e in ev if e["event"] == "stopping")["time"]
        window = [e for e in ev if e["event"] == "epoch" and start < e["time"] <= end]
        if not window:
            continue
        spent = [e["averaging_s"] for e in window]
        shares.append(sum(spent) / (end - start))
        rounds += spent
        epoch_seconds.append((end - start) / len(window))
        groups.append([len(e["group"]) for e in window])
    return {
        "peers": n,
        "epochs_measured": len(groups[0]) if groups else 0,
        "seconds_per_round": round(sum(rounds) / len(rounds), 3),
        "averaging_share_of_epoch_time": round(sum(shares) / len(shares), 4),
        "share_per_peer": [round(x, 4) for x in shares],
        "epoch_seconds": round(sum(epoch_seconds) / len(epoch_seconds), 2),
        "group_sizes": groups,
        # rounds without every peer (or with none: local gradients) make a share that is not a healthy swarm's
        "rounds_with_all_peers": sum(g == n for row in groups for g in row),
        "rounds": sum(len(row) for row in groups),
        "bytes_sent_per_peer_per_epoch": int((lo1 - lo0) / n / len(groups[0])),
    }


def wait(procs: list[PeerProcess], kind: str, timeout: float) -> dict:
    """peer0's first ``kind`` event; exits if any peer fails first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = procs[0].events(kind)
        if found:
            return found[0]
        crashed = [p.name for p in procs if p.process.poll() not in (None, 0)]
        if crashed:
            raise SystemExit(f"bench_averaging: {crashed} exited with an error:\n{procs[0].tail()}")
        time.sleep(0.2)
    raise SystemExit(f"bench_averaging: no '{kind}' within {timeout} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--out", default="bench-out/bench_averaging.json")
    args = ap.parse_args()
    out = Path(args.out)
    spec = RunSpec.from_toml(SPEC)
    model, _ = load_model(spec)
    full_params = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapter_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    results = []
    for n in args.peers:
        r = swarm_round(n, args.epochs, out.parent / f"averaging-{n}")
        full_allreduce = 2 * (n - 1) / n * 4 * full_params
        r["full_model_allreduce_bytes"] = int(full_allreduce)
        r["ratio_to_full_allreduce"] = round(r["bytes_sent_per_peer_per_epoch"] / full_allreduce, 5)
        results.append(r)
        print(f"{n} peers: {r['seconds_per_round']:.2f} s per averaging round, "
              f"{r['averaging_share_of_epoch_time']:.1%} of epoch time (mean over peers; per peer "
              f"{', '.join(f'{x:.1%}' for x in r['share_per_peer'])}; epochs of {r['epoch_seconds']} s), "
              f"{r['bytes_sent_per_peer_per_epoch'] / 1e6:.2f} MB sent per peer per epoch = "
              f"{r['ratio_to_full_allreduce']:.4f} of a full-model all-reduce ({full_allreduce / 1e6:.0f} MB)")  # fmt: skip
        if r["rounds_with_all_peers"] < r["rounds"]:
            print(f"  WARNING: only {r['rounds_with_all_peers']} of {r['rounds']} rounds averaged all {n} peers "
                  f"(group sizes per peer: {r['group_sizes']}); the share above is not that of a healthy swarm")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "spec": spec.run_id, "adapter_params": adapter_params, "base_params": full_params, "results": results,
        "machine": f"{platform.machine()} {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
    }, indent=2))  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
