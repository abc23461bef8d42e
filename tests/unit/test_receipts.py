"""Co-signed receipts and checkpoint votes from Python, on an in-process EVM (eth-tester + py-evm): the digests
Python signs are the contract's, a group's receipt pays its members their weights x rate once, a checkpoint needs a
majority of the peers paid for the epoch before, and the receipt outbox signs once, settles once (across a crash),
backs off, batches and gives up as it says."""

from __future__ import annotations

import hashlib
import time

import pytest
from eth_account import Account
from web3 import EthereumTesterProvider, Web3

from atlas_swarm.chain import ETHER, StakingClient
from atlas_swarm.chain.client import cid_digest
from atlas_swarm.chain.receipts import BACKUP_DELAY, FULL_WAIT, GIVE_UP, ReceiptBox
from atlas_swarm.errors import ChainError, ChainUnreachable, TxReverted
from atlas_swarm.identity import Identity
from atlas_swarm.proofs import chain_run_id, checkpoint_digest, receipt_of, recover, sign_digest

RUN = "tiny-test-0123456789abcdef"
RATE = 10**12
TRAINER = Account.from_key("0x" + "7e" * 32)
RUN_KEY = chain_run_id(RUN, TRAINER.address)
RESULT = hashlib.sha256(b"aggregate").hexdigest()


@pytest.fixture(scope="module")
def peer_ids(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ids")
    return [Identity.load_or_create(folder / f"{i}.key").peer_id for i in range(4)]


@pytest.fixture
def chain(peer_ids):
    w3 = Web3(EthereumTesterProvider())
    accounts = [TRAINER] + [Account.create() for _ in range(4)]
    for a in accounts:
        w3.eth.send_transaction({"from": w3.eth.accounts[0], "to": a.address, "value": 100 * ETHER})
    client = StakingClient.deploy(w3, TRAINER, unbonding_period=2 * 86400, challenge_window=3600)
    client.create_run(RUN, bytes(32), RATE, ETHER, 1024, budget=10 * ETHER, samples_per_epoch=3000,
                      min_epoch_seconds=1)  # fmt: skip
    peers = accounts[1:]
    for account, pid in zip(peers, peer_ids):
        c = StakingClient(w3, client.address, account)
        c.stake(2 * ETHER)
        c.register_peer(pid)
    w3.provider.ethereum_tester.time_travel(w3.eth.get_block("latest")["timestamp"] + 100)  # epochs 0..~100 payable
    return w3, client, peers


def group_receipt(peers, peer_ids, epoch, weights, flagged=()):
    wallets = {pid: a.address for pid, a in zip(peer_ids, peers)}
    return receipt_of(RUN_KEY, epoch, RESULT, peer_ids[: len(weights)], weights, flagged, wallets)


def signatures(receipt, peers, domain, signers):
    by_wallet = {a.address: a for a in peers}
    digest = receipt.digest(domain)
    return [sign_digest(digest, by_wallet[m.wallet].key) if m.wallet in signers else b"" for m in receipt.members]


def test_python_receipt_and_vote_digests_equal_the_contracts(chain, peer_ids):
    w3, client, peers = chain
    receipt = group_receipt(peers, peer_ids, 5, [128.0, 64.0, 32.0], flagged=[peer_ids[1]])
    assert [m.wallet for m in receipt.members] == sorted((m.wallet for m in receipt.members), key=lambda w: int(w, 16))
    assert receipt.digest(client.domain) == client.receipt_digest(receipt)
    sig = sign_digest(receipt.digest(client.domain), peers[0].key)
    assert recover(receipt.digest(client.domain), sig) == peers[0].address
    assert recover(receipt.digest(client.domain), b"\x00" * 65) is None  # no signature: no signer, no exception
    cid = b"\x11" * 32
    assert checkpoint_digest(RUN_KEY, 7, cid, client.domain) == client.checkpoint_digest(RUN_KEY, 7, cid)


def test_a_group_is_paid_its_receipt_weights_once_and_only_its_signers(chain, peer_ids):
    w3, client, peers = chain
    receipt = group_receipt(peers, peer_ids, 3, [100.0, 200.0, 300.0, 400.0], flagged=[peer_ids[3]])
    signers = {peers[0].address, peers[1].address, peers[3].address}  # peer 2 signs late
    client.settle_receipts([(receipt, signatures(receipt, peers, client.domain, signers))])
    earned = {a.address: client.reputation(a.address)["pending"] for a in peers}
    assert earned == {peers[0].address: 100 * RATE, peers[1].address: 200 * RATE, peers[2].address: 0,
                      peers[3].address: 0}  # flagged: nothing  # fmt: skip
    everyone = {a.address for a in peers}
    client.settle_receipts([(receipt, signatures(receipt, peers, client.domain, everyone))])  # again, with peer 2
    assert client.reputation(peers[2].address)["pending"] == 300 * RATE
    assert client.reputation(peers[0].address)["pending"] == 100 * RATE  # not twice
    assert client.epoch_tally(RUN_KEY, 3) == {"samples": 600, "payees": 4}  # the flagged one: settled at 0
    ledger = client.run_ledger(RUN_KEY)
    assert ledger[peers[1].address] == {"epochs": 1, "samples": 200, "reward_wei": 200 * RATE, "slashed_wei": 0,
                                        "slashes": 0}  # fmt: skip


def test_minority_receipts_and_epochs_ahead_are_refused_with_named_errors(chain, peer_ids):
    w3, client, peers = chain
    receipt = group_receipt(peers, peer_ids, 4, [10.0, 10.0, 10.0, 10.0])
    with pytest.raises(TxReverted) as e:
        client.settle_receipts([(receipt, signatures(receipt, peers, client.domain, {peers[0].address,
                                                                                     peers[1].address}))])  # fmt: skip
    assert e.value.error == "NoQuorum" and "more than half" in str(e.value)
    ahead = group_receipt(peers, peer_ids, 10**9, [10.0, 10.0])
    with pytest.raises(TxReverted) as e:
        client.settle_receipts([(ahead, signatures(ahead, peers, client.domain, {a.address for a in peers}))])
    assert e.value.error == "EpochAhead"
    assert receipt_of(RUN_KEY, 1, RESULT, peer_ids[:2], [5.0, 5.0], (), {peer_ids[0]: peers[0].address}) is None


def test_checkpoints_need_votes_of_most_peers_paid_for_the_epoch_before(chain, peer_ids, tmp_path):
    from atlas_swarm.storage import LocalStore

    w3, client, peers = chain
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    cid = LocalStore(tmp_path / "store").put_folder(folder)
    receipt = group_receipt(peers, peer_ids, 8, [10.0, 10.0, 10.0])
    client.settle_receipts([(receipt, signatures(receipt, peers, client.domain, {a.address for a in peers}))])
    digest = checkpoint_digest(RUN_KEY, 9, cid_digest(cid), client.domain)
    votes = {a.address: sign_digest(digest, a.key) for a in peers[:3]}
    with pytest.raises(TxReverted) as e:
        client.record_checkpoint(RUN_KEY, 9, cid, {k: votes[k] for k in list(votes)[:1]})
    assert e.value.error == "NoQuorum"
    with pytest.raises(TxReverted) as e:  # peer 3 was not in the group of epoch 8
        client.record_checkpoint(RUN_KEY, 9, cid, {**votes, peers[3].address: sign_digest(digest, peers[3].key)})
    assert e.value.error == "NotAVoter"
    assert client.checkpoint_of(RUN_KEY, 9) is None
    client.record_checkpoint(RUN_KEY, 9, cid, {k: votes[k] for k in list(votes)[:2]})
    recorded = client.checkpoint_of(RUN_KEY, 9)
    assert recorded["cid"] == cid and recorded["votes"] == 2 and not recorded["final"]
    with pytest.raises(ValueError, match="not a CIDv1 of a dag-pb folder"):
        client.record_checkpoint(RUN_KEY, 9, "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku", votes)

    # three votes for another CID replace it, and the replacement slashes the two voters that signed both CIDs
    (folder / "adapter_model.safetensors").write_bytes(b"other weights")
    other = LocalStore(tmp_path / "store").put_folder(folder)
    digest2 = checkpoint_digest(RUN_KEY, 9, cid_digest(other), client.domain)
    double, once = list(votes)[:2], list(votes)[2]  # the first two voted for ``cid`` above
    relayer = StakingClient(w3, client.address, peers[3])
    relayer.record_checkpoint(RUN_KEY, 9, other, {a.address: sign_digest(digest2, a.key) for a in peers[:3]})
    assert client.checkpoint_of(RUN_KEY, 9)["cid"] == other
    slashed = client.contract.events.Slashed().get_logs(from_block=0)
    assert sorted((e["args"]["peer"], e["args"]["reporter"]) for e in slashed) == sorted(
        (d, peers[3].address) for d in double)
    assert all(client.reputation(d)["stake"] == ETHER and client.reputation(d)["times_slashed"] == 1 for d in double)
    assert client.reputation(once)["times_slashed"] == 0


# -- the receipt outbox (chain/receipts.py) ------------------------------------------------------------------------
class Unreachable:
    def __getattr__(self, name):
        def fail(*a, **k):
            raise ChainUnreachable("down")

        return fail


def boxes(tmp_path, client, peers, peer_ids, n=2, **kw):
    """A group of ``n`` members' receipt boxes (sorted like the receipt: boxes[0] is the poster) and their clients."""
    members = sorted(peers[:n], key=lambda a: int(a.address, 16))
    return [(ReceiptBox(tmp_path / f"box{i}", a, client.domain, **kw), StakingClient(client.w3, client.address, a))
            for i, a in enumerate(members)]  # fmt: skip


def sign_all(group, receipt, now):
    for box, _ in group:
        assert box.sign(receipt, now=now) is not None
    published = [sig for box, _ in group for sig in box.own_signatures()]
    for box, _ in group:
        box.gather(published, now=now)


def test_the_box_votes_for_one_checkpoint_per_epoch_also_after_a_restart(chain, tmp_path):
    w3, client, peers = chain
    box = ReceiptBox(tmp_path / "box", peers[0], client.domain)
    cid_a, cid_b = "bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi", "bafybeihdwdcefgh4dqkjv67uzcmw7o"
    digest = checkpoint_digest(RUN_KEY, 4, b"a" * 32, client.domain)
    vote = box.sign_vote(RUN_KEY, 4, cid_a, digest)
    assert recover(digest, vote) == peers[0].address
    again = ReceiptBox(tmp_path / "box", peers[0], client.domain)  # restarted: its receipts load beside the votes
    assert again.sign_vote(RUN_KEY, 4, cid_a, digest) == vote  # the same vote, not a second one
    assert again.sign_vote(RUN_KEY, 4, cid_b, checkpoint_digest(RUN_KEY, 4, b"b" * 32, client.domain)) is None
    assert again.sign_vote(RUN_KEY, 5, cid_b, digest) is not None  # another epoch
    (tmp_path / "box" / "votes" / f"{RUN_KEY.hex()[:16]}-{6:010d}.json").write_text("{trunc")
    assert again.sign_vote(RUN_KEY, 6, cid_a, digest) is None  # unreadable: it may hold a vote


def test_the_box_signs_an_epoch_once_and_the_group_settles_it_once_across_a_crash(chain, peer_ids, tmp_path):
    w3, client, peers = chain
    group = boxes(tmp_path, client, peers, peer_ids, batch=1, max_wait=0)
    receipt = group_receipt(peers, peer_ids, 2, [50.0, 70.0])
    t0 = time.time()
    sign_all(group, receipt, t0)
    other = group_receipt(peers, peer_ids, 2, [50.0, 71.0])
    assert group[0][0].sign(other, now=t0) is None, "never a second signature for one (run, epoch)"
    (poster, pc), (mate, mc) = group
    assert mate.flush(mc, now=t0 + 1).collecting == 1, "not the poster: it waits"
    # the poster's transaction is mined, then it crashes before writing that down; its restart settles nothing twice
    pc.settle_receipts([(receipt, [bytes.fromhex(s[2:]) for s in poster.records()[0]["signatures"].values()])])
    restarted = ReceiptBox(tmp_path / "box0", poster.account, client.domain, batch=1, max_wait=0)
    assert restarted.flush(pc, now=t0 + 2).posted == 1
    assert restarted.records()[0]["tx"] == "settled by a groupmate"
    assert mate.flush(mc, now=t0 + 2 + FULL_WAIT + BACKUP_DELAY).posted == 1, "paid: no transaction of its own"
    earned = sum(client.reputation(a.address)["pending"] for a in peers)
    assert earned == 120 * RATE, "each member paid its weight once"


def test_a_non_poster_settles_the_receipt_itself_when_the_poster_does_not(chain, peer_ids, tmp_path):
    w3, client, peers = chain
    (poster, _), (mate, mc) = boxes(tmp_path, client, peers, peer_ids, batch=1, max_wait=0)
    receipt = group_receipt(peers, peer_ids, 3, [10.0, 20.0])
    t0 = time.time()
    sign_all([(poster, None), (mate, mc)], receipt, t0)
    assert mate.flush(mc, now=t0 + BACKUP_DELAY - 1).collecting == 1
    assert mate.flush(mc, now=t0 + BACKUP_DELAY + 1).posted == 1  # the poster vanished: the mate posts for both
    assert all(client.paid_for(RUN_KEY, m.wallet, 3) for m in receipt.members)


def test_the_box_backs_off_while_the_chain_is_down_then_settles(chain, peer_ids, tmp_path):
    w3, client, peers = chain
    group = boxes(tmp_path, client, peers, peer_ids, batch=1, max_wait=0)
    (box, c) = group[0]
    t0 = time.time()
    sign_all(group, group_receipt(peers, peer_ids, 1, [5.0, 5.0]), t0)
    assert box.flush(Unreachable(), now=t0).collecting == 1
    rec = box.records()[0]
    assert rec["attempts"] == 1 and rec["next_try"] == t0 + 2.0 and "down" in rec["error"]
    box.flush(Unreachable(), now=t0 + 1.0)  # not due yet: untouched
    assert box.records()[0]["attempts"] == 1
    assert box.flush(c, now=t0 + 3).posted == 1  # chain back, backoff over


def test_retryable_reverts_wait_and_a_receipt_without_a_majority_is_given_up(chain, peer_ids, tmp_path):
    w3, client, peers = chain
    group = boxes(tmp_path, client, peers, peer_ids, batch=1, max_wait=0)
    (box, c) = group[0]
    t0 = time.time()
    ahead = group_receipt(peers, peer_ids, 400, [5.0, 5.0])  # the run's clock allows ~100 epochs yet
    sign_all(group, ahead, t0)
    assert box.flush(c, now=t0).collecting == 1 and "EpochAhead" in box.records()[0]["error"]
    w3.provider.ethereum_tester.time_travel(w3.eth.get_block("latest")["timestamp"] + 400)
    w3.provider.ethereum_tester.mine_blocks()
    assert box.flush(c, now=t0 + 60).posted == 1, "paid once the clock reached it"
    alone = group_receipt(peers, peer_ids, 5, [5.0, 5.0])
    box.sign(alone, now=t0)  # nobody else signs: no majority of 2
    assert box.flush(c, now=t0 + 100).collecting == 1
    assert box.flush(c, now=t0 + GIVE_UP + 1).unpaid == 1
    assert "no majority" in next(r for r in box.records() if r["receipt"]["epoch"] == 5)["error"]


def test_the_box_batches_receipts_but_never_holds_one_too_long(chain, peer_ids, tmp_path):
    w3, client, peers = chain
    group = boxes(tmp_path, client, peers, peer_ids, batch=4, max_wait=60)
    (box, c) = group[0]
    t0 = time.time()
    for epoch in range(3):
        sign_all(group, group_receipt(peers, peer_ids, epoch, [5.0, 5.0]), t0)
    assert box.flush(c, now=t0 + 1).collecting == 3  # waiting for a 4th
    assert box.flush(c, now=t0 + 61).posted == 3  # the oldest waited long enough
    assert len({r["tx"] for r in box.records()}) == 1, "the three went out in one transaction"


def test_foreign_signatures_are_counted_and_ignored(chain, peer_ids, tmp_path):
    w3, client, peers = chain
    group = boxes(tmp_path, client, peers, peer_ids)
    (box, _) = group[0]
    receipt = group_receipt(peers, peer_ids, 7, [5.0, 5.0])
    box.sign(receipt)
    digest = receipt.digest(client.domain)
    outsider = Account.create()
    assert box.gather([(7, digest, sign_digest(digest, outsider.key)), (7, digest, b"\x01" * 65)]) == 0
    assert box.bad_signatures == 2 and len(box.records()[0]["signatures"]) == 1


def test_a_corrupted_receipt_file_is_a_clear_error_and_nothing_is_lost(chain, peer_ids, tmp_path):
    w3, client, peers = chain
    (box, _), _ = boxes(tmp_path, client, peers, peer_ids)
    box.sign(group_receipt(peers, peer_ids, 1, [5.0, 5.0]))
    (box.folder / "0000000000000000-0000000002.json").write_text("{truncated")
    with pytest.raises(ChainError, match="unreadable.*move it away"):
        ReceiptBox(box.folder, box.account, client.domain)
    (box.folder / "0000000000000000-0000000002.json").unlink()
    assert ReceiptBox(box.folder, box.account, client.domain).counts().collecting == 1


def three_signed(chain, peer_ids, tmp_path) -> tuple[list, float]:
    """Three members' boxes (batch 4, max_wait 60) that all signed one receipt of epoch 2, and when they did."""
    w3, client, peers = chain
    group = boxes(tmp_path, client, peers, peer_ids, n=3, batch=4, max_wait=60)
    t0 = time.time()
    sign_all(group, group_receipt(peers, peer_ids, 2, [5.0, 5.0, 5.0]), t0)
    return group, t0


def test_backups_wait_out_the_posters_batching_one_after_another(chain, peer_ids, tmp_path):
    """Two backups posting together while the poster batched made two transactions for one group's epoch (seen in
    the 3-peer anvil test, 2 runs in 5): a backup waits the poster's max_wait, the k-th k x BACKUP_DELAY more."""
    group, t0 = three_signed(chain, peer_ids, tmp_path)
    (_, _), (first, fc), (second, sc) = group
    assert first.flush(fc, now=t0 + 60 + BACKUP_DELAY - 1).collecting == 1
    assert second.flush(sc, now=t0 + 60 + BACKUP_DELAY + 1).collecting == 1, "the second backup waits longer"
    assert first.flush(fc, now=t0 + 60 + BACKUP_DELAY + 1).posted == 1, "the poster never came: the first backup posts"
    assert second.flush(sc, now=t0 + 60 + 2 * BACKUP_DELAY + 1).posted == 1
    assert second.records()[0]["tx"] == "settled by a groupmate", "one transaction for the group's epoch"


def test_a_leaving_backup_sees_at_once_that_the_poster_settled(chain, peer_ids, tmp_path):
    """A leaving backup learned that the poster had settled a receipt only at its own turn, rank x FINAL_BACKUP
    after it began leaving, and its exit waited for that (7-18 s of the partition test's 26-28 s exit waits)."""
    group, t0 = three_signed(chain, peer_ids, tmp_path)
    (poster, pc), (_, _), (last, lc) = group
    assert last.flush(lc, now=t0 + 1, final=True).collecting == 1, "not its turn, and nobody settled it yet"
    assert poster.flush(pc, now=t0 + 1, final=True).posted == 1
    # Execute: the last backup's next turn of the loop, a second later (its own turn: 2 x FINAL_BACKUP later)
    counts = last.flush(lc, now=t0 + 2.5, final=True)
    # Assert
    assert counts.posted == 1 and counts.collecting == 0
    assert last.records()[0]["tx"] == "settled by a groupmate"


def test_a_member_the_receipt_pays_nothing_neither_posts_first_nor_posts_again(chain, peer_ids, tmp_path):
    """A flagged member was never paid, so asking the chain whether *it* was paid said no: it posted the settled
    receipt a second time (two transactions for one group's epoch in the 3-peer anvil test, 2 runs in 3). It now
    ranks after the members the receipt pays and looks at their payments."""
    w3, client, peers = chain
    group = boxes(tmp_path, client, peers, peer_ids, n=3, batch=1, max_wait=0)
    wallets = [box.account.address for box, _ in group]  # sorted: group[0] would be the poster
    ids = {a.address: pid for a, pid in zip(peers, peer_ids)}
    receipt = receipt_of(RUN_KEY, 4, RESULT, [ids[w] for w in wallets], [9.0, 9.0, 9.0], [ids[wallets[0]]],
                         dict(zip(ids.values(), ids.keys())))  # fmt: skip
    t0 = time.time()
    sign_all(group, receipt, t0)
    (flagged, fc), (poster, pc), (mate, mc) = group
    assert flagged.flush(fc, now=t0 + 1).collecting == 1, "smallest wallet, but flagged: not its turn"
    assert poster.flush(pc, now=t0 + 1).posted == 1
    assert poster.records()[0]["tx"].startswith("0x")
    later = t0 + 10 * BACKUP_DELAY
    assert flagged.flush(fc, now=later).posted == mate.flush(mc, now=later).posted == 1
    assert flagged.records()[0]["tx"] == mate.records()[0]["tx"] == "settled by a groupmate"
    assert client.epoch_tally(RUN_KEY, 4) == {"samples": 18, "payees": 3}, "the flagged member is settled at 0"


class _Poster:
    """ChainSession.close's view of the poster thread: pokes and the final stop (the box is the real one)."""

    def __init__(self, box):
        self.box, self.hurry, self.pokes = box, False, 0

    def poke(self):
        self.pokes += 1

    def stop(self, timeout):
        return self.box.counts()


def test_a_leaving_peer_waits_for_receipts_it_can_post_not_for_ones_nobody_will_sign(chain, peer_ids, tmp_path,
                                                                                      monkeypatch):
    """Every finishing peer of a chain run once waited its whole FINAL_FLUSH (30 s) for a receipt a groupmate never
    signed or for a vote too few peers cast; it now gives up on those after QUIET s without a change, and still
    waits for a receipt with a majority (its turn to post may be seconds away)."""
    from atlas_swarm.chain import session as s

    monkeypatch.setattr(s, "QUIET", 1.0)
    w3, client, peers = chain
    (box, _), _ = boxes(tmp_path, client, peers, peer_ids, n=2)
    session = s.ChainSession(client, box, _Poster(box), RUN, RUN_KEY, None, lambda *a, **k: None)
    box.sign(group_receipt(peers, peer_ids, 3, [8.0, 8.0, 8.0]))  # 1 of 3 signatures: no majority
    session.checkpoints[5] = "bafy-a-vote-too-few-peers-cast"
    t0 = time.monotonic()
    assert session.close(timeout=20).collecting == 1
    assert 1.0 <= time.monotonic() - t0 < 4, "gave up after QUIET s of no change, not after the timeout"
    assert session.recorded[5].startswith("not recorded")

    box.records()[0]["quorum_at"] = time.time()  # a majority signed: the peer waits on, up to its timeout
    t0 = time.monotonic()
    s.ChainSession(client, box, _Poster(box), RUN, RUN_KEY, None, lambda *a, **k: None).close(timeout=3)
    assert time.monotonic() - t0 >= 3


def test_a_leaving_peer_does_not_wait_again_for_a_receipt_quiet_since_long_before(chain, peer_ids, tmp_path):
    """A receipt of a split round (2 of 4 signatures since the partition test's cut) held each leaving peer QUIET s
    more (8 s), though nothing had come for it in a minute; the quiet is counted from its last signature."""
    from atlas_swarm.chain import session as s

    # Prepare: 1 of 3 signatures, signed a minute ago, the other signature got 30 s ago
    w3, client, peers = chain
    (box, _), _ = boxes(tmp_path, client, peers, peer_ids, n=2)
    box.sign(group_receipt(peers, peer_ids, 3, [8.0, 8.0, 8.0]), now=time.time() - 60)
    session = s.ChainSession(client, box, _Poster(box), RUN, RUN_KEY, None, lambda *a, **k: None)
    # Execute
    t0 = time.monotonic()
    assert session.close(timeout=20).collecting == 1
    # Assert: one turn (a poke and 0.5 s), not QUIET s
    assert time.monotonic() - t0 < s.QUIET / 4
    # one that got a signature just now is waited for as before
    box.records()[0]["gathered_at"] = time.time()
    t0 = time.monotonic()
    s.ChainSession(client, box, _Poster(box), RUN, RUN_KEY, None, lambda *a, **k: None).close(timeout=20)
    assert s.QUIET <= time.monotonic() - t0 < s.QUIET + 3


def test_a_leaving_peer_does_not_wait_for_votes_older_than_a_recorded_checkpoint(chain, peer_ids, tmp_path):
    """Votes at epochs where the peers held different adapters never gather a quorum; once a newer checkpoint is
    recorded (the one a notebook takes), a leaving peer stops waiting for them at once, not after QUIET s."""
    from atlas_swarm.chain import session as s

    # Prepare
    w3, client, peers = chain
    (box, _), _ = boxes(tmp_path, client, peers, peer_ids, n=2)
    session = s.ChainSession(client, box, _Poster(box), RUN, RUN_KEY, None, lambda *a, **k: None)
    session.checkpoints.update({25: "bafy-a-vote-too-few-peers-cast", 45: "bafy-another"})
    session.recorded[48] = "bafy-the-final-checkpoint"
    # Execute
    t0 = time.monotonic()
    session.close(timeout=20)
    # Assert
    assert time.monotonic() - t0 < 1.0
    assert session.recorded[25].startswith("not recorded") and "epoch 48's checkpoint" in session.recorded[45]
    assert session.recorded[48] == "bafy-the-final-checkpoint"
