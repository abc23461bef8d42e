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

``--runs K`` repeats each swarm K times and reports the distribution of the share (one slow round can cost a whole
run: the median hides it, the maximum does not). ``--wan RTT_MS LOSS MBIT`` puts each peer on a host of its own on an
emulated WAN (devnet/wan.py; needs root): bytes are then what the hosts' uplinks carried. ``--straggler MBIT`` (with
``--wan``) gives one peer that slow an uplink and reports the share of the others and of the straggler, and how many
groupmates' updates were cut off. ``--late-joiner`` starts the last peer after the others' first averaged epoch and
reports, for it, the time from its process start to its first epoch averaged with others, its start-up phases, and
the epoch transitions it made alone before that one (the shares are then those of the others); with ``--own-core``
the joiner runs on CPU 1 alone and the others share CPU 0 (a joiner on a machine of its own); ``--joiner-after S``
starts it S seconds later (one value per run, cycling: where in an epoch its start-up ends). Each run's peers
(events, adapters, stderr: hivemind's log with ``--verbose``) stay in ``averaging-N-runK/`` beside the JSON.
``--compression none float16 uniform8bit blockwise4bit`` runs each swarm once per compression (the spec's
``averaging.compression``; one run id each), side by side, and adds the held-out loss and accuracy of peer 0's final
adapter (512 dialogs) and its ratio to the first compression's. ``--as-7b`` gives the demo's adapter the size of a
7B one (LoRA r=397 on every linear layer of MiniLM: 16,776,980 values; Llama-2-7B with LoRA r=16 on q/k/v/o has
16,777,216) and compares each peer's bytes with a full-model all-reduce of Llama-2-7B's 6,738,415,616 parameters:
what a peer of a 7B run sends per epoch, measured with the real protocol (a MiniLM base trains in its place;
rounds get 90 s). ``--aggregation RULE`` sets the spec's ``trust.aggregation`` (``mean``, an allowlist run's default,
averages a pair, so a group of 3 cuts a straggler off after the grace: gather.py).

    python scripts/bench_averaging.py [--peers 2 4] [--epochs 6] [--runs 1] [--wan 40 0.01 20 [--straggler 2]]
                                      [--late-joiner [--own-core] [--joiner-after S ...]] [--compression none ...]
                                      [--as-7b] [--aggregation mean] [--verbose]
                                      [--out bench-out/bench_averaging.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import psutil

from atlas_swarm.config import RunSpec
from atlas_swarm.devnet.netns import Lab
from atlas_swarm.launch import PeerProcess
from atlas_swarm.model.lora import load_model

SPEC = Path(__file__).resolve().parent.parent / "atlas_swarm" / "specs" / "demo-minilm-topics.toml"


def swarm_round(n: int, epochs: int, workdir: Path, wan: list | None = None, late: bool = False,
                straggler: float | None = None, spec_path: Path = SPEC, verbose: bool = False,
                own_core: bool = False, starved: int | None = None, late_after: float = 0.0) -> dict:  # fmt: skip
    shutil.rmtree(workdir, ignore_errors=True)  # fresh peers (an old --out would be resumed)
    workdir.mkdir(parents=True)
    early = n - 1 if late else n
    slow = early - 1 if straggler else None  # the peer with the slow uplink
    common = ["--data", "builtin:chatterbot-topics", "--batch-size", "8", "--max-epochs", str(epochs),
              "--join-timeout", "180", *(["--verbose"] if verbose else [])]  # fmt: skip
    procs: list[PeerProcess] = []
    with (Lab("bench") if wan else contextlib.nullcontext()) as lab:
        uplinks = {f"p{slow}": straggler} if straggler else None
        hosts = lab.wan([f"p{i}" for i in range(n)], wan[0] / 2, wan[1], wan[2], uplinks=uplinks) if wan else None
        try:
            def launch(i: int, extra: list[str]) -> PeerProcess:
                where = ["--host-maddrs", hosts[i].maddr() if hosts else "/ip4/127.0.0.1/tcp/0"]
                peer = PeerProcess(workdir / f"p{i}", ["--seed", str(i), *common, *where, *extra], threads=1,
                                   env={"HF_HUB_OFFLINE": "1"}, netns=hosts[i].ns if hosts else None)  # fmt: skip
                if own_core:  # before it starts its DHT, averagers and p2pd, which inherit the core
                    os.sched_setaffinity(peer.process.pid, {1} if late and i == n - 1 else {0})
                if starved is not None:  # every peer on CPU 0, all but p0 in a session (autogroup) of lower weight
                    os.sched_setaffinity(peer.process.pid, {0})
                    if i > 0:
                        Path(f"/proc/{peer.process.pid}/autogroup").write_text(str(starved))
                return peer

            procs.append(launch(0, ["--run-spec", str(spec_path), "--wait-for-peers", str(early)]))
            started = wait(procs, "started", 180)
            mine = f"/{hosts[0].addr}/" if hosts else "/127.0.0.1/"
            first = next(a for a in started["maddrs"] if mine in a)
            join = ["--initial-peers", first, "--run", started["run_id"]]
            for i in range(1, early):
                procs.append(launch(i, [*join, "--wait-for-peers", str(early)]))
            # bytes: from peer0's first epoch transition to its stop
            wait(procs, "epoch", 300)
            joined_at = None
            if late:
                time.sleep(late_after)  # where in an epoch its start-up ends decides how long it then waits
                joined_at = time.time()
                procs.append(launch(n - 1, join))
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
    shares, rounds, epoch_seconds, groups, cut = [], [], [], [], 0
    boundaries: dict[int, list[float]] = {}  # epoch -> when each peer began the round that ended it
    for i in range(early):
        ev = procs[i].events()
        start = next(e for e in ev if e["event"] == "epoch")["time"]
        end = next(e for e in ev if e["event"] == "stopping")["time"]
        window = [e for e in ev if e["event"] == "epoch" and start < e["time"] <= end]
        if not window:
            continue
        spent = [e["averaging_s"] for e in window]
        for e in window:
            boundaries.setdefault(e["epoch"], []).append(e["time"] - e["averaging_s"])
        cut += sum(why.startswith("sent nothing in time") for e in window for why in e.get("dropped", {}).values())
        shares.append(sum(spent) / (end - start))
        rounds += spent
        epoch_seconds.append((end - start) / len(window))
        groups.append([len(e["group"]) for e in window])
    # bytes: on a WAN, what the hosts' uplinks carried over the whole run; on loopback, over peer0's window
    sent = sum(c["bytes"] for c in lab.wan_counts.values()) if wan else lo1 - lo0
    measured_epochs = max(e["epoch"] for e in procs[0].events("epoch")) if wan else len(groups[0])
    result = {
        "peers": n,
        "epochs_measured": len(groups[0]) if groups else 0,
        "seconds_per_round": round(sum(rounds) / len(rounds), 3),
        "averaging_share_of_epoch_time": round(sum(shares) / len(shares), 4),
        "share_per_peer": [round(x, 4) for x in shares],
        "epoch_seconds": round(sum(epoch_seconds) / len(epoch_seconds), 2),
        "group_sizes": groups,
        # rounds without every peer (or with none: local gradients) make a share that is not a healthy swarm's
        "rounds_with_all_peers": sum(g >= early for row in groups for g in row),  # (with a late joiner: the others)
        "rounds": sum(len(row) for row in groups),
        # groupmates whose update was not in within gather's grace (or WAIT): each peer's count, summed
        "groupmates_cut_off": cut,
        "bytes_sent_per_peer_per_epoch": int(sent / n / measured_epochs),
        # per epoch, how far apart the peers reached its end (began the round that ended it): the views of the
        # swarm's progress that agree, or not
        "boundary_skew_s": [round(max(t) - min(t), 2) for _, t in sorted(boundaries.items()) if len(t) == early],
        "final_adapters": len({e["adapter_hash"] for p in procs for e in p.events("final")}),
    }
    if wan:
        result["wan"] = {"rtt_ms": wan[0], "loss": wan[1], "uplink_mbit": wan[2], "hosts": lab.wan_counts}
    if straggler:
        on_time = [x for i, x in enumerate(shares) if i != slow]
        result["straggler"] = {"peer": slow, "uplink_mbit": straggler, "share_of_the_others": round(
            sum(on_time) / len(on_time), 4), "share_of_the_straggler": round(shares[slow], 4)}
    if late:
        result["late_joiner"] = dict(joiner_figures(procs[-1], joined_at), started_after_s=late_after)
    return result


def joiner_figures(joiner: PeerProcess, launched: float) -> dict:
    """From the joiner's process start to its first epoch averaged with others, and what it did on the way."""
    events = joiner.events()
    epochs = [e for e in events if e["event"] == "epoch"]
    first = next((i for i, e in enumerate(epochs) if len(e["group"]) >= 2), None)
    started = next((e for e in events if e["event"] == "started"), {})
    return {
        "start_to_first_averaged_epoch_s": round(epochs[first]["time"] - launched, 2) if first is not None else None,
        "start_to_started_s": round(started["time"] - launched, 2) if started else None,
        "startup_s": started.get("startup_s"),
        "epochs_alone_before": first if first is not None else len(epochs),
        "epochs_alone_after": sum(len(e["group"]) < 2 for e in epochs[first + 1 :]) if first is not None else None,
    }


LLAMA2_7B_PARAMS = 6_738_415_616
# rounds get 90 s: centered_clip of 4 x 16.8M values took 4-6 s on a quiet core of this VM and 22 s with 4 peers
# training on its 2 cores, past the demo's 20 s (every round failed)
AS_7B = (("r = 8\n", "r = 397\n"), ('["query", "value"]', '["query", "key", "value", "dense"]'),
         ("averaging_timeout = 20.0", "averaging_timeout = 90.0"))


def compression_spec(compression: str, folder: Path, as_7b: bool = False, aggregation: str = "") -> Path:
    """The demo spec with ``averaging.compression`` set (a run of its own: the run id commits to it), with ``as_7b``
    an adapter of a 7B one's size (--as-7b), and with ``aggregation`` that rule (--aggregation)."""
    text = SPEC.read_text()
    for old, new in (('compression = "none"', f'compression = "{compression}"'),) + (AS_7B if as_7b else ()):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    if aggregation:
        text += f'\n[trust]\naggregation = "{aggregation}"\n'
    path = folder / f"spec-{compression}{'-as-7b' if as_7b else ''}{f'-{aggregation}' if aggregation else ''}.toml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    RunSpec.from_toml(path)  # a name the spec does not know fails here, not in four peers
    return path


def heldout_batches(spec: RunSpec):
    from atlas_swarm.train.data import Batches, load_examples

    _, tokenizer = load_model(spec)
    return Batches(load_examples("builtin:chatterbot-topics-heldout", spec), tokenizer, spec)


def heldout_scores(spec: RunSpec, batches, adapter_dir: Path) -> dict:
    from atlas_swarm.model.lora import load_adapter_weights
    from atlas_swarm.train.steps import evaluate

    model, _ = load_model(spec)
    load_adapter_weights(model, adapter_dir)
    return {k: round(v, 4) for k, v in evaluate(model, batches, "cpu", spec.model.task).items()}


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
    ap.add_argument("--runs", type=int, default=1, help="swarms per size: the share's distribution")
    ap.add_argument("--wan", type=float, nargs=3, metavar=("RTT_MS", "LOSS", "MBIT"),
                    help="each peer on its own host of an emulated WAN (root)")  # fmt: skip
    ap.add_argument("--late-joiner", action="store_true", help="the last peer joins after the first averaged epoch")
    ap.add_argument("--straggler", type=float, metavar="MBIT",
                    help="with --wan: one peer's uplink is this slow (a straggler in every round)")
    ap.add_argument("--compression", nargs="+", default=[], help="one swarm per compression (none, float16, "
                    "scaled-float16, uniform8bit, blockwise4bit), with held-out scores")  # fmt: skip
    ap.add_argument("--joiner-after", type=float, nargs="+", default=[0.0], metavar="S",
                    help="with --late-joiner: start it S seconds after the others' first averaged epoch (run k takes "
                         "the k-th value, cycling): its start-up then ends at another point of an epoch")
    ap.add_argument("--own-core", action="store_true", help="with --late-joiner: the joiner runs on CPU 1 alone "
                    "and the others share CPU 0 (a joiner on a machine of its own; the others' epochs get longer)")
    ap.add_argument("--starved", type=int, metavar="NICE", help="every peer on CPU 0, all but the first in an "
                    "autogroup of this nice (10: the first does about 9x the others' samples): unequal peers")
    ap.add_argument("--as-7b", action="store_true", help="an adapter of a 7B one's size (16.8M values), bytes "
                    "compared with a full-model all-reduce of Llama-2-7B")  # fmt: skip
    ap.add_argument("--aggregation", default="", choices=["", "mean", "centered_clip", "trimmed_mean"],
                    help="the spec's trust.aggregation (default: the spec's, centered_clip in an open run)")
    ap.add_argument("--verbose", action="store_true", help="hivemind's logs on each peer's stderr (in its folder)")
    ap.add_argument("--out", default="bench-out/bench_averaging.json")
    args = ap.parse_args()
    if args.own_core and not (args.late_joiner and len(os.sched_getaffinity(0)) >= 2):
        ap.error("--own-core needs --late-joiner and 2 CPUs")
    if args.starved is not None and Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() != "1":
        ap.error("--starved needs the kernel's autogroup scheduling (/proc/sys/kernel/sched_autogroup_enabled)")
    if args.straggler and not args.wan:
        ap.error("--straggler needs --wan (a slow uplink is the WAN's)")
    out = Path(args.out)
    custom = args.as_7b or args.aggregation
    spec = RunSpec.from_toml(compression_spec("none", out.parent, args.as_7b, args.aggregation) if custom else SPEC)
    model, _ = load_model(spec)
    full_params = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in model.parameters() if p.requires_grad)
    full_params = LLAMA2_7B_PARAMS if args.as_7b else full_params
    adapter_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    results, summaries = [], []
    variants = ([(c, compression_spec(c, out.parent, args.as_7b, args.aggregation)) for c in args.compression]
                or [(spec.averaging.compression, compression_spec(spec.averaging.compression, out.parent, args.as_7b,
                                                                  args.aggregation) if custom else SPEC)])
    heldout = None
    for n, (compression, spec_path) in [(n, v) for n in args.peers for v in variants]:
        shares = []
        for run in range(args.runs):
            # each run's peers (events, adapters, stderr) stay there until the next bench
            workdir = out.parent / (f"averaging-{n}" + (f"-{compression}" if args.compression else "") + f"-run{run}")
            r = swarm_round(n, args.epochs, workdir, args.wan, args.late_joiner, args.straggler, spec_path,
                            args.verbose, args.own_core, args.starved, args.joiner_after[run % len(args.joiner_after)])
            full_allreduce = 2 * (n - 1) / n * 4 * full_params
            r["run"], r["compression"] = run, compression
            if args.compression:
                heldout = heldout or heldout_batches(spec)
                r["heldout"] = heldout_scores(spec, heldout, workdir / "p0" / "adapter")
                first = next(x for x in results + [r] if x["peers"] == n and x["run"] == run and "heldout" in x)
                r["heldout_loss_ratio_to_first"] = round(r["heldout"]["loss"] / first["heldout"]["loss"], 4)
            r["full_model_allreduce_bytes"] = int(full_allreduce)
            r["ratio_to_full_allreduce"] = round(r["bytes_sent_per_peer_per_epoch"] / full_allreduce, 5)
            results.append(r)
            shares.append(r["averaging_share_of_epoch_time"])
            print(f"{n} peers{f' (run {run + 1}/{args.runs})' if args.runs > 1 else ''}, {compression}: "
                  f"{r['seconds_per_round']:.2f} s per averaging round, "
                  f"{r['averaging_share_of_epoch_time']:.1%} of epoch time (mean over peers; per peer "
                  f"{', '.join(f'{x:.1%}' for x in r['share_per_peer'])}; epochs of {r['epoch_seconds']} s), "
                  f"{r['bytes_sent_per_peer_per_epoch'] / 1e6:.2f} MB sent per peer per epoch = "
                  f"{r['ratio_to_full_allreduce']:.5f} (1/{1 / r['ratio_to_full_allreduce']:.0f}) of a full-model "
                  f"all-reduce{' of Llama-2-7B' if args.as_7b else ''} ({full_allreduce / 1e6:.0f} MB)",
                  flush=True)  # fmt: skip
            if r["rounds_with_all_peers"] < r["rounds"]:
                print(f"  WARNING: only {r['rounds_with_all_peers']} of {r['rounds']} rounds averaged all the peers "
                      f"(group sizes per peer: {r['group_sizes']}); the share and the bytes above are not a healthy "
                      f"swarm's (a smaller group sends fewer copies, a missed round none)")
            if "heldout" in r:
                print(f"  held-out {json.dumps(r['heldout'])}, loss ratio to {args.compression[0]}: "
                      f"{r['heldout_loss_ratio_to_first']}", flush=True)
            print(f"  epoch-end skew between peers (s): {r['boundary_skew_s']}; final adapters: {r['final_adapters']}")
            if "straggler" in r:
                print(f"  straggler: {json.dumps(r['straggler'])}; groupmates cut off: {r['groupmates_cut_off']}")
            if "late_joiner" in r:
                print(f"  late joiner: {json.dumps(r['late_joiner'])}", flush=True)
        joins = [r["late_joiner"] for r in results
                 if r["peers"] == n and r["compression"] == compression and "late_joiner" in r]  # fmt: skip
        summary = {"peers": n, "compression": compression, "runs": args.runs, "share_min": min(shares), "share_median": statistics.median(shares),
                   "share_max": max(shares), "runs_over_5_percent": sum(x > 0.05 for x in shares)}  # fmt: skip
        if joins:
            times = [j["start_to_first_averaged_epoch_s"] for j in joins]
            summary["joiner_start_to_first_averaged_epoch_s"] = times
            summary["joiners_that_never_averaged"] = sum(t is None for t in times)
            summary["joiners_alone_more_than_one_epoch"] = sum(
                j["epochs_alone_before"] > 1 or bool(j["epochs_alone_after"]) for j in joins)
        summaries.append(summary)
        if args.runs > 1 or joins:
            print(f"{n} peers over {args.runs} runs: {json.dumps(summary)}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "spec": spec.run_id, "adapter_params": adapter_params, "base_params": full_params, "as_7b": args.as_7b,
        "summaries": summaries,
        "results": results, "wan": args.wan, "late_joiner": args.late_joiner, "straggler": args.straggler,
        "aggregation": spec.trust.rule,
        "machine": f"{platform.machine()} {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
    }, indent=2))  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
