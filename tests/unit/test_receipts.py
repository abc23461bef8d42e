"""Co-signed receipts and checkpoint votes from Python, on an in-process EVM (eth-tester + py-evm): the digests
Python signs are the contract's, a group's receipt pays its members their weights x rate once, and a checkpoint
needs a majority of the peers paid for the epoch before."""

from __future__ import annotations

import hashlib

import pytest
from eth_account import Account
from web3 import EthereumTesterProvider, Web3

from atlas_swarm.chain import ETHER, StakingClient
from atlas_swarm.chain.client import cid_digest
from atlas_swarm.errors import TxReverted
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
    assert client.epoch_tally(RUN_KEY, 3) == {"samples": 600, "payees": 3}
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
