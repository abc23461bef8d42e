"""The staking contract through the Python client, on an in-process EVM (eth-tester + py-evm): proofs signed in
Python verify on chain, rewards are exact, reverts come back as named errors, and the outbox posts exactly once."""

from __future__ import annotations

import hashlib
import json
import time

import pytest
from eth_account import Account
from web3 import EthereumTesterProvider, Web3

from atlas_swarm.chain import ETHER, Outbox, StakingClient, decode_revert
from atlas_swarm.chain.wallet import create_wallet, load_wallet
from atlas_swarm.errors import ChainError, ChainUnreachable, TxReverted, WalletError
from atlas_swarm.identity import Identity
from atlas_swarm.proofs import ContributionProof, chain_run_id, merkle_root, peer_id_hash, recover_signer, sign_proof
from atlas_swarm.proofs.binding import sign_binding, verify_binding
from tests.doubles import sign_epoch

RUN = "tiny-test-0123456789abcdef"
RATE = 10**12  # wei per sample
TRAINER = Account.from_key("0x" + "7e" * 32)
RUN_KEY = chain_run_id(RUN, TRAINER.address)  # the run's id on chain: derived from its trainer


@pytest.fixture(scope="module")
def peer_ids(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ids")
    return [Identity.load_or_create(folder / f"{i}.key").peer_id for i in range(3)]


@pytest.fixture
def chain():
    w3 = Web3(EthereumTesterProvider())
    funder = w3.eth.accounts[0]
    accounts = [TRAINER] + [Account.create() for _ in range(3)]
    for a in accounts:
        w3.eth.send_transaction({"from": funder, "to": a.address, "value": 100 * ETHER})
    trainer, *peers = accounts
    client = StakingClient.deploy(w3, trainer, unbonding_period=2 * 86400, challenge_window=3600)
    client.create_run(RUN, hashlib.sha256(b"spec").digest(), RATE, ETHER, 1024, budget=10 * ETHER)
    return w3, client, trainer, peers


def as_peer(client: StakingClient, account) -> StakingClient:
    return StakingClient(client.w3, client.address, account)


def staked(client, account, peer_id) -> StakingClient:
    c = as_peer(client, account)
    c.stake(2 * ETHER)
    c.register_peer(peer_id)
    return c


def make_proof(peer, peer_id, epoch, samples, deadline=2**40) -> ContributionProof:
    return ContributionProof(RUN_KEY, epoch, peer.address, peer_id_hash(peer_id), samples,
                             hashlib.sha256(b"adapter%d" % epoch).digest(), merkle_root([b"\x01" * 32]),
                             deadline)  # fmt: skip


def test_python_digest_equals_contract_digest_and_signature_recovers(chain, peer_ids):
    w3, client, _, (peer, *_) = chain
    proof = make_proof(peer, peer_ids[0], epoch=3, samples=64)
    assert proof.digest(client.domain) == client.proof_digest(proof)
    sig = sign_proof(proof, client.domain, peer.key)
    assert recover_signer(proof, client.domain, sig) == peer.address


def test_the_signed_proof_bytes_are_those_of_b101728(tmp_path):
    """The epoch record -> proofs.proof_of -> outbox path (issue 17) signs exactly the bytes the old path signed:
    the digest and signature below were computed by b101728's Outbox.sign with the same inputs (eth_account signs
    deterministically, RFC 6979), and the contract's proofDigest equals our digest (test above)."""
    from atlas_swarm.chain.outbox import Outbox
    from atlas_swarm.devnet.anvil import DEV_KEYS
    from atlas_swarm.proofs import Domain, chain_run_id

    account = Account.from_key(DEV_KEYS[1])
    domain = Domain(31337, "0x5FbDB2315678afecb367f032d93F642f64180aa3")
    run = chain_run_id("demo-0123456789abcdef", Account.from_key(DEV_KEYS[0]).address)
    box = Outbox(tmp_path, account, domain)
    proof = sign_epoch(box, run, 7, "QmVSvfcGh76o4bQtUnKLYSmJuf7J5LkmYxkhkfskTzVYyG", 128, "ab" * 32,
                       batch_hashes=[b"a" * 32, b"b" * 32, b"c" * 32], now=1_700_000_000)  # fmt: skip
    assert proof.digest(domain).hex() == "4f0c760673e0c429b909de51741fc1f9fec13d0f73f72627f60871224304e284"
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert record["signature"] == ("0x1e7dbd146f0f872b681c3dfdad6ed864c532d015769563946094dd7b471603aa432b5542a92aeca23b"
                                   "dc84d7ca1e4bb6f5970faac05dfece43ce3d2730cac9351b")  # fmt: skip
    assert record["proof"]["deadline"] == 1_700_086_400 and record["proof"]["epoch"] == 7


def test_a_proof_signed_for_another_chain_or_contract_is_refused(chain, peer_ids):
    from atlas_swarm.proofs import Domain

    w3, client, _, (peer, *_) = chain
    staked(client, peer, peer_ids[0])
    proof = make_proof(peer, peer_ids[0], epoch=0, samples=8)
    for domain in (Domain(client.chain_id + 1, client.address), Domain(client.chain_id, "0x" + "ab" * 20)):
        with pytest.raises(TxReverted) as e:
            client.submit_proofs([(proof, sign_proof(proof, domain, peer.key))])
        assert e.value.error == "InvalidSigner"
    client.submit_proofs([(proof, sign_proof(proof, client.domain, peer.key))])


def test_rewards_are_samples_times_rate_and_claimable_after_the_window(chain, peer_ids):
    w3, client, _, (peer, *_) = chain
    me = staked(client, peer, peer_ids[0])
    signed = [(p, sign_proof(p, client.domain, peer.key))
              for p in (make_proof(peer, peer_ids[0], e, 32 + e) for e in range(3))]  # fmt: skip
    receipt = client.submit_proofs(signed)  # the trainer relays: the peer needs no gas to get paid
    assert receipt.events.count("ProofAccepted") == 3
    rep = me.reputation(peer.address)
    assert rep["verified_samples"] == 32 + 33 + 34 and rep["epochs_contributed"] == 3
    assert rep["pending"] == (32 + 33 + 34) * RATE and rep["claimable"] == 0
    with pytest.raises(TxReverted) as e:
        me.claim()
    assert e.value.error == "NothingToClaim"
    w3.provider.ethereum_tester.time_travel(w3.eth.get_block("latest")["timestamp"] + 3 * 3600)
    w3.provider.ethereum_tester.mine_blocks()
    before = me.balance()
    r = me.claim()
    gas_cost = r.gas_used * w3.eth.get_transaction(r.tx_hash)["gasPrice"]
    assert me.balance() - before + gas_cost == (32 + 33 + 34) * RATE


def test_reverts_are_decoded_with_names_and_fixes(chain, peer_ids):
    w3, client, _, (peer, other, _) = chain
    proof = make_proof(peer, peer_ids[0], epoch=0, samples=8)
    sig = sign_proof(proof, client.domain, peer.key)
    with pytest.raises(TxReverted) as e:
        client.submit_proofs([(proof, sig)])
    assert e.value.error == "PeerNotRegistered" and peer.address in str(e.value) and "register" in str(e.value)

    as_peer(client, other).register_peer(peer_ids[0])  # someone else naming our PeerID first locks nobody out
    staked(client, peer, peer_ids[0])
    assert client.binds(peer.address, peer_ids[0]) and client.binds(other.address, peer_ids[0])
    with pytest.raises(TxReverted) as e:
        as_peer(client, other).register_peer(peer_ids[1])
    assert e.value.error == "AlreadyRegistered"

    too_many = make_proof(peer, peer_ids[0], epoch=0, samples=5000)
    with pytest.raises(TxReverted) as e:
        client.submit_proofs([(too_many, sign_proof(too_many, client.domain, peer.key))])
    assert e.value.error == "InvalidSamples" and e.value.error_args == (5000, 1024)

    forged = sign_proof(proof, client.domain, other.key)
    with pytest.raises(TxReverted) as e:
        client.submit_proofs([(proof, forged)])
    assert e.value.error == "InvalidSigner"
    assert decode_revert(b"")[0] == "Unknown"


def test_equivocation_is_slashed_by_anyone(chain, peer_ids):
    w3, client, _, (peer, reporter, _) = chain
    staked(client, peer, peer_ids[0])
    a = make_proof(peer, peer_ids[0], epoch=5, samples=10)
    b = make_proof(peer, peer_ids[0], epoch=5, samples=11)
    r = as_peer(client, reporter).slash_equivocation(a, sign_proof(a, client.domain, peer.key),
                                                    b, sign_proof(b, client.domain, peer.key))  # fmt: skip
    assert "Slashed" in r.events
    rep = client.reputation(peer.address)
    assert rep["stake"] == ETHER and rep["times_slashed"] == 1
    assert client.reputation(reporter.address)["pending"] == ETHER * 2000 // 10000  # matures like a reward


def test_outbox_posts_each_proof_exactly_once_across_restarts(chain, peer_ids, tmp_path):
    w3, client, _, (peer, *_) = chain
    me = staked(client, peer, peer_ids[0])
    box = Outbox(tmp_path / "proofs", peer, me.domain)
    for epoch in range(1, 4):
        assert sign_epoch(box, RUN_KEY, epoch, peer_ids[0], 16, hashlib.sha256(b"%d" % epoch).hexdigest())
    assert sign_epoch(box, RUN_KEY, 2, peer_ids[0], 99, "00" * 32) is None  # never a second proof for one epoch

    # "crash" after epoch 1 was mined but before the outbox wrote it down: a new outbox must not send it again
    first = ContributionProof.from_json(box.records()[0]["proof"])
    me.submit_proofs([(first, bytes.fromhex(box.records()[0]["signature"][2:]))])
    restarted = Outbox(tmp_path / "proofs", peer, me.domain)
    counts = restarted.flush(me)
    assert (counts.posted, counts.pending, counts.rejected) == (3, 0, 0)
    assert restarted.records()[0]["tx"] == "already on chain"
    assert me.reputation(peer.address)["epochs_contributed"] == 3
    assert me.reputation(peer.address)["verified_samples"] == 48
    assert restarted.flush(me).posted == 3  # nothing left to send


class Unreachable:
    def __getattr__(self, name):
        def fail(*a, **k):
            raise ChainUnreachable("down")

        return fail


def test_outbox_backs_off_while_the_chain_is_down_then_posts(chain, peer_ids, tmp_path):
    w3, client, _, (peer, *_) = chain
    me = staked(client, peer, peer_ids[0])
    box = Outbox(tmp_path / "proofs", peer, me.domain)
    t0 = time.time()
    sign_epoch(box, RUN_KEY, 1, peer_ids[0], 16, "11" * 32)
    counts = box.flush(Unreachable(), now=t0)
    assert counts.pending == 1
    rec = box.records()[0]
    assert rec["attempts"] == 1 and rec["next_try"] == t0 + 2.0 and "down" in rec["error"]
    box.flush(Unreachable(), now=t0 + 1.0)  # not due yet: untouched
    assert box.records()[0]["attempts"] == 1
    box.flush(Unreachable(), now=t0 + 2.5)
    assert box.records()[0]["next_try"] == t0 + 2.5 + 4.0
    assert box.flush(me, now=t0 + 7).posted == 1  # chain back, backoff over


def test_outbox_keeps_retryable_reverts_and_rejects_the_rest(chain, peer_ids, tmp_path):
    w3, client, trainer, (peer, *_) = chain
    me = as_peer(client, peer)
    me.register_peer(peer_ids[0])  # registered but not staked: InsufficientStake can be fixed by staking
    box = Outbox(tmp_path / "proofs", peer, me.domain)
    sign_epoch(box, RUN_KEY, 1, peer_ids[0], 16, "11" * 32)
    sign_epoch(box, RUN_KEY, 2, peer_ids[0], 5000, "22" * 32)  # above the run's cap: can never pass
    counts = box.flush(me)
    assert counts.pending == 2 and "InsufficientStake" in box.records()[0]["error"]
    me.stake(2 * ETHER)
    counts = box.flush(me, now=time.time() + 100)  # past the backoff, before the deadlines
    assert (counts.posted, counts.rejected) == (1, 1)
    assert "InvalidSamples" in box.records()[1]["error"]


def test_binding_signature_both_ways(peer_ids):
    acct = Account.create()
    sig = sign_binding(peer_ids[0], acct.key)
    assert verify_binding(peer_ids[0], acct.address, sig)
    assert not verify_binding(peer_ids[1], acct.address, sig)
    assert not verify_binding(peer_ids[0], Account.create().address, sig)


def test_wallet_roundtrip_and_clear_errors(tmp_path):
    path = tmp_path / "w.json"
    acct = create_wallet(str(path), "pw", kdf="pbkdf2")
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert load_wallet(str(path), "pw").address == acct.address
    with pytest.raises(WalletError, match="Wrong password"):
        load_wallet(str(path), "nope")
    with pytest.raises(WalletError, match="exists already"):
        create_wallet(str(path), "pw")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(WalletError, match="not a keystore"):
        load_wallet(str(tmp_path / "bad.json"), "pw")
    with pytest.raises(WalletError, match="new-wallet"):
        load_wallet(str(tmp_path / "missing.json"), "pw")


def test_connect_refuses_a_wrong_address(chain):
    w3, client, trainer, _ = chain
    with pytest.raises(ChainError, match="no contract"):
        StakingClient.connect(w3, trainer.address)
    with pytest.raises(ChainError, match="not an address"):
        StakingClient.connect(w3, "0x1234")
    assert StakingClient.connect(w3, client.address).get_run(RUN_KEY)["budget"] == 10 * ETHER
    with pytest.raises(ChainUnreachable):
        StakingClient.web3("http://127.0.0.1:9", timeout=1)


def test_record_owner_key_derives_the_peer_id(tmp_path):
    from hivemind.dht.crypto import RSASignatureValidator

    from atlas_swarm.swarm.node import hivemind_key, peer_id_of_owner

    identity = Identity.load_or_create(tmp_path / "id.key")
    assert peer_id_of_owner(RSASignatureValidator(hivemind_key(identity)).local_public_key) == identity.peer_id
    assert peer_id_of_owner(b"[owner:garbage]") is None and peer_id_of_owner(b"no owner") is None


def test_outbox_batches_to_save_gas_but_never_holds_a_proof_too_long(chain, peer_ids, tmp_path):
    w3, client, _, (peer, *_) = chain
    me = staked(client, peer, peer_ids[0])
    box = Outbox(tmp_path / "proofs", peer, me.domain)
    t0 = time.time()
    for epoch in range(3):
        sign_epoch(box, RUN_KEY, epoch, peer_ids[0], 16, "11" * 32, now=t0)
    assert box.flush(me, now=t0 + 1, min_batch=4, max_wait=60).pending == 3  # waiting for a 4th
    assert box.flush(me, now=t0 + 61, min_batch=4, max_wait=60).posted == 3  # the oldest waited long enough
    txs = {r["tx"] for r in box.records()}
    assert len(txs) == 1, "the three went out in one transaction"
    for epoch in range(3, 7):
        sign_epoch(box, RUN_KEY, epoch, peer_ids[0], 16, "11" * 32, now=t0 + 70)
    assert box.flush(me, now=t0 + 71, min_batch=4, max_wait=60).posted == 7


def test_outbox_never_lets_a_later_proof_overtake_a_waiting_one(chain, peer_ids, tmp_path):
    w3, client, trainer, (peer, *_) = chain
    me = staked(client, peer, peer_ids[0])
    client.create_run("small-run-0123456789abcdef", bytes(32), RATE, 0, 1024, budget=100 * RATE)  # 100 samples
    small = chain_run_id("small-run-0123456789abcdef", TRAINER.address)
    box = Outbox(tmp_path / "proofs", peer, me.domain)
    t0 = time.time()
    sign_epoch(box, small, 1, peer_ids[0], 500, "11" * 32)  # too big for the budget (until it is topped up)
    sign_epoch(box, small, 2, peer_ids[0], 10, "22" * 32)  # would fit, but must not jump the queue
    assert box.flush(me, now=t0).pending == 2
    assert "BudgetExhausted" in box.records()[0]["error"]
    assert box.flush(me, now=t0 + 1).pending == 2  # the first waits out its backoff; the second waits behind it
    client.fund_run(small, 1000 * RATE)
    assert box.flush(me, now=t0 + 3).posted == 2
    assert [e for e in (r["proof"]["epoch"] for r in box.records())] == [1, 2]


def test_a_corrupted_outbox_file_is_a_clear_error_and_nothing_is_lost(chain, peer_ids, tmp_path):
    w3, client, _, (peer, *_) = chain
    box = Outbox(tmp_path / "proofs", peer, client.domain)
    sign_epoch(box, RUN_KEY, 1, peer_ids[0], 16, "11" * 32)
    (tmp_path / "proofs" / "0000000000000000-0000000002.json").write_text("{truncated")
    with pytest.raises(ChainError, match="unreadable.*move it away"):
        Outbox(tmp_path / "proofs", peer, client.domain)
    (tmp_path / "proofs" / "0000000000000000-0000000002.json").unlink()
    assert Outbox(tmp_path / "proofs", peer, client.domain).counts().pending == 1  # the good proof is still there


def test_ether_amounts_convert_to_wei_exactly():
    """Run.fund(0.5, reward_per_sample_eth=1e-6) passes floats: Decimal(1e-6) would give 999999999999 wei."""
    from atlas_swarm.chain.client import eth
    from atlas_swarm.errors import ConfigError

    assert eth(1e-6) == 10**12 and eth(0.1) == 10**17 and eth("0.5") == 5 * 10**17 and eth(2) == 2 * ETHER
    for bad in ("-1", "abc"):
        with pytest.raises(ConfigError):
            eth(bad)


def test_a_relay_posting_one_proof_first_costs_the_outbox_no_proof(chain, peer_ids, tmp_path):
    """M5: an attacker copies the last proof of a pending batch (public once it is in a mempool) and posts it alone,
    first. On 186506a the batch reverted and the others were rejected for good (NonceTooLow)."""
    w3, client, _, (peer, attacker, _) = chain
    me = staked(client, peer, peer_ids[0])
    box = Outbox(tmp_path / "proofs", peer, me.domain)
    for epoch in range(4):
        sign_epoch(box, RUN_KEY, epoch, peer_ids[0], 16, "11" * 32)
    last = box.records()[-1]
    as_peer(client, attacker).submit_proofs([(ContributionProof.from_json(last["proof"]),
                                              bytes.fromhex(last["signature"][2:]))])  # fmt: skip
    counts = box.flush(me)
    assert (counts.posted, counts.pending, counts.rejected) == (4, 0, 0)
    assert me.reputation(peer.address)["verified_samples"] == 64, "each proof paid exactly once"


def test_a_squatter_cannot_open_or_take_the_trainers_run(chain):
    """H1: the run id is public; on 186506a the first createRun owned it, and its closeRun took others' funding."""
    w3, client, trainer, (_, squatter, funder) = chain
    as_peer(client, squatter).create_run(RUN, hashlib.sha256(b"spec").digest(), RATE, 0, 1024, budget=0)
    assert client.get_run(RUN_KEY)["trainer"] == trainer.address, "the trainer's run is untouched"
    squatted = chain_run_id(RUN, squatter.address)
    assert squatted != RUN_KEY and client.get_run(squatted)["trainer"] == squatter.address
    as_peer(client, funder).fund_run(RUN_KEY, ETHER)
    with pytest.raises(TxReverted) as e:
        as_peer(client, squatter).close_run(RUN_KEY)
    assert e.value.error == "NotTrainer"
    assert client.get_run(RUN_KEY)["budget"] == 11 * ETHER


def test_run_fund_refuses_someone_elses_run_unless_asked(chain, tmp_path):
    """H1 from the notebook: Run.fund topped up whatever run had the id, and its creator took the money."""
    from atlas_swarm import Run
    from atlas_swarm.errors import ConfigError

    w3, client, trainer, (_, stranger, _) = chain
    run = Run.create("org/model", name="fund-test", lora={"target_modules": ["q"]}, trainer=trainer.address,
                     workdir=tmp_path)  # fmt: skip
    run._chain = as_peer(client, trainer)
    opened = run.fund(1.0, reward_per_sample_eth=1e-9, min_stake_eth=0)
    assert opened["trainer"] == trainer.address and opened["budget"] == ETHER
    run._chain = as_peer(client, stranger)
    with pytest.raises(ConfigError, match="not_mine=True"):
        run.fund(0.5)
    assert run.fund(0.5, not_mine=True)["budget"] == ETHER + ETHER // 2, "a gift, when asked for explicitly"
