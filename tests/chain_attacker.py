"""A chain attacker in its own process, with its own keys, knowing only public things (the contract address, the
run's on-chain id, the run's checkpoint CIDs) and our open source. It tries what worked on 186506a and what co-signed
receipts must stop, and writes what happened to JSON (error names, wei gained) for the test to judge.

    python -m tests.chain_attacker --rpc URL --contract ADDR --run 0xRUN --funder-key 0xKEY --min-stake WEI --out F

1. drain: a colluding pair (two fresh staked, registered keys) settles receipts for 64 epochs from 10^9 at the
   per-peer cap (the drain of 186506a, now with a co-signer);
2. collusion within the clock: the pair settles receipts about itself for every epoch the run's clock allows;
3. freeloader: one key that trained nothing lists itself beside the honest peers of a past receipt, with their
   weights, and signs alone;
4. bogus checkpoint: the pair votes a CID of its own for the last epoch (it was never paid for the epoch before),
   then, after its collusion receipts made it payees, tries again against the honest quorum.

With ``--front-run E`` it does something else, before the honest peers get there: as soon as the run's clock allows,
the pair settles a receipt for epoch E - 1 claiming half of that epoch's samples each (all of them, so that on
186506a+receipts the honest groups of E - 1 were paid nothing, were no payees, and could not vote), then records a CID
of its own as epoch E's checkpoint with its 2 votes (a majority of the 2 payees).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time

from eth_account import Account

from atlas_swarm.chain import ETHER, StakingClient
from atlas_swarm.chain.client import cid_digest
from atlas_swarm.errors import TxReverted
from atlas_swarm.proofs import Member, Receipt, checkpoint_digest, sign_digest

BOGUS_CID = "bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi"


def fund(w3, funder, to: str, wei: int) -> None:
    tx = {"from": funder.address, "to": to, "value": wei, "gas": 21000, "chainId": w3.eth.chain_id,
          "gasPrice": w3.eth.gas_price, "nonce": w3.eth.get_transaction_count(funder.address, "pending")}  # fmt: skip
    w3.eth.wait_for_transaction_receipt(w3.eth.send_raw_transaction(funder.sign_transaction(tx).raw_transaction))


def pair_receipt(run: bytes, epoch: int, pair: list, weight: int) -> Receipt:
    members = tuple(sorted((Member(a.address, hashlib.sha256(a.address.encode()).digest(), weight) for a in pair),
                           key=lambda m: int(m.wallet, 16)))  # fmt: skip
    return Receipt(run, epoch, hashlib.sha256(b"made up %d" % epoch).digest(), members)


def settle(client: StakingClient, receipt: Receipt, signers: dict) -> str:
    digest = receipt.digest(client.domain)
    sigs = [sign_digest(digest, signers[m.wallet].key) if m.wallet in signers else b"" for m in receipt.members]
    try:
        client.settle_receipts([(receipt, sigs)])
        return "settled"
    except TxReverted as e:
        return e.error


def front_run(me: StakingClient, run: bytes, epoch: int, pair: list, signers: dict, weight: int) -> dict:
    out = {"pair": [acct.address for acct in pair]}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # as soon as the clock allows
        out["settled"] = settle(me, pair_receipt(run, epoch - 1, pair, weight), signers)
        if out["settled"] != "EpochAhead":
            break
        time.sleep(0.5)
        fund(me.w3, pair[0], pair[0].address, 0)  # anvil mines on demand: a block moves the chain's clock on
    out["samples"] = me.epoch_tally(run, epoch - 1)["samples"]
    digest = checkpoint_digest(run, epoch, cid_digest(BOGUS_CID), me.domain)
    try:
        me.record_checkpoint(run, epoch, BOGUS_CID, {acct.address: sign_digest(digest, acct.key) for acct in pair})
        out["checkpoint"] = "recorded"
    except TxReverted as e:
        out["checkpoint"] = e.error
    out["cid"] = BOGUS_CID
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rpc", required=True)
    ap.add_argument("--contract", required=True)
    ap.add_argument("--run", required=True, help="the run's on-chain id, 0x...")
    ap.add_argument("--funder-key", required=True)
    ap.add_argument("--min-stake", type=int, required=True)
    ap.add_argument("--last-epoch", type=int, required=True, help="the run's last checkpoint epoch (public)")
    ap.add_argument("--front-run", type=int, help="only the front-run of this epoch's checkpoint (see above)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    w3 = StakingClient.web3(a.rpc)
    run = bytes.fromhex(a.run[2:])
    pair = [Account.create(), Account.create()]
    signers = {acct.address: acct for acct in pair}
    clients = []
    for acct in pair:
        fund(w3, Account.from_key(a.funder_key), acct.address, a.min_stake + 2 * ETHER)
        c = StakingClient.connect(w3, a.contract, acct)
        c.stake(a.min_stake)
        clients.append(c)
        # the chain cannot check a PeerID: any hash binds
        c._send(c.contract.functions.registerPeer(hashlib.sha256(acct.address.encode()).digest()))
    me = clients[0]
    terms = me.get_run(run)
    if a.front_run is not None:
        # half the epoch's samples each (within the cap): all of them, and both paid
        weight = min(terms["max_samples_per_epoch"], terms["samples_per_epoch"] // 2)
        out = front_run(me, run, a.front_run, pair, signers, weight)
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
        return 0
    out: dict = {"pair": [acct.address for acct in pair], "terms": {k: terms[k] for k in
                 ("max_samples_per_epoch", "samples_per_epoch", "min_epoch_seconds", "created_at")}}  # fmt: skip
    before = sum(me.reputation(acct.address)["pending"] for acct in pair)

    # 1. the drain of 186506a, co-signed by the pair
    cap = terms["max_samples_per_epoch"]
    out["drain"] = sorted({settle(me, pair_receipt(run, 10**9 + i, pair, cap), signers) for i in range(64)})

    # 2. collusion within the run's clock: every epoch it allows, at the cap
    head = me.payable_epoch(run)
    out["payable_epoch"] = head
    out["collusion"] = sorted({settle(me, pair_receipt(run, e, pair, cap), signers) for e in range(head + 1)})
    # ahead of the clock as it is now: settling every epoch up to ``head`` took longer than 5 of the run's 1 s epochs
    # once (a full anvil test: "settled"), so "head + 5" was no longer ahead
    out["collusion_ahead"] = settle(me, pair_receipt(run, me.payable_epoch(run) + 600, pair, cap), signers)
    out["gained_wei"] = sum(me.reputation(acct.address)["pending"] for acct in pair) - before

    # 3. a freeloader lists itself beside the honest members of a settled receipt and signs alone
    logs = me.contract.events.ReceiptSettled().get_logs(from_block=0, argument_filters={"runId": run})
    honest = [log for log in logs if log["args"]["paid"] > 0]
    epoch = honest[0]["args"]["epoch"] if honest else 0
    paid = me.contract.events.ContributionPaid().get_logs(from_block=0, argument_filters={"runId": run,
                                                                                          "epoch": epoch})  # fmt: skip
    loner = Account.create()
    fund(w3, Account.from_key(a.funder_key), loner.address, a.min_stake + ETHER)
    lc = StakingClient.connect(w3, a.contract, loner)
    lc.stake(a.min_stake)
    lc._send(lc.contract.functions.registerPeer(hashlib.sha256(b"loner").digest()))
    members = [Member(log["args"]["peer"], lc.peer_id_of(log["args"]["peer"]) or bytes(32), log["args"]["samples"])
               for log in paid if log["args"]["peer"] not in signers]  # fmt: skip
    members.append(Member(loner.address, hashlib.sha256(b"loner").digest(), cap))
    members.sort(key=lambda m: int(m.wallet, 16))
    out["freeloader"] = settle(lc, Receipt(run, epoch, bytes(32), tuple(members)), {loner.address: loner})
    out["freeloader_paid"] = lc.reputation(loner.address)["pending"]

    # 4. a bogus checkpoint for the last epoch: the pair was paid for the epoch before only by its own receipt
    last = a.last_epoch
    digest = checkpoint_digest(run, last, cid_digest(BOGUS_CID), me.domain)
    votes = {acct.address: sign_digest(digest, acct.key) for acct in pair}
    try:
        me.record_checkpoint(run, last, BOGUS_CID, votes)
        out["bogus_checkpoint"] = "recorded"
    except TxReverted as e:
        out["bogus_checkpoint"] = e.error
    out["checkpoint_after"] = (me.checkpoint_of(run, last) or {}).get("cid")
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
