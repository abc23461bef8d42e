"""The staking contract through the Python client, on an in-process EVM (eth-tester + py-evm): runs, stakes,
bindings, wallets, and reverts that come back as named errors with a fix (receipts: tests/unit/test_receipts.py)."""

from __future__ import annotations

import hashlib

import pytest
from eth_account import Account
from web3 import EthereumTesterProvider, Web3

from atlas_swarm.chain import ETHER, StakingClient, decode_revert
from atlas_swarm.chain.wallet import create_wallet, load_wallet
from atlas_swarm.errors import ChainError, ChainUnreachable, TxReverted, WalletError
from atlas_swarm.identity import Identity
from atlas_swarm.proofs import chain_run_id
from atlas_swarm.proofs.binding import sign_binding, verify_binding

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


def test_reverts_are_decoded_with_names_and_fixes(chain, peer_ids):
    w3, client, _, (peer, other, _) = chain
    with pytest.raises(TxReverted) as e:
        as_peer(client, peer).stake(0)
    assert e.value.error == "ZeroAmount"
    as_peer(client, other).register_peer(peer_ids[0])  # someone else naming our PeerID first locks nobody out
    staked(client, peer, peer_ids[0])
    assert client.binds(peer.address, peer_ids[0]) and client.binds(other.address, peer_ids[0])
    with pytest.raises(TxReverted) as e:
        as_peer(client, other).register_peer(peer_ids[1])
    assert e.value.error == "AlreadyRegistered" and "use another wallet" in str(e.value)
    with pytest.raises(TxReverted) as e:
        as_peer(client, peer).request_unstake(5 * ETHER)
    assert e.value.error == "InsufficientStake" and e.value.error_args == (2 * ETHER, 5 * ETHER)
    assert "stake more" in str(e.value)
    assert decode_revert(b"")[0] == "Unknown"


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


def test_ether_amounts_convert_to_wei_exactly():
    """Run.fund(0.5, reward_per_sample_eth=1e-6) passes floats: Decimal(1e-6) would give 999999999999 wei."""
    from atlas_swarm.chain.client import eth
    from atlas_swarm.errors import ConfigError

    assert eth(1e-6) == 10**12 and eth(0.1) == 10**17 and eth("0.5") == 5 * 10**17 and eth(2) == 2 * ETHER
    for bad in ("-1", "abc"):
        with pytest.raises(ConfigError):
            eth(bad)


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
