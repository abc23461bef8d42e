#!/usr/bin/env python3
"""Gas and throughput of the staking contract on anvil: gas per stake / register / claim, gas per proof posted one
per transaction vs batched (submitProofs), and how many proofs per second a peer signs and posts through its outbox.

    python scripts/bench_gas.py [--peers 4] [--epochs 16] [--json bench-out/gas.json]

Target (issue 3): at most 50k gas per peer per epoch. Steady state is measured (the first proof of a peer pays for
fresh storage slots once; reported separately).
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

from atlas_swarm.chain import ETHER, Outbox, StakingClient  # noqa: E402
from atlas_swarm.devnet.anvil import DEV_KEYS, Anvil  # noqa: E402
from atlas_swarm.identity import Identity  # noqa: E402
from atlas_swarm.proofs import ContributionProof, EpochRecord, chain_run_id, peer_id_hash, proof_of, sign_proof  # noqa: E402

RUN = "bench-0123456789abcdef"


TRAINER = Account.from_key(DEV_KEYS[0])


def proof(account, peer_id, epoch) -> ContributionProof:
    return ContributionProof(chain_run_id(RUN, TRAINER.address), epoch, account.address, peer_id_hash(peer_id), 128,
                             hashlib.sha256(b"a%d" % epoch).digest(), hashlib.sha256(b"d%d" % epoch).digest(),
                             int(time.time()) + 3600)  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=16, help="proofs per batch size measured")
    ap.add_argument("--json", default="bench-out/gas.json")
    args = ap.parse_args()
    anvil = Anvil.start()
    tmp = Path(tempfile.mkdtemp(prefix="atlas-bench-gas-"))
    try:
        w3 = StakingClient.web3(anvil.url)
        trainer = StakingClient.deploy(w3, TRAINER, 3600, 60)
        deploy_gas = w3.eth.get_transaction_receipt(w3.eth.get_block(1)["transactions"][0])["gasUsed"]
        r_run = trainer.create_run(RUN, bytes(32), 10**9, ETHER, 4096, 100 * ETHER)
        results = {"deploy": deploy_gas, "createRun": r_run.gas_used}
        peers = []
        for i, key in enumerate(DEV_KEYS[1:5], 1):
            acct = Account.from_key(key)
            c = StakingClient(w3, trainer.address, acct)
            peer_id = Identity.load_or_create(tmp / f"id{i}.key").peer_id
            results.setdefault("stake", c.stake(2 * ETHER).gas_used)
            results.setdefault("registerPeer", c.register_peer(peer_id).gas_used)
            peers.append((acct, c, peer_id))

        # gas per proof: one per transaction vs batches of several epochs (one peer per batch size)
        per_proof = {}
        for (acct, c, peer_id), batch in zip(peers, (1, 2, 4, 8)):
            epoch, gas = 0, []
            first = None
            while epoch < args.epochs + batch:
                signed = []
                for _ in range(batch):
                    p = proof(acct, peer_id, epoch)
                    signed.append((p, sign_proof(p, c.domain, acct.key)))
                    epoch += 1
                r = trainer.submit_proofs(signed)  # relayed by the trainer: the peer pays no gas
                if first is None:
                    first = r.gas_used / batch
                else:
                    gas.append(r.gas_used / batch)
            per_proof[batch] = {"first_tx_per_proof": round(first), "steady_per_proof": round(statistics.median(gas))}
        results["proof_gas"] = per_proof

        # claim (after the challenge window)
        w3.provider.make_request("evm_increaseTime", [200])
        w3.provider.make_request("evm_mine", [])
        results["claim"] = peers[0][1].claim().gas_used

        # a peer's outbox: sign + post N proofs (one flush: batches of 8), proofs per second end to end
        acct = Account.from_key(DEV_KEYS[5])
        c = StakingClient(w3, trainer.address, acct)
        peer_id = Identity.load_or_create(tmp / "id5.key").peer_id
        c.stake(2 * ETHER)
        c.register_peer(peer_id)
        box = Outbox(tmp / "outbox", acct, c.domain)
        n = 64
        t0 = time.perf_counter()
        for e in range(n):
            record = EpochRecord(RUN, peer_id, e, e + 1, 128, (), hashlib.sha256(b"%d" % e).hexdigest())
            box.sign(proof_of(record, chain_run_id(RUN, TRAINER.address), acct.address, int(time.time()) + 3600))
        t_sign = time.perf_counter() - t0
        counts = box.flush(c)
        t_all = time.perf_counter() - t0
        assert counts.posted == n, counts
        results["outbox"] = {"proofs": n, "sign_per_s": round(n / t_sign, 1), "sign_and_post_per_s": round(n / t_all, 1)}
    finally:
        anvil.stop()

    naive = 85_000  # issue 3: a naive EIP-712 submitProof measured here
    print(f"deploy {results['deploy']:,} gas; createRun {results['createRun']:,}; stake {results['stake']:,}; "
          f"registerPeer {results['registerPeer']:,}; claim {results['claim']:,}")
    print("gas per proof (steady state; first tx of a peer in parentheses), vs the naive 85k baseline:")
    for batch, g in per_proof.items():
        print(f"  {batch} epoch(s)/tx: {g['steady_per_proof']:>7,}  ({g['first_tx_per_proof']:,})   "
              f"ratio {g['steady_per_proof'] / naive:.2f}")
    o = results["outbox"]
    print(f"outbox: {o['sign_per_s']} proofs/s signed, {o['sign_and_post_per_s']} proofs/s signed + posted on anvil")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"naive_baseline_gas": naive, **results}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
