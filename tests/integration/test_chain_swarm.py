"""Peers post contribution proofs to AtlasStaking on a real local chain (anvil) while they train as separate
processes on a real DHT: rewards are exactly samples x rate, and a SIGKILLed peer posts its pending proofs exactly
once after a restart."""

from __future__ import annotations

import contextlib
import json

import pytest
from eth_account import Account
from web3 import Web3

from atlas_swarm.chain import ETHER, StakingClient
from atlas_swarm.chain.wallet import create_wallet
from atlas_swarm.config import RunSpec
from atlas_swarm.devnet.anvil import DEV_KEYS, Anvil
from atlas_swarm.launch import PeerProcess
from tests.conftest import write_spec
from tests.integration.test_swarm import adapter, max_abs_diff
from tests.peers import first_maddr, killed_at_exit, start_peer, wait_until

pytestmark = pytest.mark.integration
RATE = 10**9  # wei per sample


@contextlib.contextmanager
def deployed_run(tmp_path, tiny_model, trust=None, stakes=(2, 2, 2)):
    """anvil + AtlasStaking + a funded run (minStake 1 ETH) + 3 peer wallets staking ``stakes`` ETH (each peer binds
    its PeerID itself at start)."""
    anvil = Anvil.start()
    try:
        w3 = Web3(Web3.HTTPProvider(anvil.url))
        trainer = StakingClient.deploy(w3, Account.from_key(DEV_KEYS[0]), unbonding_period=3600, challenge_window=60)
        # epochs well over matchmaking_time: with very short ones a peer that falls behind skips epochs (state download)
        spec_path = write_spec(tmp_path / "spec.toml", str(tiny_model), trainer=trainer.account.address,
                               target_batch_size=960, trust=trust)  # fmt: skip
        spec = RunSpec.from_toml(spec_path)
        trainer.create_run(spec.run_id, spec.spec_hash, RATE, ETHER, 4096, 5 * ETHER)
        (tmp_path / "pw").write_text("test-password")
        wallets = []
        for i, stake in zip(range(1, 4), stakes):
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


def chain_flags(chain, i):
    return ["--chain-rpc", chain["anvil"].url, "--staking-contract", chain["trainer"].address,
            "--wallet", str(chain["wallets"][i][0]), "--wallet-password-file", str(chain["pw"])]  # fmt: skip


def outbox(peer: PeerProcess) -> list[dict]:
    folder = peer.out / "proofs"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.exists() else []




def accepted_epochs(client: StakingClient, peer: str) -> list[int]:
    logs = client.contract.events.ProofAccepted().get_logs(from_block=0, argument_filters={"peer": peer})
    return [log["args"]["epoch"] for log in logs]


def assert_paid_exactly(chain, peer: PeerProcess, address: str) -> int:
    """Every proof in the peer's outbox is on chain once, and its rewards are samples x rate to the wei."""
    client = chain["trainer"]
    records = outbox(peer)
    assert records and all(r["state"] == "posted" for r in records), records
    epochs = accepted_epochs(client, address)
    assert sorted(epochs) == sorted(r["proof"]["epoch"] for r in records)  # each epoch once, none missing
    samples = sum(r["proof"]["samples"] for r in records)
    rep = client.reputation(address)
    assert rep["verified_samples"] == samples and rep["epochs_contributed"] == len(records)
    assert rep["claimable"] + rep["pending"] == samples * RATE
    # what it was credited with is what it trained on in those epochs (the peer's own epoch reports)
    reported = {e["epoch"] - 1: e["samples"] for e in peer.events("epoch") if e["samples"] > 0}
    assert all(reported.get(r["proof"]["epoch"], r["proof"]["samples"]) == r["proof"]["samples"] for r in records)
    return samples


def start_first_peer(peers, tmp_path, chain, text_data, extra: list[str]) -> tuple[PeerProcess, list[str]]:
    """peer0 starts the run with wallet 0 (added to ``peers`` at once, so it is killed whatever happens); returns it
    and the flags others join with."""
    first = start_peer(tmp_path, "peer0", ["--run-spec", str(chain["spec"]), "--data", str(text_data),
                                            "--batch-size", "4", *extra, *chain_flags(chain, 0)])  # fmt: skip
    peers.append(first)
    started = first.wait_event("started", 90)
    return first, ["--initial-peers", first_maddr(started), "--run", started["run_id"], "--data", str(text_data)]


def test_three_peers_post_proofs_and_are_paid_samples_times_rate(tmp_path, chain, text_data):
    with killed_at_exit([]) as peers:
        extra = ["--max-epochs", "4", "--wait-for-peers", "3", "--join-timeout", "90"]
        first, join = start_first_peer(peers, tmp_path, chain, text_data, extra)
        for i, bs in ((1, 4), (2, 8)):
            peers.append(start_peer(tmp_path, f"peer{i}", [*join, "--batch-size", str(bs), "--seed", str(i), *extra,
                                                            *chain_flags(chain, i)]))  # fmt: skip
        codes = [p.wait_exit(300) for p in peers]
        assert codes == [0, 0, 0], "\n\n".join(p.tail() for p in peers)
        total = 0
        for p, (_, account) in zip(peers, chain["wallets"]):
            assert p.wait_event("registered", 1)["address"] == account.address
            final = p.wait_event("proofs", 1)
            took_part = [e for e in p.events("epoch") if e["samples"] > 0]
            # one proof per epoch it took part in, all posted (an epoch it skipped by downloading state earns none)
            assert final["pending"] == 0 and final["rejected"] == 0 and final["posted"] == len(took_part), p.tail()
            assert final["posted"] >= 2, p.tail()
            total += assert_paid_exactly(chain, p, account.address)
        assert chain["trainer"].get_run(chain["run"])["budget"] == 5 * ETHER - total * RATE

        # the finishers' agreed adapter is on chain as the run's epoch-4 checkpoint, recorded by one of them
        finals = {p.wait_event("handed_off", 1)["cid"] for p in peers}
        recorded = [p.wait_event("proofs", 1)["checkpoints"] for p in peers]
        on_chain = chain["trainer"].checkpoint_of(chain["run"], 4)
        assert len(finals) == 1 and on_chain is not None and on_chain[0] in finals, (finals, on_chain, recorded)
        assert on_chain[1] in [a.address for _, a in chain["wallets"]]
        assert any(r.get("4") == on_chain[0] for r in recorded), recorded
        assert not any(str(v).startswith("refused") for r in recorded for v in r.values()), recorded

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


def test_sigkilled_peer_posts_its_pending_proofs_exactly_once_after_restart(tmp_path, chain, text_data):
    victim_address = chain["wallets"][2][1].address
    victim_client = StakingClient(chain["trainer"].w3, chain["trainer"].address, chain["wallets"][2][1])
    with killed_at_exit([]) as peers:
        extra = ["--max-epochs", "9", "--wait-for-peers", "3", "--join-timeout", "90"]
        first, join = start_first_peer(peers, tmp_path, chain, text_data, extra)
        peers.append(start_peer(tmp_path, "peer1", [*join, "--batch-size", "4", "--seed", "1", *extra,
                                                     *chain_flags(chain, 1)]))  # fmt: skip
        # --proof-batch 1: post each proof at once (the default waits for 4 to save gas)
        victim_args = [*join, "--batch-size", "8", "--seed", "2", *extra, *chain_flags(chain, 2), "--proof-batch", "1"]
        victim = start_peer(tmp_path, "victim", victim_args)
        peers.append(victim)

        # Prepare: the victim has posted a proof; then its stake drops below the run's minimum, so its next proofs
        # are signed and kept pending (InsufficientStake is retried, not dropped)
        wait_until(lambda: any(r["state"] == "posted" for r in outbox(victim)), 180, "the victim's first proof")
        victim_client.request_unstake(2 * ETHER)
        wait_until(lambda: any(r["state"] == "pending" and "InsufficientStake" in (r["error"] or "")
                               for r in outbox(victim)), 120, "a pending proof")  # fmt: skip

        # Execute: SIGKILL (no chance to flush), restake, restart with the same --out
        victim.kill()
        pending = [r["proof"]["epoch"] for r in outbox(victim) if r["state"] == "pending"]
        assert pending
        victim_client.stake(2 * ETHER)
        restarted = start_peer(tmp_path, "victim", victim_args)
        peers.append(restarted)
        restarted.wait_event("chain", 120)

        # Assert: the pending proofs are posted by the restarted peer, once each
        wait_until(lambda: all(r["state"] == "posted" for r in outbox(restarted)), 120, "the pending proofs posted")
        codes = [p.wait_exit(300) for p in (first, peers[1], restarted)]
        assert codes == [0, 0, 0], "\n\n".join(p.tail() for p in (first, peers[1], restarted))
        assert_paid_exactly(chain, restarted, victim_address)
        assert set(pending) <= set(accepted_epochs(chain["trainer"], victim_address))
        for p, (_, account) in zip((first, peers[1]), chain["wallets"]):
            assert_paid_exactly(chain, p, account.address)


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
