"""Peers post contribution proofs to AtlasStaking on a real local chain (anvil) while they train as separate
processes on a real DHT: rewards are exactly samples x rate, and a SIGKILLed peer posts its pending proofs exactly
once after a restart."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from eth_account import Account
from web3 import Web3

from atlas_swarm.chain import ETHER, StakingClient
from atlas_swarm.chain.client import cid_digest
from atlas_swarm.chain.wallet import create_wallet
from atlas_swarm.config import RunSpec
from atlas_swarm.devnet.anvil import DEV_KEYS, Anvil
from atlas_swarm.launch import PeerProcess
from tests.conftest import write_spec
from tests.integration.test_swarm import adapter, max_abs_diff
from tests.peers import killed_at_exit, planned_first, start_peer, wait_until

pytestmark = pytest.mark.integration
RATE = 10**9  # wei per sample
CAP = 4096  # samples per peer per epoch
EPOCH_SAMPLES = 2 * 960  # the run pays at most this per epoch, all peers together: twice the default target batch size


@contextlib.contextmanager
def deployed_run(tmp_path, tiny_model, trust=None, stakes=(2, 2, 2), host="127.0.0.1", target_batch_size=960):
    """anvil on ``host`` + AtlasStaking + a funded run (minStake 1 ETH) + a peer wallet per stake, staking it in ETH
    (each peer binds its PeerID itself at start)."""
    anvil = Anvil.start(host=host)
    try:
        w3 = Web3(Web3.HTTPProvider(anvil.url))
        trainer = StakingClient.deploy(w3, Account.from_key(DEV_KEYS[0]), unbonding_period=3600, challenge_window=600)
        # epochs well over matchmaking_time: with very short ones a peer that falls behind skips epochs (state download)
        spec_path = write_spec(tmp_path / "spec.toml", str(tiny_model), trainer=trainer.account.address,
                               target_batch_size=target_batch_size, trust=trust)  # fmt: skip
        spec = RunSpec.from_toml(spec_path)
        trainer.create_run(spec.run_id, spec.spec_hash, RATE, ETHER, CAP, 5 * ETHER, samples_per_epoch=EPOCH_SAMPLES)
        (tmp_path / "pw").write_text("test-password")
        wallets = []
        for i, stake in zip(range(1, 5), stakes):
            path = tmp_path / f"wallet{i}.json"
            account = create_wallet(str(path), "test-password", bytes.fromhex(DEV_KEYS[i][2:]), kdf="pbkdf2")
            StakingClient(w3, trainer.address, account).stake(int(stake * ETHER))
            wallets.append((path, account))
        yield {"anvil": anvil, "trainer": trainer, "spec": spec_path, "run_id": spec.run_id, "wallets": wallets,
               "pw": tmp_path / "pw", "run": trainer.run_of(spec.run_id)}  # fmt: skip
    finally:
        anvil.stop()


@pytest.fixture
def chain(tmp_path, tiny_model):
    with deployed_run(tmp_path, tiny_model) as deployed:
        yield deployed


@pytest.fixture
def chain_of_longer_epochs(tmp_path, tiny_model):
    """Epochs of ~5 s instead of 2-3.5 s: the last transition averages the state too, and in a full-suite run an epoch
    of 2.0 s (the spec's matchmaking_time) before it left all four peers without a group and the vote at 1-1-1-1."""
    with deployed_run(tmp_path, tiny_model, target_batch_size=1920) as deployed:
        yield deployed


def chain_flags(chain, i):
    return ["--chain-rpc", chain["anvil"].url, "--staking-contract", chain["trainer"].address,
            "--wallet", str(chain["wallets"][i][0]), "--wallet-password-file", str(chain["pw"])]  # fmt: skip


def staked_wallet(chain, tmp_path, name: str, key: int):
    """One more wallet (dev account ``key``), staking 2 ETH; its account and the peer flags that use it."""
    path = tmp_path / f"wallet-{name}.json"
    account = create_wallet(str(path), "test-password", bytes.fromhex(DEV_KEYS[key][2:]), kdf="pbkdf2")
    StakingClient(chain["trainer"].w3, chain["trainer"].address, account).stake(2 * ETHER)
    return account, [*chain_flags(chain, 0)[:4], "--wallet", str(path), "--wallet-password-file", str(chain["pw"])]


def receipts(peer: PeerProcess) -> list[dict]:
    folder = peer.out / "receipts"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.exists() else []


def paid_epochs(client: StakingClient, peer: str) -> dict[int, int]:
    """epoch -> samples the contract paid ``peer`` for (its ContributionPaid events)."""
    logs = client.contract.events.ContributionPaid().get_logs(from_block=0, argument_filters={"peer": peer})
    return {log["args"]["epoch"]: log["args"]["samples"] for log in logs}


def due_to(client: StakingClient, peer: str, mine: dict[int, dict], records: list[dict]) -> dict[int, int]:
    """epoch -> what the contract owes ``peer`` for its receipt: its weight within CAP, scaled down pro rata with the
    members paid by the same transaction when their claims exceed what earlier transactions left of EPOCH_SAMPLES
    (peers overshoot the target batch size)."""
    logs = client.contract.events.ContributionPaid().get_logs(from_block=0)
    tx_of = {(log["args"]["epoch"], log["args"]["peer"]): (log["blockNumber"], log["transactionIndex"]) for log in logs}
    due = {}
    for e, m in mine.items():
        tx = tx_of.get((e, peer))
        if m["flagged"] and tx:  # settled at 0 samples: a witness of the round, paid nothing (unsettled when its
            due[e] = 0  # signature did not count, e.g. while its stake was below the minimum: nothing to gain by it)
        if m["flagged"] or m["weight"] == 0:
            continue
        members = next(r["receipt"]["members"] for r in records if r["receipt"]["epoch"] == e)
        claimed = sum(min(x["weight"], CAP) for x in members if tx is not None and tx_of.get((e, x["wallet"])) == tx
                      and not x["flagged"] and x["weight"] > 0)  # fmt: skip
        earlier = sum(log["args"]["samples"] for log in logs  # paid by the transactions before ours
                      if log["args"]["epoch"] == e and tx and (log["blockNumber"], log["transactionIndex"]) < tx)
        left = min(claimed, EPOCH_SAMPLES - earlier)
        due[e] = min(m["weight"], CAP) * left // claimed if claimed else 0
    return due


def assert_paid_exactly(chain, peer: PeerProcess, address: str, earlier: list = (), minority_ok: bool = False) -> int:
    """Every receipt the peer co-signed is settled, and the chain paid it exactly its weight in each x rate, once
    per epoch; each weight is the one its round's aggregation gave it (its own epoch event). ``minority_ok``: a
    receipt only a minority of its members signed may stay unsettled (and unpaid), as by design after a round whose
    members aggregated different updates (a groupmate killed mid-round)."""
    client = chain["trainer"]
    records = receipts(peer)
    if minority_ok:
        records = [r for r in records
                   if r["state"] == "posted" or 2 * len(r["signatures"]) > len(r["receipt"]["members"])]
    assert records and all(r["state"] == "posted" for r in records), records
    mine = {r["receipt"]["epoch"]: next(m for m in r["receipt"]["members"] if m["wallet"] == address) for r in records}
    expected = due_to(client, address, mine, records)
    assert paid_epochs(client, address) == expected, (expected, mine)
    rep = client.reputation(address)
    assert rep["verified_samples"] == sum(expected.values())
    assert rep["epochs_contributed"] == sum(1 for s in expected.values() if s > 0)
    assert rep["claimable"] + rep["pending"] == sum(expected.values()) * RATE
    own = peer.wait_event("started", 1)["peer_id"]
    events = [*earlier, *peer.events("epoch")]  # ``earlier``: its epoch events before a restart
    reported = {e["epoch"] - 1: e["weights"].get(own) for e in events}
    assert all(reported[e] == m["weight"] for e, m in mine.items()), (reported, mine)
    for r in records:  # signed by more than half of the group, each signature from a member's wallet
        assert 2 * len(r["signatures"]) > len(r["receipt"]["members"])
    return sum(expected.values())


def start_first_peer(peers, tmp_path, chain, text_data, extra: list[str]) -> tuple[PeerProcess, list[str]]:
    """peer0 starts the run with wallet 0 (added to ``peers`` at once, so it is killed whatever happens); returns it
    and the flags others join with (its planned address: they can start at once)."""
    listen, address = planned_first(tmp_path, "peer0")
    first = start_peer(tmp_path, "peer0", [*listen, "--run-spec", str(chain["spec"]), "--data", str(text_data),
                                            "--batch-size", "4", *extra, *chain_flags(chain, 0)])  # fmt: skip
    peers.append(first)
    return first, ["--initial-peers", address, "--run", RunSpec.from_toml(chain["spec"]).run_id, "--data",
                   str(text_data)]  # fmt: skip


def attack(chain, tmp_path, *flags) -> dict:
    """tests/chain_attacker.py in its own process, with its own keys (funded by a dev account); its JSON report."""
    report = tmp_path / f"attack{len(list(tmp_path.glob('attack*.json')))}.json"
    subprocess.run([sys.executable, "-m", "tests.chain_attacker", "--rpc", chain["anvil"].url, "--contract",
                    chain["trainer"].address, "--run", "0x" + chain["run"].hex(), "--funder-key", DEV_KEYS[4],
                    "--min-stake", str(ETHER), "--last-epoch", "4", "--out", str(report), *flags],
                   check=True, timeout=300, cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    return json.loads(report.read_text())


def test_three_peers_are_paid_their_co_signed_receipt_weights_and_record_the_final_checkpoint(
        tmp_path, chain_of_longer_epochs, text_data):
    chain = chain_of_longer_epochs
    # before the swarm gets there, a colluding pair takes all of epoch 3's samples and records its own epoch-4
    # checkpoint (on the first receipts contract the honest groups of epoch 3, paid 0, could not outvote it)
    front = attack(chain, tmp_path, "--front-run", "4")
    assert front["settled"] == "settled" and front["samples"] == EPOCH_SAMPLES, front
    assert front["checkpoint"] == "recorded" and chain["trainer"].checkpoint_of(chain["run"], 4)["cid"] == front["cid"]
    with killed_at_exit([]) as peers, killed_at_exit([]) as attackers:
        # all four start training together: a freeloader that came up 5 s after the others was in none of their groups
        # for three epochs (1 run in 25, why not known: README, "Known limits"), and the test is about its part
        extra = ["--max-epochs", "4", "--wait-for-peers", "4", "--join-timeout", "90"]
        first, join = start_first_peer(peers, tmp_path, chain, text_data, extra)
        for i, bs in ((1, 4), (2, 8)):
            peers.append(start_peer(tmp_path, f"peer{i}", [*join, "--batch-size", str(bs), "--seed", str(i), *extra,
                                                            *chain_flags(chain, i)]))  # fmt: skip
        # a fourth peer, staked and bound like the others, takes its groupmates' updates and gives none of its own
        fl, fl_flags = staked_wallet(chain, tmp_path, "freeloader", 5)
        freeloader = start_peer(tmp_path, "freeloader", [*join, "--batch-size", "4", "--seed", "9", *extra, *fl_flags],
                                attack="freeload")  # fmt: skip
        attackers.append(freeloader)
        codes = [p.wait_exit(300) for p in peers]
        assert codes == [0, 0, 0], "\n\n".join(p.tail() for p in peers)
        assert freeloader.wait_exit(120) == 0, freeloader.tail()
        total = 0
        for p, (_, account) in zip(peers, chain["wallets"]):
            assert p.wait_event("registered", 1)["address"] == account.address
            final = p.wait_event("receipts", 1)
            grouped = [e for e in p.events("epoch") if len(e["group"]) >= 2]
            # one receipt per epoch it averaged in with others, all settled (a solo epoch earns nothing)
            assert final["collecting"] == final["unpaid"] == final["rejected"] == 0, p.tail()
            assert final["posted"] == len(grouped) >= 2, p.tail()
            total += assert_paid_exactly(chain, p, account.address)
        front_wei = EPOCH_SAMPLES * RATE
        assert chain["trainer"].get_run(chain["run"])["budget"] == 5 * ETHER - total * RATE - front_wei
        # the honest members of epoch 3 were paid 0 samples (the pair took them all), yet settled: its witnesses
        # (all three: with one out of the round, two honest votes would tie the pair's two and the checkpoint below
        # would not be replaced, as designed; in 1 CI run of 2026-12-05 peer0 had no epoch-3 receipt, why not known)
        three = [r["receipt"]["members"] for p in peers for r in receipts(p) if r["receipt"]["epoch"] == 3]
        witnesses = {m["wallet"] for members in three for m in members if m["flagged"] or m["weight"] > 0}
        rounds = [(p.name, [(e["epoch"], len(e["group"]), e["samples"], e["time"]) for e in p.events("epoch")])
                  for p in [*peers, freeloader]]  # fmt: skip
        assert len(witnesses) == 3, (three, rounds, [p.tail() for p in peers])
        assert all(paid_epochs(chain["trainer"], w)[3] == 0 for w in witnesses), three
        assert chain["trainer"].epoch_tally(chain["run"], 3) == {"samples": EPOCH_SAMPLES, "payees": 2 + len(witnesses)}
        # one transaction per group and epoch: the receipts were settled by one member each (its tx), not by three
        txs: dict[int, set] = {}
        for r in (r for p in peers for r in receipts(p)):
            txs.setdefault(r["receipt"]["epoch"], set()).update([r["tx"]] if r["tx"].startswith("0x") else [])
        why = [(p.name, r["receipt"]["epoch"], r["tx"], r["signed_at"], r["quorum_at"], sorted(r["signatures"]))
               for p in peers for r in receipts(p)]  # fmt: skip
        assert all(len(t) == 1 for t in txs.values()), (txs, why, [p.tail() for p in peers])

        # the freeloader averaged its groupmates' updates into its own adapter, and theirs refused its empty ones: it
        # is in no honest receipt and was paid nothing; its own receipts (listing everyone) found no majority
        fl_id = freeloader.wait_event("started", 1)["peer_id"]
        took = [e["epoch"] for e in freeloader.events("epoch") if len(e["group"]) >= 2]
        refused = [e["dropped"][fl_id] for p in peers for e in p.events("epoch") if fl_id in e["dropped"]]
        assert took and refused, (freeloader.tail(), [p.tail() for p in peers])
        listed = [r for p in peers for r in receipts(p) if fl.address in {m["wallet"] for m in r["receipt"]["members"]}]
        assert not listed, listed
        assert paid_epochs(chain["trainer"], fl.address) == {}
        rep = chain["trainer"].reputation(fl.address)
        assert rep["verified_samples"] == rep["pending"] == rep["claimable"] == 0, rep
        assert receipts(freeloader) and all(r["state"] == "collecting" for r in receipts(freeloader))

        # the finishers' agreed adapter is on chain as the run's epoch-4 checkpoint, voted by the peers paid for 3
        finals = {p.wait_event("handed_off", 1)["cid"] for p in peers}
        recorded = [p.wait_event("receipts", 1)["checkpoints"] for p in peers]
        on_chain = chain["trainer"].checkpoint_of(chain["run"], 4)
        assert len(finals) == 1 and on_chain is not None and on_chain["cid"] in finals, (finals, on_chain, recorded)
        assert 2 * on_chain["votes"] > chain["trainer"].epoch_tally(chain["run"], 3)["payees"]
        assert any(r.get("4") == on_chain["cid"] for r in recorded), recorded
        assert not any(str(v).startswith("refused") for r in recorded for v in r.values()), recorded
        # ... replacing the front-runners' one within its challenge window, by more votes
        replaced = chain["trainer"].contract.events.CheckpointReplaced().get_logs(from_block=0)
        assert [(r["args"]["epoch"], r["args"]["oldCidDigest"], r["args"]["votes"]) for r in replaced] == [
            (4, cid_digest(front["cid"]), on_chain["votes"])]

        # an attacker (its own process and keys, a colluding staked pair) tries the drain and a bogus checkpoint
        budget_before = chain["trainer"].get_run(chain["run"])["budget"]
        after = attack(chain, tmp_path)
        assert after["drain"] == ["EpochAhead"] and after["collusion_ahead"] == "EpochAhead", after
        # what the pair bought: at most the run's per-epoch samples for each epoch its clock allows, minus what
        # honest receipts (and the front-runners) took of those epochs first
        bound = (after["payable_epoch"] + 1) * EPOCH_SAMPLES * RATE - total * RATE - front_wei
        assert 0 < after["gained_wei"] <= bound, after
        assert budget_before - chain["trainer"].get_run(chain["run"])["budget"] == after["gained_wei"]
        assert after["freeloader"] == "NoQuorum" and after["freeloader_paid"] == 0, after
        assert after["bogus_checkpoint"] in ("NotAVoter", "NoQuorum"), after
        assert after["checkpoint_after"] == on_chain["cid"], "the honest checkpoint stands"

    # the trainer's notebook view of the same chain: the per-peer ledger, and funding
    from atlas_swarm import Run

    trainer_wallet = tmp_path / "trainer.json"
    create_wallet(str(trainer_wallet), "test-password", bytes.fromhex(DEV_KEYS[0][2:]), kdf="pbkdf2")
    run = Run.from_toml(chain["spec"], workdir=tmp_path / "notebook")
    run.connect_chain(chain["anvil"].url, chain["trainer"].address, str(trainer_wallet), "test-password")
    ledger = {row["address"]: row for row in run.rewards().to_dict("records")}
    for _, account in chain["wallets"]:
        rep = chain["trainer"].reputation(account.address)
        assert ledger[account.address]["reward_wei"] == rep["verified_samples"] * RATE
        assert ledger[account.address]["epochs"] == rep["epochs_contributed"]
    budget = chain["trainer"].get_run(chain["run"])["budget"]
    assert run.fund(0.5)["budget"] == budget + ETHER // 2


def test_sigkilled_peer_settles_its_unpaid_receipts_exactly_once_after_restart(tmp_path, chain, text_data):
    # the victim has the smallest wallet, so it posts its groups' receipts itself, at once (a larger one, a backup
    # poster, would meet its InsufficientStake only 30-60 s after each quorum)
    survivors, (_, victim_account) = [chain["wallets"][0], chain["wallets"][2]], chain["wallets"][1]
    assert all(int(victim_account.address, 16) < int(a.address, 16) for _, a in survivors)
    victim_address = victim_account.address
    victim_client = StakingClient(chain["trainer"].w3, chain["trainer"].address, victim_account)
    with killed_at_exit([]) as peers:
        # --receipt-batch 1 --receipt-max-wait 0: settle each receipt at once (the default batches 4 to save gas, and
        # a backup signer waits out the poster's batching window). 32 epochs of 2.5-3.5 s: the swarm must outlive the
        # victim's restart (killed at epochs 14-15 once the download-only peer left, back at epochs 20-22, its waiting
        # receipts settled before its first epoch: 4 runs of 2026-12-06; as the third signer, killed at epochs 15-31)
        extra = ["--max-epochs", "32", "--wait-for-peers", "3", "--join-timeout", "90", "--receipt-batch", "1",
                 "--receipt-max-wait", "0"]
        first, join = start_first_peer(peers, tmp_path, chain, text_data, extra)
        peers.append(start_peer(tmp_path, "peer1", [*join, "--batch-size", "4", "--seed", "1", *extra,
                                                     *chain_flags(chain, 2)]))  # fmt: skip
        victim_args = [*join, "--batch-size", "8", "--seed", "2", *extra, *chain_flags(chain, 1)]
        victim = start_peer(tmp_path, "victim", victim_args)
        peers.append(victim)

        # Prepare: the victim was paid once; then its stake drops below the run's minimum, so its signature stops
        # counting and the groupmates' settlements pass it by: its receipts wait (retried, not dropped)
        wait_until(lambda: paid_epochs(chain["trainer"], victim_address), 180, "the victim's first payment")
        # a CLI peer, staked and bound like the others, that only downloads the state: it joins a run already past
        # its --max-epochs, syncs, and leaves without training (checked at the end: no receipt, paid nothing)
        dl, dl_flags = staked_wallet(chain, tmp_path, "downloader", 4)
        downloader = start_peer(tmp_path, "downloader", [*join, "--batch-size", "4", "--max-epochs", "1",
                                                          "--join-timeout", "90", *dl_flags])  # fmt: skip
        peers.append(downloader)
        victim_client.request_unstake(2 * ETHER)
        wait_until(lambda: any(r["state"] == "collecting" and "InsufficientStake" in (r["error"] or "")
                               for r in receipts(victim)), 150, "an unpaid receipt")  # fmt: skip

        # (the download-only peer is gone before the kill: while it syncs it counts as a peer, so the two survivors,
        # a pair beside it, would not average, and no state a majority holds would be left for it to take)
        assert downloader.wait_exit(120) == 0, downloader.tail()

        # Execute: SIGKILL (no chance to flush), restake, restart with the same --out
        victim.kill()
        before = victim.events("epoch")  # the restart starts a new events file
        waiting = [r["receipt"]["epoch"] for r in receipts(victim) if r["state"] == "collecting"
                   and any(m["wallet"] == victim_address and m["weight"] > 0 and not m["flagged"]
                           for m in r["receipt"]["members"])]  # fmt: skip (a zero-weight tag-along earns nothing)
        assert waiting
        victim_client.stake(2 * ETHER)
        restarted = start_peer(tmp_path, "victim", victim_args)
        peers.append(restarted)
        restarted.wait_event("chain", 120)

        # Assert: the restarted peer settles them, and is paid once each
        codes = [p.wait_exit(300) for p in (first, peers[1], restarted)]
        assert codes == [0, 0, 0], "\n\n".join(p.tail() for p in (first, peers[1], restarted))
        assert set(waiting) <= set(paid_epochs(chain["trainer"], victim_address))
        assert_paid_exactly(chain, restarted, victim_address, earlier=before)
        # (the groupmates may hold a receipt of the round the victim died in that only one of them signed: one saw
        # the victim's update and the other did not, so their aggregates and receipts differ; seen in 1 full run)
        for p, (_, account) in zip((first, peers[1]), survivors):
            assert_paid_exactly(chain, p, account.address, minority_ok=True)

        # the download-only peer: a verified state, no step, no round, no receipt, nothing paid
        assert downloader.wait_event("registered", 1)["address"] == dl.address
        synced = downloader.events("synced")
        assert synced and synced[-1]["verified"] and synced[-1]["epoch"] >= 1, downloader.tail()
        stop = downloader.wait_event("stopping", 1)
        assert stop["reason"] == "max_epochs" and stop["trained"] is False, stop
        assert not downloader.events("epoch") and not receipts(downloader)
        assert downloader.wait_event("receipts", 1)["posted"] == 0
        listed = [r for p in (first, peers[1], restarted) for r in receipts(p)
                  if dl.address in {m["wallet"] for m in r["receipt"]["members"]}]  # fmt: skip
        assert not listed, listed
        assert paid_epochs(chain["trainer"], dl.address) == {}
        rep = chain["trainer"].reputation(dl.address)
        assert rep["verified_samples"] == rep["pending"] == rep["claimable"] == 0, rep


def test_a_staked_run_admits_bound_staked_peers_and_refuses_an_understaked_one(tmp_path, tiny_model, text_data):
    # Prepare: a staked run (minStake 1 ETH); wallets 0 and 1 stake 2 ETH, wallet 2 only 0.5 ETH. Every peer binds its
    # PeerID to its wallet at start (both ways: on chain and in a DHT record signed by the PeerID's key)
    with deployed_run(tmp_path, tiny_model, trust={"admission": "staked"}, stakes=(2, 2, 0.5)) as chain, \
            killed_at_exit([]) as peers:  # fmt: skip
        # (8 epochs: the first peer admits the second only at its next refresh, up to 3 s after the second's first
        # record, while the second already trains: epochs of 1.5 s alone)
        extra = ["--max-epochs", "8", "--wait-for-peers", "2", "--join-timeout", "90"]
        first, join = start_first_peer(peers, tmp_path, chain, text_data, extra)
        peers.append(start_peer(tmp_path, "peer1", [*join, "--batch-size", "4", "--seed", "1", *extra,
                                                     *chain_flags(chain, 1)]))  # fmt: skip
        # Execute: the understaked wallet's peer joins
        poor = start_peer(tmp_path, "poor", [*join, "--batch-size", "4", "--seed", "2", *extra,
                                             *chain_flags(chain, 2)])  # fmt: skip
        # Assert: it is told why (read from the chain: its binding holds, its stake does not), and exits 2
        assert poor.wait_exit(120) == 2, poor.tail()
        assert poor.wait_event("registered", 1)["address"] == chain["wallets"][2][1].address
        assert "is below the run's minimum (1 ETH)" in poor.wait_event("error", 1)["error"]
        codes = [p.wait_exit(300) for p in peers]
        assert codes == [0, 0], "\n\n".join(p.tail() for p in peers)
        # the staked pair averaged together and left with one adapter
        for p in peers:
            assert any(len(e["group"]) == 2 for e in p.events("epoch")), p.tail()
        assert max_abs_diff(adapter(peers[0]), adapter(peers[1])) == 0.0
