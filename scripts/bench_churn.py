"""Churn: for N minutes peers leave with Ctrl-C, are SIGKILLed in the last stretch of an epoch (their group formed,
the round imminent or running) and come back, at random (seeded); or ``--kills K``: one of 4 peers SIGKILLed that way
K times in a row, each time restarted once the survivors have shown that they go on averaging with each other.

Separate peer processes on loopback, the demo's MiniLM spec, one bootstrap node (with its monitor) as everyone's
entry point, and (churn, unless ``--no-chain``) anvil with the staking contract, each peer with its own staked wallet.
A peer that comes back reuses its ``--out`` (identity, adapter, receipt outbox), as a hobbyist restarting would.

Figures (JSON): rounds averaged with others vs. epoch transitions made; whether the peers still running at the end
hold one adapter; on the chain, every receipt a peer co-signed settled (or superseded: its group settled another
receipt for that epoch, one this peer's diverged round did not match) and each wallet paid exactly what its settled
receipts give it, once (no proof lost or paid twice); the bootstrap node's RSS over time. ``--kills``: per kill, how long until
every survivor's round averaged with the other survivors only, what the round it died in cost them, NaN, hangs.

    python scripts/bench_churn.py [--minutes 20] [--seed 0] [--no-chain] [--kills K] [--out bench-out/bench_churn]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path

import psutil
from demo import REWARD_PER_SAMPLE, SPEC, receipts_of, shut_down, start_bootstrap, start_chain  # scripts/demo.py
from safetensors.torch import load_file

from atlas_swarm.launch import PeerFailed, PeerProcess

SLOTS = 4
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
FOREVER = 100_000  # --max-epochs while churning: the end is a restart of everyone with a near stop epoch


class Churn:
    """Four slots (machines), each running a peer or not; every peer's events across its restarts."""

    def __init__(self, out: Path, chain: dict | None, boot: str, rng: random.Random):
        self.out, self.chain, self.boot, self.rng = out, chain, boot, rng
        self.procs: list[PeerProcess | None] = [None] * SLOTS
        self.history: list[list[dict]] = [[] for _ in range(SLOTS)]  # events of earlier lives
        self.log: list[dict] = []  # what the bench did, when
        self.t0 = time.monotonic()

    def start(self, i: int, max_epochs: int = FOREVER, extra: tuple = ()) -> PeerProcess:
        if self.procs[i] is not None:
            self.history[i] += self.procs[i].events()
        spec = self.chain["spec"] if self.chain else SPEC
        args = ["--run-spec", str(spec), "--initial-peers", self.boot, "--data", "builtin:chatterbot-topics",
                "--batch-size", "8", "--seed", str(i), "--max-epochs", str(max_epochs), "--join-timeout", "180",
                "--host-maddrs", "/ip4/127.0.0.1/tcp/0", *extra]  # fmt: skip
        if self.chain:
            args += ["--chain-rpc", self.chain["anvil"].url, "--staking-contract", self.chain["client"].address,
                     "--wallet", str(self.chain["wallets"][i]), "--wallet-password-file",
                     str(self.chain["password_file"])]  # fmt: skip
        self.procs[i] = PeerProcess(self.out / f"peer{i}", args, threads=1, env=OFFLINE)
        self.note("start", i)
        return self.procs[i]

    def note(self, action: str, slot: int, **extra) -> None:
        self.log.append({"t": round(time.monotonic() - self.t0, 1), "action": action, "slot": slot, **extra})

    def running(self) -> list[int]:
        return [i for i, p in enumerate(self.procs) if p is not None and p.running]

    def kill_mid_round(self, i: int, timeout: float = 60.0) -> float:
        """SIGKILL peer ``i`` 80-105 % (random) into an epoch, as long as its last one: its group for the epoch's
        round is formed (the demo's matchmaking starts 4 s before the estimated end of a ~5 s epoch), or averaging.
        Returns the time of the kill."""
        p, frac = self.procs[i], self.rng.uniform(0.8, 1.05)
        try:
            seen = p.wait_event("epoch", timeout)["time"]
            seen = p.events("epoch")[-1]["time"]
            last = p.wait_event("epoch", timeout, lambda e: e["time"] > seen)  # a fresh epoch, just begun
            epoch_s = min(last["time"] - seen, 30.0)
            time.sleep(max(0.0, last["time"] + frac * epoch_s - time.time()))
        except PeerFailed:
            pass  # it exited or made no epoch: killed all the same
        p.kill()
        self.note("sigkill", i, at_fraction=round(frac, 2))
        return time.time()

    def leave(self, i: int) -> None:
        self.procs[i].signal(signal.SIGINT)
        self.note("ctrl-c", i)

    def events(self, i: int, kind: str | None = None) -> list[dict]:
        current = self.procs[i].events() if self.procs[i] is not None else []
        return [e for e in [*self.history[i], *current] if kind is None or e["event"] == kind]


def epoch_groups(events: list[dict], after: float) -> list[dict]:
    return [e for e in events if e["event"] == "epoch" and e["time"] > after]


def kills(args, out: Path) -> dict:
    """One of 4 peers SIGKILLed mid-round K times; after each, the survivors must average with each other."""
    rng = random.Random(args.seed)
    boot, maddr, _ = start_bootstrap(out, dict(os.environ, PYTHONUNBUFFERED="1", **OFFLINE))
    churn = Churn(out, None, maddr, rng)
    rows = []
    try:
        for i in range(SLOTS):
            churn.start(i)
        wait_all_averaged(churn, range(SLOTS), 0.0, 300)
        for k in range(args.kills):
            victim = rng.randrange(SLOTS)
            survivors = [i for i in range(SLOTS) if i != victim]
            killed_at = churn.kill_mid_round(victim)
            row = {"kill": k, "victim": victim, "hang": False}
            try:
                together = wait_together(churn, survivors, killed_at, 120)
                row["survivors_together_after_s"] = round(together - killed_at, 2)
            except PeerFailed as e:
                row["hang"] = True
                row["error"] = str(e)[:500]
            # the survivors' epoch transition that spanned the kill: what a dead groupmate cost them
            spanning = [next((e for e in epoch_groups(churn.events(i), killed_at)), None) for i in survivors]
            row["survivor_round_s_after_kill"] = [e["averaging_s"] if e else None for e in spanning]
            row["victim_cut_off"] = sum(any(str(why).startswith("sent nothing") for why in (e or {}).get(
                "dropped", {}).values()) for e in spanning)  # fmt: skip
            row["nonfinite"] = sum(len(churn.events(i, "nonfinite")) for i in survivors)
            row["nan_loss"] = sum(not math.isfinite(e["loss"]) for i in survivors for e in churn.events(i, "progress")
                                  if e.get("loss") is not None)  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
            if row["hang"]:
                break
            churn.start(victim)
            wait_all_averaged(churn, [victim], time.time(), 300)
        for i in churn.running():
            churn.leave(i)
        codes = [churn.procs[i].wait_exit(60) for i in range(SLOTS)]
    finally:
        shut_down(churn.procs, boot, None)
    ordinary = [e["averaging_s"] for i in range(SLOTS) for e in churn.events(i, "epoch") if len(e["group"]) == SLOTS]
    return {
        "kills": rows, "exit_codes": codes,
        "hangs": sum(r["hang"] for r in rows), "nonfinite": sum(r["nonfinite"] + r["nan_loss"] for r in rows),
        "survivors_together_after_s": summary([r.get("survivors_together_after_s") for r in rows]),
        "survivor_round_s_after_kill": summary([s for r in rows for s in r["survivor_round_s_after_kill"]]),
        "round_s_with_all_4": summary(ordinary),
    }


def churn_run(args, out: Path) -> dict:
    rng = random.Random(args.seed)
    chain = None if args.no_chain else start_chain(out, _Quiet())
    boot, maddr, _ = start_bootstrap(out, dict(os.environ, PYTHONUNBUFFERED="1", **OFFLINE))
    churn = Churn(out, chain, maddr, rng)
    rss, down_since = [], {}
    try:
        for i in range(SLOTS):
            churn.start(i)
        wait_all_averaged(churn, range(SLOTS), 0.0, 300)
        end = time.monotonic() + args.minutes * 60
        next_action, next_rss = time.monotonic() + rng.uniform(15, 45), 0.0
        while time.monotonic() < end:
            now = time.monotonic()
            if now >= next_rss:
                rss.append([round(now - churn.t0), tree_rss(boot.pid)])
                next_rss = now + 10
            for i in range(SLOTS):  # a slot whose peer left comes back after a while
                if i not in churn.running() and i not in down_since:
                    down_since[i] = now + rng.uniform(10, 40)
                if i in down_since and now >= down_since[i] and i not in churn.running():
                    del down_since[i]
                    churn.start(i)
            if now >= next_action:
                up = [i for i in churn.running() if churn.procs[i].events("epoch")]  # not one still starting
                if len(up) > 2:
                    victim = rng.choice(up)
                    churn.kill_mid_round(victim) if rng.random() < 0.5 else churn.leave(victim)
                next_action = time.monotonic() + rng.uniform(15, 45)
            time.sleep(0.5)
        # the end: everyone back, then everyone stopped (Ctrl-C) and restarted with a stop epoch a few epochs on, as
        # a trainer ending a run would: they finish together, agree and settle what they owe
        for i in range(SLOTS):
            if i not in churn.running():
                churn.start(i)
        wait_all_averaged(churn, range(SLOTS), time.time(), 300)
        for i in range(SLOTS):
            churn.leave(i)
        for i in range(SLOTS):
            churn.procs[i].wait_exit(60)
        last = max(e["epoch"] for i in range(SLOTS) for e in churn.events(i, "stopped"))
        for i in range(SLOTS):
            churn.start(i, max_epochs=last + 4, extra=("--wait-for-peers", str(SLOTS)))
        codes = [churn.procs[i].wait_exit(600) for i in range(SLOTS)]
        rss.append([round(time.monotonic() - churn.t0), tree_rss(boot.pid)])
        result = {"exit_codes": codes, "actions": churn.log, "bootstrap_rss_mb": rss}
        result.update(rounds(churn))
        result["max_abs_diff_between_final_adapters"] = final_diff(out)
        if chain:
            result["chain"] = settlement(out, chain, churn)
        return result
    finally:
        shut_down(churn.procs, boot, chain)


def rounds(churn: Churn) -> dict:
    epochs = [e for i in range(SLOTS) for e in churn.events(i, "epoch")]
    averaged = [e for e in epochs if len(e["group"]) >= 2]
    return {"epoch_transitions": len(epochs), "rounds_averaged_with_others": len(averaged),
            "round_s": summary([e["averaging_s"] for e in averaged]),
            "sigkills": sum(a["action"] == "sigkill" for a in churn.log),
            "ctrl_c": sum(a["action"] == "ctrl-c" for a in churn.log),
            "starts": sum(a["action"] == "start" for a in churn.log)}  # fmt: skip


def settlement(out: Path, chain: dict, churn: Churn) -> dict:
    """Each wallet: receipts co-signed, how many settled, the samples they give it, what the chain paid it."""
    rows = {}
    posted = {}  # epoch -> digests of the receipts someone settled for it
    for i in range(SLOTS):
        for r in receipts_of(out / f"peer{i}"):
            if r["state"] == "posted":
                posted.setdefault(r["receipt"]["epoch"], set()).add(r["digest"])
    for i in range(SLOTS):
        address = next(e for e in churn.events(i, "chain"))["address"]
        mine = receipts_of(out / f"peer{i}")
        owed = sum(m["weight"] for r in mine for m in r["receipt"]["members"]
                   if m["wallet"] == address and not m["flagged"] and r["state"] == "posted")  # fmt: skip
        rep = chain["client"].reputation(address)
        rows[f"peer{i}"] = {"receipts": len(mine), "posted": sum(r["state"] == "posted" for r in mine),
                            "unsettled": [r["receipt"]["epoch"] for r in mine if r["state"] != "posted"],
                            # of those, receipts for an epoch whose group settled another one: this peer's round
                            # differed from theirs (it was cut off or saw other updates), so nobody else signed it
                            "superseded": [r["receipt"]["epoch"] for r in mine if r["state"] != "posted" and
                                           posted.get(r["receipt"]["epoch"], set()) - {r["digest"]}],
                            "receipt_samples": owed, "paid_samples": rep["verified_samples"],
                            "rewards_wei": rep["claimable"] + rep["pending"],
                            "paid_exactly": rep["claimable"] + rep["pending"] == owed * REWARD_PER_SAMPLE}  # fmt: skip
    return rows


def wait_all_averaged(churn: Churn, slots, after: float, timeout: float) -> None:
    """Until each of ``slots`` made an epoch transition after ``after`` in a group with someone else."""
    deadline = time.monotonic() + timeout
    for i in slots:
        churn.procs[i].wait_event("epoch", max(1.0, deadline - time.monotonic()),
                                  lambda e: e["time"] > after and len(e["group"]) >= 2)  # fmt: skip


def wait_together(churn: Churn, survivors: list[int], after: float, timeout: float) -> float:
    """When every survivor had made two epoch transitions after ``after`` in groups of survivors only (at least two
    of them): they go on averaging with each other. PeerFailed on a timeout (a hang) or an exit."""
    ids = {churn.procs[i].wait_event("started", 1)["peer_id"] for i in survivors}
    times = []
    for i in survivors:
        def together(e, i=i) -> bool:
            later = [x for x in epoch_groups(churn.procs[i].events(), after) if x["time"] <= e["time"]]
            good = [x for x in later if len(x["group"]) >= 2 and set(x["group"]) <= ids]
            return len(good) >= 2

        times.append(churn.procs[i].wait_event("epoch", timeout, together)["time"])
    return max(times)


def tree_rss(pid: int) -> float:
    """MB resident of a process and its children (the bootstrap node and its p2pd)."""
    try:
        proc = psutil.Process(pid)
        return round(sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 1e6, 1)
    except psutil.Error:
        return float("nan")


def final_diff(out: Path) -> float:
    adapters = [load_file(str(out / f"peer{i}" / "adapter" / "adapter_model.safetensors")) for i in range(SLOTS)]
    return max((a[k] - adapters[0][k]).abs().max().item() for a in adapters[1:] for k in a)


def summary(values: list) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {}
    return {"n": len(values), "min": round(min(values), 3), "median": round(statistics.median(values), 3),
            "max": round(max(values), 3)}  # fmt: skip


class _Quiet:
    def print(self, *a, **k) -> None:
        pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=20.0, help="how long peers churn")
    ap.add_argument("--seed", type=int, default=0, help="what happens when, and to whom")
    ap.add_argument("--no-chain", action="store_true", help="churn without anvil, receipts and payments")
    ap.add_argument("--kills", type=int, default=0, help="instead: SIGKILL one of 4 peers mid-round this many times")
    ap.add_argument("--out", default="bench-out/bench_churn")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    began = time.monotonic()
    result = kills(args, out) if args.kills else churn_run(args, out)
    result.update({"seed": args.seed, "minutes": None if args.kills else args.minutes, "spec": str(SPEC.name),
                   "seconds": round(time.monotonic() - began), "machine": f"{platform.machine()} {os.cpu_count()} "
                   f"cores", "date": time.strftime("%Y-%m-%d")})  # fmt: skip
    path = out.parent / (f"{out.name}_kills.json" if args.kills else f"{out.name}.json")
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in ("actions", "kills", "bootstrap_rss_mb")}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
