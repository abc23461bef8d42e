"""The demo swarm: 4 peers (separate processes, batch 4/4/8/16, disjoint non-IID shards) fine-tune all-MiniLM-L6-v2
for topic classification on chatterbot-corpus, offline. A local chain (anvil) holds the staking contract: the demo
deploys it, funds the run, stakes each peer, and the peers post a signed contribution proof per epoch. The peers join
through a bootstrap node whose dashboard URL is printed (watch the run live). Ends with a
table of contributions, proofs accepted and rewards earned, and the held-out accuracy; then serves the final adapter
(`python -m atlas_swarm.serve`, the checkpoint on chain) and classifies three held-out dialogs through its HTTP.

    python scripts/demo.py [--epochs N] [--out demo-out] [--no-chain]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file

from atlas_swarm.model.fit import skip_bitsandbytes_unless_quantizing

skip_bitsandbytes_unless_quantizing([])  # before peft imports it: the demo never quantizes (and on CPU it warns)

from atlas_swarm.config import RunSpec  # noqa: E402
from atlas_swarm.launch import PeerFailed, PeerProcess  # noqa: E402
from atlas_swarm.model.lora import load_adapter_weights, load_model  # noqa: E402
from atlas_swarm.train.builtin import chatterbot_topics, shard_non_iid  # noqa: E402
from atlas_swarm.train.data import Batches, load_examples  # noqa: E402
from atlas_swarm.train.steps import evaluate  # noqa: E402

SPEC = Path(__file__).resolve().parent.parent / "atlas_swarm" / "specs" / "demo-minilm-topics.toml"
BATCH_SIZES = (4, 4, 8, 16)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=6, help="swarm epochs to train")
    ap.add_argument("--out", default="demo-out", help="working folder (wiped at start)")
    ap.add_argument("--no-chain", action="store_true", help="train without the local chain and proofs")
    args = ap.parse_args()
    console = Console() if sys.stdout.isatty() else Console(width=150)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")  # "cannot reach the hub": we are offline
    out = Path(args.out).resolve()
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    train = chatterbot_topics("train")
    shards = []
    for i in range(len(BATCH_SIZES)):
        path = out / f"shard{i}.jsonl"
        rows = shard_non_iid(train, len(BATCH_SIZES), i)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        shards.append(path)
    console.print(f"[bold]atlas-swarm demo[/] — {len(BATCH_SIZES)} peers, non-IID shards of {len(train)} dialogs, "
                  f"{args.epochs} epochs")  # fmt: skip

    chain = None if args.no_chain else start_chain(out, console)
    procs, boot = [], None
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env = dict(os.environ, PYTHONUNBUFFERED="1", **offline)
    common = ["--max-epochs", str(args.epochs), "--wait-for-peers", str(len(BATCH_SIZES)), "--join-timeout", "120",
              "--host-maddrs", "/ip4/127.0.0.1/tcp/0"]  # fmt: skip
    try:
        def launch(i: int, extra: list[str]) -> PeerProcess:
            args_ = ["--data", str(shards[i]), "--batch-size", str(BATCH_SIZES[i]), "--seed", str(i), *common, *extra]
            if chain is not None:
                args_ += ["--chain-rpc", chain["anvil"].url, "--staking-contract", chain["client"].address,
                          "--wallet", str(chain["wallets"][i]), "--wallet-password-file", str(chain["password_file"])]
            return PeerProcess(out / f"peer{i}", args_, threads=1, env=offline)

        boot, maddr, dashboard = start_bootstrap(out, env)
        console.print(f"bootstrap node {maddr}\n[bold]dashboard: {dashboard}/[/] (also /metrics, /health)")
        spec = SPEC if chain is None else chain["spec"]
        procs.append(launch(0, ["--run-spec", str(spec), "--initial-peers", maddr]))
        try:
            started = procs[0].wait_event("started", 180)
        except PeerFailed as e:
            raise SystemExit(f"demo: the first peer did not start:\n{e}") from None
        console.print(f"peer0 started run {started['run_id']}; 3 more peers join through the bootstrap node")
        for i in range(1, len(BATCH_SIZES)):
            procs.append(launch(i, ["--initial-peers", maddr, "--run", started["run_id"]]))
        t0 = time.monotonic()
        with console.status("training...") as status:
            while any(p.running for p in procs):
                epochs = [last_epoch(p) for p in procs]
                status.update(f"training... epochs per peer {epochs} / {args.epochs} ({time.monotonic() - t0:.0f} s)")
                if time.monotonic() - t0 > 600:
                    raise SystemExit("demo: peers did not finish in 10 minutes; see demo-out/peer*/stderr.txt")
                time.sleep(1)
        failed = [(i, p) for i, p in enumerate(procs) if p.process.returncode]
        for i, p in failed:
            console.print(f"[red]peer{i} exited {p.process.returncode}[/]:\n{p.tail()}")
        if failed:
            return 1
        accuracy = report(console, out, started["run_id"], time.monotonic() - t0, chain, procs)
        return serve_final(console, out, started["run_id"], maddr, chain, env, accuracy)
    finally:
        shut_down(procs, boot, chain)


def shut_down(procs: list, boot: subprocess.Popen | None, chain: dict | None) -> None:
    """SIGKILL the peers and the bootstrap node (each with its whole session: DHT, averagers, p2pd); stop anvil."""
    for p in procs:
        if p is not None:
            p.kill()
    if boot is not None:
        try:
            os.killpg(boot.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if chain is not None:
        chain["anvil"].stop()


def serve_final(console: Console, out: Path, run_id: str, maddr: str, chain: dict | None, env: dict,
                accuracy: float) -> int:  # fmt: skip
    """`python -m atlas_swarm.serve` on the run's final adapter (the checkpoint on chain, else what the run vouches
    for; fetched through the bootstrap node, every block verified), then three held-out dialogs through its HTTP,
    and all of them: the served accuracy must be ``accuracy``, the held-out accuracy evaluated in this process
    (within one dialog)."""
    import re
    import urllib.request

    log = out / "serve.log"
    cmd = [sys.executable, "-m", "atlas_swarm.serve", "--run", run_id, "--initial-peers", maddr, "--http",
           "127.0.0.1:0", "--workdir", str(out / "serve")]  # fmt: skip
    if chain is not None:
        cmd += ["--chain-rpc", chain["anvil"].url, "--contract", chain["client"].address]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline, url = time.monotonic() + 180, None
        while url is None:
            found = re.search(r"listening on (http://\S+)/v1", log.read_text())
            url = found.group(1) if found else None
            if proc.poll() is not None or time.monotonic() > deadline:
                console.print(f"[red]demo: the server did not start[/]:\n{log.read_text()[-2000:]}")
                return 1
            time.sleep(0.3)
        served = re.search(r"serving (\S+)", log.read_text()).group(1)
        def classify(texts: list[str]) -> list[dict]:
            body = json.dumps({"model": run_id, "input": texts}).encode()
            with urllib.request.urlopen(urllib.request.Request(url + "/v1/classify", data=body), timeout=60) as r:
                return json.loads(r.read())["data"]

        heldout = chatterbot_topics("heldout")
        rows = [next(r for r in heldout if r["label"] == label) for label in ("greetings", "science", "sports")]
        console.print(f"serving {served} at {url}/v1 (OpenAI-compatible; POST /v1/classify):")
        for row, got in zip(rows, classify([r["text"] for r in rows])):
            mark = "[green]right[/]" if got["label"] == row["label"] else "[red]wrong[/]"
            console.print(f"  {row['text'][:70]!r:74} → {got['label']} ({got['probabilities'][got['label']]:.0%}; "
                          f"true: {row['label']}) {mark}")  # fmt: skip
        answers = [a for i in range(0, len(heldout), 64) for a in classify([r["text"] for r in heldout[i:i + 64]])]
        served_accuracy = sum(a["label"] == r["label"] for a, r in zip(answers, heldout)) / len(heldout)
        same = abs(served_accuracy - accuracy) * len(heldout) <= 1.0  # one near-tie may round the other way
        console.print(f"served accuracy on all {len(heldout)} held-out dialogs: {served_accuracy:.1%} (evaluated in "
                      f"this process: {accuracy:.1%}; {'the same' if same else 'NOT the same'})")  # fmt: skip
        return 0 if same else 1
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def start_bootstrap(out: Path, env: dict) -> tuple[subprocess.Popen, str, str]:
    """A bootstrap node with its monitor (what a maintainer runs), on loopback: the peers' entry point."""
    import re

    log = out / "bootstrap.log"
    cmd = [sys.executable, "-m", "atlas_swarm.bootstrap", "--identity", str(out / "bootstrap.key"), "--host-maddrs",
           "/ip4/127.0.0.1/tcp/0", "--http", "127.0.0.1:0", "--poll-interval", "2",
           "--keep-adapters", str(out / "kept")]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = log.read_text()
        url = re.search(r"monitor: (http://\S+?)/ ", text)
        maddr = re.search(r"^(/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+)$", text, re.M)
        if url and maddr:
            return proc, maddr.group(1), url.group(1)
        if proc.poll() is not None:
            raise SystemExit(f"demo: the bootstrap node exited:\n{text[-2000:]}")
        time.sleep(0.3)
    raise SystemExit("demo: the bootstrap node printed no multiaddr within 120 s")


REWARD_PER_SAMPLE = 10**12  # wei (0.000001 ETH)


def start_chain(out: Path, console: Console) -> dict:
    """anvil on a free loopback port, AtlasStaking deployed, the run funded, one staked wallet per peer."""
    from eth_account import Account

    from atlas_swarm.chain import ETHER, StakingClient
    from atlas_swarm.chain.wallet import create_wallet
    from atlas_swarm.devnet.anvil import DEV_KEYS, Anvil

    anvil = Anvil.start()
    w3 = StakingClient.web3(anvil.url)
    trainer = StakingClient.deploy(w3, Account.from_key(DEV_KEYS[0]), unbonding_period=600, challenge_window=60)
    # The spec names the trainer: the chain's run id is derived from it, so nobody can squat the run.
    spec_path = out / "run-spec.toml"
    spec_path.write_text(f'trainer = "{trainer.account.address}"\n' + SPEC.read_text())
    spec = RunSpec.from_toml(spec_path)
    trainer.create_run(spec.run_id, spec.spec_hash, REWARD_PER_SAMPLE, ETHER, 4 * spec.averaging.target_batch_size,
                       1 * ETHER, samples_per_epoch=2 * spec.averaging.target_batch_size)  # fmt: skip
    password_file = out / "wallet-password"
    password_file.write_text("demo-only")
    wallets = []
    for i in range(len(BATCH_SIZES)):
        path = out / f"wallet{i}.json"
        account = create_wallet(str(path), "demo-only", bytes.fromhex(DEV_KEYS[i + 1][2:]), kdf="pbkdf2")
        StakingClient(w3, trainer.address, account).stake(ETHER)
        wallets.append(path)
    console.print(f"local chain {anvil.url}: AtlasStaking at {trainer.address}; run funded with 1 ETH at "
                  f"{REWARD_PER_SAMPLE / ETHER:g} ETH per sample; each peer staked 1 ETH")  # fmt: skip
    return {"anvil": anvil, "client": trainer, "wallets": wallets, "password_file": password_file,
            "spec": spec_path, "run": trainer.run_of(spec.run_id)}


def report(console: Console, out: Path, run_id: str, seconds: float, chain: dict | None,
           peers: list[PeerProcess]) -> float:  # fmt: skip
    spec = RunSpec.from_toml(SPEC)
    model, tokenizer = load_model(spec)
    heldout = Batches(load_examples("builtin:chatterbot-topics-heldout", spec), tokenizer, spec)
    before = evaluate(model, heldout, "cpu", spec.model.task)
    load_adapter_weights(model, out / "peer0" / "adapter")
    after = evaluate(model, heldout, "cpu", spec.model.task)
    adapters = [load_file(str(out / f"peer{i}" / "adapter" / "adapter_model.safetensors")) for i in range(len(BATCH_SIZES))]
    diff = max((a[k] - adapters[0][k]).abs().max().item() for a in adapters[1:] for k in a)

    table = Table(title=f"run {run_id} — {seconds:.0f} s of training")
    cols = ["peer", "batch", "samples trained", "epochs averaged", "first loss", "final loss"]
    if chain is not None:
        cols += ["receipts settled", "co-signers", "receipt samples", "paid samples", "rewards ETH"]
    for col in cols:
        table.add_column(col, justify="right")
    on_chain = {}
    for i, bs in enumerate(BATCH_SIZES):
        events = peers[i].events()
        stopped = next(e for e in events if e["event"] == "stopped")
        losses = [e["loss"] for e in events if e["event"] == "progress"]
        averaged = sum(1 for e in events if e["event"] == "epoch" and len(e["group"]) > 1)
        row = [f"peer{i}", str(bs), str(stopped["samples_total"]), str(averaged), f"{losses[0]:.3f}",
               f"{stopped['last_loss']:.3f}"]  # fmt: skip
        if chain is not None:
            address = next(e for e in events if e["event"] == "chain")["address"]
            rep = chain["client"].reputation(address)
            earned = rep["claimable"] + rep["pending"]
            mine = receipts_of(out / f"peer{i}")
            cosigners = sorted({len(r["signatures"]) - 1 for r in mine})
            owed = sum(m["weight"] for r in mine for m in r["receipt"]["members"]
                       if m["wallet"] == address and not m["flagged"] and r["state"] == "posted")  # fmt: skip
            on_chain[f"peer{i}"] = {"receipts": len(mine), "receipt_samples": owed, "epochs_paid": rep["epochs_contributed"],
                                    "verified_samples": rep["verified_samples"], "rewards_wei": earned}  # fmt: skip
            row += [f"{sum(r['state'] == 'posted' for r in mine)}/{len(mine)}",
                    ",".join(map(str, cosigners)) or "-", str(owed), str(rep["verified_samples"]),
                    f"{earned / 10**18:.6f}"]  # fmt: skip
        table.add_row(*row)
    console.print(table)
    console.print(f"held-out accuracy: base model {before['accuracy']:.1%} (loss {before['loss']:.3f}) → "
                  f"averaged adapter {after['accuracy']:.1%} (loss {after['loss']:.3f}) on {len(heldout)} dialogs")
    same = "yes" if diff <= 1e-5 else "NO"
    console.print(f"all peers hold the same adapter: {same} (max abs difference {diff:.2e})")
    finals = sorted({e["cid"] for p in peers for e in p.events("handed_off")})
    for cid in finals:
        line = f"final adapter published as {cid}; kept by the bootstrap node: "
        line += "yes" if (out / "kept" / "blocks" / cid).exists() else "NO"
        if chain is not None:
            checkpoint = chain["client"].checkpoint_of(chain["run"], last_epoch(peers[0]))
            line += f"; recorded on chain: {'yes' if checkpoint and checkpoint['cid'] == cid else 'NO'}"
        console.print(line)
    if chain is not None:
        exact = all(v["rewards_wei"] == v["receipt_samples"] * REWARD_PER_SAMPLE for v in on_chain.values())
        console.print(f"rewards = the samples its co-signed receipts give it x {REWARD_PER_SAMPLE / 10**18:g} ETH, for "
                      f"every peer: {'yes' if exact else 'NO'} (claimable after the contract's challenge window; "
                      f"solo epochs are not paid)")  # fmt: skip
    (out / "summary.json").write_text(json.dumps({"run_id": run_id, "seconds": seconds, "accuracy_before":
        before["accuracy"], "accuracy_after": after["accuracy"], "max_abs_diff": diff, "chain": on_chain}, indent=2))  # fmt: skip
    return after["accuracy"]


def receipts_of(out: Path) -> list[dict]:
    """The receipts a peer co-signed (its --out/receipts), each with the signatures it gathered."""
    return [json.loads(p.read_text()) for p in sorted((out / "receipts").glob("*.json"))]


def last_epoch(peer: PeerProcess) -> int:
    return max((e.get("epoch", 0) for e in peer.events("epoch")), default=0)


if __name__ == "__main__":
    torch.set_num_threads(2)
    sys.exit(main())
