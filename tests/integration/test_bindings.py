"""PeerID <-> wallet bindings must hold both ways (real DHT nodes in this process, eth-tester chain): forged DHT
records and chain-only (front-run) registrations are ignored."""

from __future__ import annotations

import time

import pytest
from eth_account import Account
from hivemind.utils import get_dht_time
from web3 import EthereumTesterProvider, Web3

from atlas_swarm.chain import ETHER, StakingClient
from atlas_swarm.chain.session import verified_bindings
from atlas_swarm.identity import Identity
from atlas_swarm.proofs.binding import sign_binding
from atlas_swarm.swarm import Swarm
from atlas_swarm.swarm.records import WalletBinding

pytestmark = pytest.mark.integration
RUN = "bind-test-0123456789abcdef"


def test_only_two_way_bindings_count(tmp_path):
    w3 = Web3(EthereumTesterProvider())
    accounts = [Account.create() for _ in range(4)]
    for a in accounts:
        w3.eth.send_transaction({"from": w3.eth.accounts[0], "to": a.address, "value": 10 * ETHER})
    honest_acct, forger_acct, frontrunner_acct, victim_acct = accounts
    client = StakingClient.deploy(w3, honest_acct)
    swarms = []
    try:
        for name in ("honest", "forger", "victim"):
            peers = swarms[0].visible_maddrs() if swarms else []
            swarms.append(Swarm.join(Identity.load_or_create(tmp_path / name), peers, ["/ip4/127.0.0.1/tcp/0"]))
        honest, forger, victim = swarms

        # honest: both ways
        StakingClient(w3, client.address, honest_acct).register_peer(honest.peer_id)
        honest.publish_wallet(RUN, honest_acct.address, sign_binding(honest.peer_id, honest_acct.key))
        # forger: a DHT record that claims the honest PeerID for the forger's wallet, signed with the forger's key
        forged = WalletBinding(peer_id=honest.peer_id, address=forger_acct.address,
                               signature=sign_binding(honest.peer_id, forger_acct.key))  # fmt: skip
        assert forger.dht.store(f"{RUN}_wallets", subkey=forger.signer.local_public_key, value=forged.dict(),
                                expiration_time=get_dht_time() + 60)  # fmt: skip
        # victim: someone front-ran its PeerID on chain; its own DHT record names its real wallet
        StakingClient(w3, client.address, frontrunner_acct).register_peer(victim.peer_id)
        victim.publish_wallet(RUN, victim_acct.address, sign_binding(victim.peer_id, victim_acct.key))

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            seen = victim.wallet_bindings(RUN)
            if len(seen) >= 2:
                break
            time.sleep(0.2)
        assert seen == {honest.peer_id: honest_acct.address, victim.peer_id: victim_acct.address}  # forgery dropped
        assert verified_bindings(victim, client, RUN) == {honest.peer_id: honest_acct.address}  # front-run ignored
    finally:
        for s in swarms:
            s.shutdown()
