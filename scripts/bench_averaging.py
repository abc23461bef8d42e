"""Averaging cost on loopback, 2 and 4 peers (separate processes, the demo's MiniLM spec at its default settings).

Per swarm size it reports:
- seconds per averaging round (each epoch transition: gradient all-reduce + optimizer step, and the synchronous
  state averaging every `average_state_every` epochs), as peer0 measured it;
- the share of peer0's epoch wall time spent in those rounds;
- bytes each peer sends per epoch (loopback bytes over the window / number of peers, so DHT traffic is included),
  compared with a butterfly all-reduce of every parameter of the base model, 2 (n-1)/n * 4 bytes * params.

    python scripts/bench_averaging.py [--peers 2 4] [--epochs 6] [--out bench-out/bench_averaging.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from atlas_swarm.config import RunSpec
from atlas_swarm.model.lora import load_model

SPEC = Path(__file__).resolve().parent.parent / "atlas_swarm" / "specs" / "demo-minilm-topics.toml"


def events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def swarm_round(n: int, epochs: int, workdir: Path) -> dict:
    shutil.rmtree(workdir, ignore_errors=True)  # fresh peers (an old --out would be resumed)
    workdir.mkdir(parents=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    common = ["--data", "builtin:chatterbot-topics", "--batch-size", "8", "--threads", "1", "--log-format", "json",
              "--max-epochs", str(epochs), "--wait-for-peers", str(n), "--join-timeout", "180",
              "--host-maddrs", "/ip4/127.0.0.1/tcp/0"]  # fmt: skip
    procs = []
    try:
        def launch(i: int, extra: list[str]) -> subprocess.Popen:
            return subprocess.Popen([sys.executable, "-m", "atlas_swarm.peer", "--out", str(workdir / f"p{i}"),
                                     "--seed", str(i), *common, *extra], env=env, start_new_session=True,
                                    stdout=(workdir / f"p{i}.jsonl").open("w"), stderr=subprocess.DEVNULL)  # fmt: skip

        procs.append(launch(0, ["--run-spec", str(SPEC)]))
        log0 = workdir / "p0.jsonl"
        started = wait(lambda: next((e for e in events(log0) if e["event"] == "started"), None), 180)
        maddr = next(a for a in started["maddrs"] if "/127.0.0.1/" in a)
        for i in range(1, n):
            procs.append(launch(i, ["--initial-peers", maddr, "--run", started["run_id"]]))
        # window: from peer0's first epoch transition to its last
        first = wait(lambda: next((e for e in events(log0) if e["event"] == "epoch"), None), 300)
        lo0 = psutil.net_io_counters(pernic=True)["lo"].bytes_sent
        # a peer can also reach the last epoch by downloading state (no epoch event then): stop at "stopping"
        last = wait(lambda: next((e for e in events(log0) if e["event"] == "stopping"), None), 600)
        lo1 = psutil.net_io_counters(pernic=True)["lo"].bytes_sent
        for p in procs:
            p.wait(60)
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    window = [e for e in events(log0) if e["event"] == "epoch" and first["time"] < e["time"] <= last["time"]]
    wall = last["time"] - first["time"]
    rounds = [e["averaging_s"] for e in window]
    return {
        "peers": n,
        "epochs_measured": len(window),
        "seconds_per_round": round(sum(rounds) / len(rounds), 3),
        "averaging_share_of_epoch_time": round(sum(rounds) / wall, 4),
        "epoch_seconds": round(wall / len(window), 2),
        "group_sizes": [len(e["group"]) for e in window],
        "bytes_sent_per_peer_per_epoch": int((lo1 - lo0) / n / len(window)),
    }


def wait(probe, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found is not None:
            return found
        time.sleep(0.2)
    raise SystemExit(f"bench_averaging: timed out after {timeout} s")


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
              f"{r['averaging_share_of_epoch_time']:.1%} of epoch time (epochs of {r['epoch_seconds']} s), "
              f"{r['bytes_sent_per_peer_per_epoch'] / 1e6:.2f} MB sent per peer per epoch = "
              f"{r['ratio_to_full_allreduce']:.4f} of a full-model all-reduce ({full_allreduce / 1e6:.0f} MB)")  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "spec": spec.run_id, "adapter_params": adapter_params, "base_params": full_params, "results": results,
        "machine": f"{platform.machine()} {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
    }, indent=2))  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
