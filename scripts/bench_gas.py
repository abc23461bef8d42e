#!/usr/bin/env python3
"""Gas of the staking contract on anvil, per peer per epoch, against a naive baseline measured in the same run.

    python scripts/bench_gas.py [--epochs 12] [--json bench-out/gas.json]

- receipts: a group of 2, 4 or 8 members co-signs one receipt per epoch and one member settles it for all; one
  receipt per transaction, and 4 epochs' receipts per transaction (settleReceipts; the peer's --receipt-batch);
- naive baseline: contracts/bench/NaiveProof.sol, where every peer posts its own EIP-712 claim for every epoch in its
  own transaction (signature check, replay flag, reward and sample counters, an event);
- the run's other calls: deploy, createRun, stake, registerPeer, claim, and a checkpoint recorded with 3 votes.
Steady state is reported (each peer's first payment pays for fresh storage slots once: shown apart). Target (issue
19): at most 50k gas per peer per epoch with groups of 4.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from eth_account import Account

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atlas_swarm.chain import ETHER, StakingClient  # noqa: E402
from atlas_swarm.chain.client import cid_digest  # noqa: E402
from atlas_swarm.devnet.anvil import DEV_KEYS, Anvil  # noqa: E402
from atlas_swarm.identity import Identity  # noqa: E402
from atlas_swarm.proofs import checkpoint_digest, receipt_of, sign_digest  # noqa: E402

RUN = "bench-0123456789abcdef"
TRAINER = Account.from_key(DEV_KEYS[0])
NAIVE = Path(__file__).resolve().parent.parent / "contracts" / "build" / "NaiveProof.json"
GROUPS = (2, 4, 8)


def funded_accounts(w3, n: int) -> list:
    out = []
    for _ in range(n):
        a = Account.create()
        nonce = w3.eth.get_transaction_count(TRAINER.address, "pending")
        tx = {"from": TRAINER.address, "to": a.address, "value": 10 * ETHER, "gas": 21000, "chainId": w3.eth.chain_id,
              "nonce": nonce, "gasPrice": w3.eth.gas_price}  # fmt: skip
        w3.eth.wait_for_transaction_receipt(w3.eth.send_raw_transaction(TRAINER.sign_transaction(tx).raw_transaction))
        out.append(a)
    return out


def receipts_gas(w3, trainer: StakingClient, members: list, ids: list, epochs: int, per_tx: int, first_epoch: int):
    """Per-peer gas of settling ``epochs`` receipts of one group, ``per_tx`` receipts per transaction."""
    run = trainer.run_of(RUN)
    wallets = dict(zip(ids, (a.address for a in members)))
    keys = {a.address: a for a in members}
    per_peer, first = [], None
    for start in range(first_epoch, first_epoch + epochs, per_tx):
        batch = []
        for epoch in range(start, start + per_tx):
            r = receipt_of(run, epoch, hashlib.sha256(b"%d" % epoch).hexdigest(), ids, [128.0] * len(ids), (), wallets)
            digest = r.digest(trainer.domain)
            batch.append((r, [sign_digest(digest, keys[m.wallet].key) for m in r.members]))
        gas = trainer.settle_receipts(batch).gas_used / (per_tx * len(members))  # relayed: members pay no gas
        if first is None:
            first = gas
        else:
            per_peer.append(gas)
    return round(first), round(statistics.median(per_peer))


def naive_gas(w3, peers: list, epochs: int) -> tuple[int, int]:
    art = json.loads(NAIVE.read_text())
    factory = w3.eth.contract(abi=art["abi"], bytecode=art["bytecode"])
    deployer = StakingClient(w3, "0x" + "00" * 20, TRAINER)
    deployed = deployer._send(factory.constructor(), value=ETHER)
    address = w3.eth.get_transaction_receipt(deployed.tx_hash)["contractAddress"]
    naive = w3.eth.contract(address=address, abi=art["abi"])
    client = StakingClient(w3, address, TRAINER)
    client.contract = naive
    gas, first = [], None
    for epoch in range(epochs):
        for peer in peers:
            proof = (b"\x01" * 32, epoch, peer.address, 128, hashlib.sha256(b"%d" % epoch).digest())
            sig = sign_digest(naive.functions.proofDigest(proof).call(), peer.key)
            g = client._send(naive.functions.submit(proof, sig)).gas_used
            if epoch == 0:
                first = g if first is None else first
            else:
                gas.append(g)
    return first, round(statistics.median(gas))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=12, help="epochs per group size measured (a multiple of 4)")
    ap.add_argument("--json", default="bench-out/gas.json")
    args = ap.parse_args()
    anvil = Anvil.start()
    tmp = Path(tempfile.mkdtemp(prefix="atlas-bench-gas-"))
    try:
        w3 = StakingClient.web3(anvil.url)
        trainer = StakingClient.deploy(w3, TRAINER, 3600, 60)
        deploy_gas = w3.eth.get_transaction_receipt(w3.eth.get_block(1)["transactions"][0])["gasUsed"]
        r_run = trainer.create_run(RUN, bytes(32), 10**9, ETHER, 4096, 100 * ETHER, samples_per_epoch=10**6)
        w3.provider.make_request("evm_increaseTime", [100_000])  # epochs up to 100k are payable
        w3.provider.make_request("evm_mine", [])
        results = {"deploy": deploy_gas, "createRun": r_run.gas_used}
        accounts = funded_accounts(w3, 8)
        ids = []
        for i, a in enumerate(accounts):
            c = StakingClient(w3, trainer.address, a)
            ids.append(Identity.load_or_create(tmp / f"id{i}.key").peer_id)
            results.setdefault("stake", c.stake(2 * ETHER).gas_used)
            results.setdefault("registerPeer", c.register_peer(ids[-1]).gas_used)

        per_group, epoch = {}, 0
        for n in GROUPS:
            row = {}
            for per_tx in (1, 4):
                first, steady = receipts_gas(w3, trainer, accounts[:n], ids[:n], args.epochs, per_tx, epoch)
                epoch += args.epochs
                row[f"{per_tx}_per_tx"] = {"first_tx_per_peer": first, "steady_per_peer": steady}
            per_group[n] = row
        results["receipt_gas_per_peer_epoch"] = per_group

        # a checkpoint voted by 3 of the 4 peers paid for the epoch before (the group of 4's first epoch)
        run, after = trainer.run_of(RUN), 2 * args.epochs + 1
        cid = "bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi"
        digest = checkpoint_digest(run, after, cid_digest(cid), trainer.domain)
        votes = {a.address: sign_digest(digest, a.key) for a in accounts[:3]}
        results["recordCheckpoint_3_votes"] = trainer.record_checkpoint(run, after, cid, votes).gas_used

        w3.provider.make_request("evm_increaseTime", [200])
        w3.provider.make_request("evm_mine", [])
        results["claim"] = StakingClient(w3, trainer.address, accounts[0]).claim().gas_used

        first, steady = naive_gas(w3, accounts[:4], max(4, args.epochs // 3))
        results["naive_per_peer_epoch"] = {"first": first, "steady": steady}

        # how fast a peer signs receipts (EIP-712 digest of a 4-member receipt + ECDSA)
        r = receipt_of(run, 1, "00" * 32, ids[:4], [128.0] * 4, (), dict(zip(ids, (a.address for a in accounts))))
        t0, n_sign = time.perf_counter(), 200
        for _ in range(n_sign):
            sign_digest(r.digest(trainer.domain), accounts[0].key)
        results["receipts_signed_per_s"] = round(n_sign / (time.perf_counter() - t0), 1)
    finally:
        anvil.stop()

    naive = results["naive_per_peer_epoch"]["steady"]
    print(f"deploy {results['deploy']:,} gas; createRun {results['createRun']:,}; stake {results['stake']:,}; "
          f"registerPeer {results['registerPeer']:,}; claim {results['claim']:,}; recordCheckpoint (3 votes) "
          f"{results['recordCheckpoint_3_votes']:,}")
    print(f"gas per peer per epoch (steady state; a peer's first payment in parentheses), naive baseline "
          f"{naive:,} (first {results['naive_per_peer_epoch']['first']:,}) measured in this run:")
    for n, row in per_group.items():
        for k, g in row.items():
            print(f"  group of {n}, {k.split('_')[0]} receipt(s)/tx: {g['steady_per_peer']:>7,}  "
                  f"({g['first_tx_per_peer']:,})   ratio to naive {g['steady_per_peer'] / naive:.2f}")
    print(f"receipts signed per second: {results['receipts_signed_per_s']}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), **results}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
