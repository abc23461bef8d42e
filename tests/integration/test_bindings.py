"""PeerID <-> wallet bindings must hold both ways (real DHT nodes in this process, anvil): forged DHT records and
chain-only (front-run) registrations are ignored, by the library and by `python -m atlas_swarm.chain peers`."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from eth_account import Account
from hivemind.utils import get_dht_time

from atlas_swarm.chain import ETHER, StakingClient
from atlas_swarm.chain.session import verified_bindings
from atlas_swarm.devnet.anvil import DEV_KEYS, Anvil
from atlas_swarm.identity import Identity
from atlas_swarm.proofs.binding import sign_binding
from atlas_swarm.swarm import Swarm
from atlas_swarm.swarm.records import WalletBinding

pytestmark = pytest.mark.integration
RUN = "bind-test-0123456789abcdef"


def test_only_two_way_bindings_count(tmp_path):
    anvil = Anvil.start()
    swarms = []
    try:
        w3 = StakingClient.web3(anvil.url)
        honest_acct, forger_acct, frontrunner_acct, victim_acct = (Account.from_key(k) for k in DEV_KEYS[1:5])
        client = StakingClient.deploy(w3, Account.from_key(DEV_KEYS[0]))
        for name in ("honest", "forger", "victim"):
            peers = swarms[0].visible_maddrs() if swarms else []
            swarms.append(Swarm.join(Identity.load_or_create(tmp_path / name), peers, ["/ip4/127.0.0.1/tcp/0"]))
        honest, forger, victim = swarms

        # honest: both ways
        StakingClient(w3, client.address, honest_acct).register_peer(honest.peer_id)
        StakingClient(w3, client.address, honest_acct).stake(ETHER)
        honest.publish_wallet(RUN, honest_acct.address, sign_binding(honest.peer_id, honest_acct.key))
        # forger: a DHT record that claims the honest PeerID for the forger's wallet, signed with the forger's key
        forged = WalletBinding(peer_id=honest.peer_id, address=forger_acct.address,
                               signature=sign_binding(honest.peer_id, forger_acct.key))  # fmt: skip
        assert forger.dht.store(f"{RUN}_wallets", subkey=forger.signer.local_public_key, value=forged.dict(),
                                expiration_time=get_dht_time() + 60)  # fmt: skip
        # victim: someone front-ran its PeerID on chain, which locks nobody out: the victim registers it all the same,
        # and its own DHT record names its real wallet
        StakingClient(w3, client.address, frontrunner_acct).register_peer(victim.peer_id)
        StakingClient(w3, client.address, victim_acct).register_peer(victim.peer_id)
        victim.publish_wallet(RUN, victim_acct.address, sign_binding(victim.peer_id, victim_acct.key))

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            seen = victim.wallet_bindings(RUN)
            if len(seen) >= 2:
                break
            time.sleep(0.2)
        assert seen == {honest.peer_id: honest_acct.address, victim.peer_id: victim_acct.address}  # forgery dropped
        assert victim.forged >= 1
        assert verified_bindings(victim, client, RUN) == {honest.peer_id: honest_acct.address,
                                                          victim.peer_id: victim_acct.address}  # front-run ignored

        # the operator's view says the same
        env = dict(os.environ, ATLAS_CHAIN_RPC=anvil.url, ATLAS_STAKING_CONTRACT=client.address)
        out = subprocess.run([sys.executable, "-m", "atlas_swarm.chain", "peers", "--initial-peers",
                              honest.visible_maddrs()[0], "--run", RUN], env=env, capture_output=True, text=True,
                             timeout=120)  # fmt: skip
        assert out.returncode == 0, out.stderr
        lines = {line.split()[0]: line for line in out.stdout.splitlines()[1:]}
        assert f"wallet {honest_acct.address} (bound both ways)  stake 1 ETH" in lines[honest.peer_id]
        assert f"wallet {victim_acct.address} (bound both ways)" in lines[victim.peer_id]
        assert frontrunner_acct.address not in out.stdout, "the front-runner's chain-only claim counts for nothing"
        assert forger.peer_id not in lines and forger_acct.address not in out.stdout
    finally:
        for s in swarms:
            s.shutdown()
        anvil.stop()
