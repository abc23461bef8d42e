#!/usr/bin/env python3
"""How many peers one bootstrap node serves before join latency passes 1 s, and its memory per peer.

Simulated peers are lightweight DHT clients (a hivemind DHTNode in client mode with its own p2pd, all in this
process's event loop). A join is: start the client with the bootstrap as its only initial peer, store a record and
read it back through the swarm. Peers are added in steps and kept connected. At each step the bench reports the
median and p90 join latency of that step's newcomers, and the bootstrap's resident memory (its Python process, its
DHT process and its p2pd). The baseline, side by side: a plain `hivemind.DHT` bootstrap (no monitor, no record
auditing) under the same steps.

    python scripts/bench_bootstrap.py [--steps 1,8,16,32,64] [--json bench-out/bootstrap.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

PLAIN = """
import sys, time, hivemind
dht = hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
print("\\n".join(str(a) for a in dht.get_visible_maddrs()), flush=True)
while True:
    time.sleep(3600)
"""


def start_bootstrap(kind: str, workdir: Path) -> tuple[subprocess.Popen, str]:
    if kind == "atlas":
        cmd = [sys.executable, "-m", "atlas_swarm.bootstrap", "--identity", str(workdir / "id.key"),
               "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--http", "127.0.0.1:0", "--poll-interval", "5"]  # fmt: skip
    else:
        cmd = [sys.executable, "-c", PLAIN]
    log = workdir / f"{kind}.log"
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        m = re.search(r"^(/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+)$", log.read_text(), re.M)
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            raise SystemExit(f"{kind} bootstrap exited:\n{log.read_text()}")
        time.sleep(0.2)
    raise SystemExit(f"{kind} bootstrap printed no multiaddr")


def rss_mb(pid: int) -> float:
    p = psutil.Process(pid)
    return sum(q.memory_info().rss for q in [p, *p.children(recursive=True)]) / 2**20


async def join(maddr: str, i: int):
    from hivemind.dht.node import DHTNode
    from hivemind.utils import get_dht_time

    t0 = time.perf_counter()
    node = await DHTNode.create(initial_peers=[maddr], client_mode=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    key = f"bench-{os.getpid()}-{i}"
    ok = await node.store(key, i, get_dht_time() + 300)
    found = await node.get(key, latest=True)
    if not ok or found is None or found.value != i:
        raise RuntimeError(f"peer {i}: store/get through the bootstrap failed")
    return node, time.perf_counter() - t0


async def measure(kind: str, steps: list[int], workdir: Path) -> list[dict]:
    proc, maddr = start_bootstrap(kind, workdir)
    nodes, rows = [], []
    try:
        base_mb = rss_mb(proc.pid)
        for target in steps:
            latencies = []
            while len(nodes) < target:
                node, dt = await join(maddr, len(nodes))
                nodes.append(node)
                latencies.append(dt)
            await asyncio.sleep(1.0)
            mb = rss_mb(proc.pid)
            row = {"peers": len(nodes), "join_median_s": round(statistics.median(latencies), 3),
                   "join_p90_s": round(sorted(latencies)[int(0.9 * (len(latencies) - 1))], 3),
                   "bootstrap_rss_mb": round(mb, 1),
                   "rss_per_peer_kb": round((mb - base_mb) * 1024 / len(nodes), 1)}  # fmt: skip
            rows.append(row)
            print(f"  {kind:6s} {row['peers']:4d} peers  join median {row['join_median_s']:.3f} s  p90 "
                  f"{row['join_p90_s']:.3f} s  bootstrap RSS {row['bootstrap_rss_mb']:.0f} MB "
                  f"({row['rss_per_peer_kb']:.0f} kB/peer)", flush=True)  # fmt: skip
            if row["join_median_s"] > 1.0:
                break
    finally:
        for node in nodes:
            try:
                await asyncio.wait_for(node.shutdown(), 10)
            except Exception:
                pass
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default="1,8,16,32,64", help="peer counts to measure at")
    ap.add_argument("--json", default="bench-out/bootstrap.json")
    args = ap.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    results = {}
    with tempfile.TemporaryDirectory(prefix="atlas-bench-boot-") as tmp:
        for kind in ("plain", "atlas"):  # the baseline first, then ours; same machine, same steps
            print(f"{kind} bootstrap:")
            results[kind] = asyncio.run(measure(kind, steps, Path(tmp)))
    print("\nratio atlas / plain hivemind (join median, RSS):")
    for a, p in zip(results["atlas"], results["plain"]):
        print(f"  {a['peers']:4d} peers: join {a['join_median_s'] / p['join_median_s']:.2f}x, "
              f"RSS {a['bootstrap_rss_mb'] / p['bootstrap_rss_mb']:.2f}x")
    under = [r["peers"] for r in results["atlas"] if r["join_median_s"] <= 1.0]
    print(f"atlas bootstrap: join median <= 1 s up to {max(under) if under else 0} peers (largest step measured: "
          f"{results['atlas'][-1]['peers']})")  # fmt: skip
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"steps": steps, **results}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
