"""The peer's own admission check and the admitted set a staked run reads from the chain (gatekeeper.py), over a
swarm and a chain client of in-memory tables (the real ones: tests/integration)."""

from types import SimpleNamespace

import pytest

from atlas_swarm.config import RunSpec
from atlas_swarm.errors import NotAdmitted
from atlas_swarm.gatekeeper import Gatekeeper

ME, OTHER, POOR = "Qm" + "a" * 44, "Qm" + "b" * 44, "Qm" + "c" * 44
TRAINER = "0x" + "9" * 40


def spec(**trust) -> RunSpec:
    return RunSpec.from_dict({"name": "gk", "trainer": TRAINER, "model": {"base": "m", "task": "causal-lm"},
                              "lora": {"target_modules": ["q"]}, "trust": trust})  # fmt: skip


class Swarm:
    peer_id = ME

    def __init__(self, bindings=None):
        self.bindings = bindings or {}

    def wallet_bindings(self, run_id):
        return dict(self.bindings)


class Client:
    """The staking client's reads: who registered which PeerID, stakes, the run's minStake."""

    def __init__(self, registered, stakes, min_stake):
        self.registered, self.stakes, self.min_stake = registered, stakes, min_stake

    def binds(self, address, peer_id):
        return self.registered.get(address) == peer_id

    def reputation(self, address):
        return {"stake": self.stakes.get(address, 0)}

    def get_run(self, run):
        return {"min_stake": self.min_stake}


def test_a_peer_not_in_the_allowlist_is_told_so():
    gate = Gatekeeper(spec(admission="allowlist", allowlist=[OTHER]), Swarm()).start()
    with pytest.raises(NotAdmitted, match="not in its allowlist"):
        gate.check_self()
    Gatekeeper(spec(admission="allowlist", allowlist=[ME]), Swarm()).start().check_self()  # listed: fine


def test_a_staked_run_needs_the_chain_flags():
    with pytest.raises(NotAdmitted, match="--chain-rpc"):
        Gatekeeper(spec(admission="staked"), Swarm()).start().check_self()


def test_a_staked_run_admits_peers_bound_both_ways_with_enough_stake():
    addr = {p: "0x" + c * 40 for p, c in ((ME, "1"), (OTHER, "2"), (POOR, "3"))}
    swarm = Swarm(bindings=addr)
    client = Client(registered={addr[ME]: ME, addr[POOR]: POOR}, stakes={addr[ME]: 10, addr[OTHER]: 10, addr[POOR]: 1},
                    min_stake=5)  # fmt: skip  (OTHER never called registerPeer: its binding holds one way only)
    keeper = Gatekeeper(spec(admission="staked"), swarm, SimpleNamespace(client=client, run=b"r")).start()
    try:
        keeper.check_self()
        assert keeper.gate.admitted() == {ME}
        assert swarm.admits(ME) and not swarm.admits(OTHER) and not swarm.admits(POOR)
        client.stakes[addr[ME]] = 0  # unstaked: the next refresh drops it
        keeper.refresh()
        with pytest.raises(NotAdmitted, match="stake"):
            keeper.check_self()
    finally:
        keeper.close()

