"""A newcomer's state download, from one donor at a time (hivemind's way) against stripes from several donors at once
(swarm/downloads.py), side by side in one run, on an emulated WAN (devnet/wan.py; needs root) or on loopback.

Each donor is a process of its own on a host of its own (a DHT and our StateAverager over ``--values`` values in 16
tensors, AdamW after one step, all donors bit-identical, at epoch 5); the newcomer, on another host, downloads their
state ``--runs`` times each way, alternating, each download verified against the donors' digest as a peer's is
(epoch and parameters; the statistics by their layout and Adam's bound) and its parameters zeroed between downloads.
Reports the seconds per download, their medians and the ratio, and the state's size.

    python scripts/bench_state_download.py [--donors 3] [--values 262144] [--runs 3] [--wan 40 0.01 20]
                                           [--slow-donor 2] [--out bench-out/bench_state_download.json]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TENSORS = 16
EPOCH = 5


def averager(values: int, donor: bool, initial_peers: list[str], host_maddrs: list[str]):
    import tempfile

    import torch

    from atlas_swarm.identity import Identity
    from atlas_swarm.swarm import Swarm
    from atlas_swarm.swarm.averagers import StateAverager
    from atlas_swarm.swarm.gate import Gate
    from atlas_swarm.swarm.rounds import Settings

    class Bench(StateAverager):
        async def _set_stripes(self, stripes: int) -> None:  # in the averager process
            self.stripes = stripes

    Bench.__name__ = StateAverager.__name__  # hivemind names a class's RPC handlers after it
    swarm = Swarm.join(Identity.load_or_create(Path(tempfile.mkdtemp()) / "identity.key"), initial_peers, host_maddrs)
    dht = swarm.dht
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(values // TENSORS, generator=gen) if donor
                                 else torch.zeros(values // TENSORS)) for _ in range(TENSORS)]  # fmt: skip
    avg = Bench(dht=dht, prefix="bench", params=params, optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
                gather_settings=Settings(gate=Gate(open_run=True)), start=True)  # fmt: skip
    if donor:
        for p in avg.main_parameters:
            p.grad = torch.randn(p.shape, generator=gen)
        avg.step(optimizer_step=True)
        avg.local_epoch = EPOCH
        avg.state_sharing_priority = float(EPOCH)
        avg.allow_state_sharing = True
    return swarm, avg


def donor(args) -> int:
    swarm, avg = averager(args.values, True, args.initial_peers, args.host_maddrs)
    print(json.dumps({"maddrs": swarm.visible_maddrs(), "digest": avg.parameters_digest()}), flush=True)
    sys.stdin.read()  # until the bench closes our stdin
    avg.shutdown()
    swarm.shutdown()
    return 0


def newcomer(args) -> int:
    import torch

    swarm, avg = averager(args.values, False, args.initial_peers, args.host_maddrs)
    dht = swarm.dht
    expect = {(EPOCH, args.digest)}
    deadline = time.monotonic() + 60
    while len((dht.get("bench.all_averagers", latest=True) or (None,))[0] or {}) < args.donors:
        if time.monotonic() > deadline:
            raise SystemExit("the donors' declarations did not appear in 60 s")
        time.sleep(0.5)
    for run in range(args.runs):
        for stripes in (1, args.donors):
            avg._outer_pipe.send(("_set_stripes", [stripes], {}))
            with torch.no_grad():
                for p in avg.main_parameters:
                    p.zero_()
            avg.local_epoch = 0
            began = time.perf_counter()
            avg.load_state_from_peers(expect=expect, timeout=300)
            seconds = time.perf_counter() - began
            ok = avg.local_epoch == EPOCH and avg.parameters_digest() == args.digest
            print(json.dumps({"run": run, "stripes": stripes, "seconds": round(seconds, 3), "verified": ok}),
                  flush=True)  # fmt: skip
    avg.shutdown()
    swarm.shutdown()
    return 0


def bench(args) -> int:
    from atlas_swarm.devnet.netns import Lab

    names = [f"d{i}" for i in range(args.donors)] + ["new"]
    me = [sys.executable, str(Path(__file__).resolve()), "--values", str(args.values), "--donors", str(args.donors)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    donors, rows = [], []
    with Lab("sdl") if args.wan else contextlib.nullcontext() as lab:
        slow = {"d0": args.slow_donor} if args.slow_donor else None
        hosts = lab.wan(names, args.wan[0] / 2, args.wan[1], args.wan[2], uplinks=slow) if args.wan else None
        where = (lambda i: hosts[i].exec()) if hosts else (lambda i: [])
        maddr = (lambda i: hosts[i].maddr()) if hosts else (lambda i: "/ip4/127.0.0.1/tcp/0")
        try:
            first, digests = [], set()
            for i in range(args.donors):
                p = subprocess.Popen([*where(i), *me, "--role", "donor", "--host-maddrs", maddr(i),
                                      *(["--initial-peers", first[0]] if first else [])],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)  # fmt: skip
                donors.append(p)
                line = json.loads(p.stdout.readline())
                mine = f"/{hosts[i].addr}/" if hosts else "/127.0.0.1/"
                first = first or [next(a for a in line["maddrs"] if mine in a)]
                digests.add(line["digest"])
            if len(digests) != 1:
                raise SystemExit(f"the donors' states differ: {digests}")
            (digest,) = digests
            out = subprocess.run([*where(args.donors), *me, "--role", "newcomer", "--host-maddrs", maddr(args.donors),
                                  "--initial-peers", first[0], "--digest", digest, "--runs", str(args.runs)],
                                 stdout=subprocess.PIPE, env=env, text=True, timeout=1800, check=True)  # fmt: skip
            rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        finally:
            for p in donors:
                p.stdin.close()
            for p in donors:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
    one = [r["seconds"] for r in rows if r["stripes"] == 1]
    many = [r["seconds"] for r in rows if r["stripes"] == args.donors]
    state_mb = args.values * 3 * 4 / 1e6  # parameters, exp_avg, exp_avg_sq in float32
    result = {
        "donors": args.donors, "values": args.values, "state_mb": round(state_mb, 2), "wan": args.wan,
        "slow_donor_mbit": args.slow_donor,
        "downloads": rows, "all_verified": all(r["verified"] for r in rows),
        "one_donor_s": one, "stripes_s": many,
        "one_donor_median_s": statistics.median(one), "stripes_median_s": statistics.median(many),
        "speedup_median": round(statistics.median(one) / statistics.median(many), 2),
        "machine": f"{platform.machine()} {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    print(f"{state_mb:.1f} MB state, {args.donors} donors{' on ' + str(args.wan) if args.wan else ' on loopback'}: "
          f"one donor at a time {result['one_donor_median_s']} s (median of {len(one)}: {one}), stripes "
          f"{result['stripes_median_s']} s ({many}): {result['speedup_median']}x; verified: {result['all_verified']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0 if result["all_verified"] else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--donors", type=int, default=3)
    ap.add_argument("--values", type=int, default=262144, help="adapter values (the state holds 3x: Adam's moments)")
    ap.add_argument("--runs", type=int, default=3, help="downloads each way")
    ap.add_argument("--wan", nargs=3, type=float, metavar=("RTT_MS", "LOSS", "MBIT"),
                    help="each process on its own host of an emulated WAN (root)")
    ap.add_argument("--slow-donor", type=float, metavar="MBIT",
                    help="with --wan: one donor's uplink is this slow (its stripe is left and asked of another)")
    ap.add_argument("--out", default="bench-out/bench_state_download.json")
    ap.add_argument("--role", choices=["donor", "newcomer"], help=argparse.SUPPRESS)
    ap.add_argument("--host-maddrs", nargs="+", default=["/ip4/127.0.0.1/tcp/0"], help=argparse.SUPPRESS)
    ap.add_argument("--initial-peers", nargs="*", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--digest", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.donors < 2:
        ap.error("--donors must be 2 or more (stripes need several donors)")
    if args.slow_donor and not args.wan:
        ap.error("--slow-donor needs --wan")
    return {"donor": donor, "newcomer": newcomer, None: bench}[args.role](args)


if __name__ == "__main__":
    sys.exit(main())
