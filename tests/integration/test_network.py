"""Peers on hosts of their own (network namespaces made by the test, atlas_swarm/devnet/netns.py): each peer a real
process with its own address on a switch, cut in two halves and healed. Needs root (CI runs as root)."""

from __future__ import annotations

import time

import pytest

from atlas_swarm.devnet.netns import Lab
from atlas_swarm.launch import PeerProcess
from tests.conftest import write_spec
from tests.peers import killed_at_exit, wait_until

pytestmark = pytest.mark.integration
PARTITION_S = 60.0
# The goal is 30 s. Reconnecting takes a few seconds (swarm/heal.py); what follows depends on how far apart
# the halves' epochs drifted: the peers behind must see the other half's progress and download its state before
# they can match. Measured: 8.5-14.8 s in isolated runs, 49.3 s in a full-suite run (README, "Running on real
# networks"). The test bounds what always held; on the code before heal.py no group crossed at all.
HEAL_WITHIN_S = 90.0


def lab_peer(tmp_path, host, name: str, args: list[str]) -> PeerProcess:
    return PeerProcess(tmp_path / name, ["--host-maddrs", host.maddr(), *args], threads=1, name=name, netns=host.ns,
                       env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})  # fmt: skip


def grouped_after(peers, since: float) -> list[tuple[float, set]]:
    """(time, group) of every epoch any peer averaged with others after ``since``."""
    return [(e["time"], set(e["group"])) for p in peers for e in p.events("epoch")
            if e["time"] > since and len(e["group"]) >= 2]  # fmt: skip


def test_a_partitioned_swarm_heals_into_one_and_agrees_on_one_adapter(tmp_path, tiny_model, text_data):
    """Four peers on four hosts, the first the others' only initial peer. The switch is cut into {a, b} and {c, d}
    for 60 s: each half trains on alone. Healed, groups span both halves again (HEAL_WITHIN_S says how soon), and at
    the end all four agree on one adapter. (hivemind pings its initial peers once, at start: before swarm/heal.py
    no group spanned the halves in the 60 s after the heal.)"""
    # epochs of ~5 s with four peers on 2 cores (10 s for a half): the run outlasts the partition and the heal
    spec = write_spec(tmp_path / "spec.toml", str(tiny_model), target_batch_size=2400)
    with Lab("heal") as lab, killed_at_exit([]) as peers:
        hosts = [lab.host(n) for n in "abcd"]
        extra = ["--data", str(text_data), "--batch-size", "8", "--max-epochs", "40", "--join-timeout", "90"]
        peers.append(lab_peer(tmp_path, hosts[0], "a", ["--run-spec", str(spec), "--wait-for-peers", "4", *extra]))
        started = peers[0].wait_event("started", 90)
        first = next(m for m in started["maddrs"] if f"/{hosts[0].addr}/" in m)
        for i, host in enumerate(hosts[1:], 1):
            peers.append(lab_peer(tmp_path, host, host.name, ["--initial-peers", first, "--run", started["run_id"],
                                                                "--seed", str(i), "--wait-for-peers", "4", *extra]))  # fmt: skip
        ids = [p.wait_event("started", 90)["peer_id"] for p in peers]
        halves = (set(ids[:2]), set(ids[2:]))
        spans = lambda group: bool(group & halves[0]) and bool(group & halves[1])  # noqa: E731
        wait_until(lambda: any(spans(g) for _, g in grouped_after(peers, 0)), 120, "one swarm of four")

        lab.partition(hosts[:2], hosts[2:])
        cut = time.time()
        time.sleep(PARTITION_S)
        # (a half is a pair: with the robust rule it does not average while it follows the other half's peers)
        during = grouped_after(peers, cut + 15)  # rounds already under way at the cut may still end together
        assert not any(spans(g) for _, g in during), during
        lab.heal()
        healed = time.time()

        crossed = wait_until(lambda: [t for t, g in grouped_after(peers, healed) if spans(g)], HEAL_WITHIN_S + 10,
                             "a group spanning both halves after the heal")  # fmt: skip
        heal_s = min(crossed) - healed
        print(f"first group across the halves {heal_s:.1f} s after the heal")
        (tmp_path / "heal_s.txt").write_text(f"{heal_s:.1f}\n")  # the figure README reports, kept with the run
        assert heal_s <= HEAL_WITHIN_S, heal_s

        codes = [p.wait_exit(400) for p in peers]
        assert codes == [0, 0, 0, 0], "\n\n".join(p.tail() for p in peers)
        finals = [p.wait_event("final", 1) for p in peers]
        assert len({f["adapter_hash"] for f in finals}) == 1 and all(f["agreed"] for f in finals), finals


def test_a_peer_behind_a_nat_trains_and_averages_in_client_mode(tmp_path, tiny_model, text_data):
    """Two peers on public hosts and one behind a home router (masquerade out, nothing in): the NATed peer joins with
    --client-mode, averages in groups with the others (it opens every exchange itself), and all three finishers
    agree on one adapter. Nobody can dial it: the others' connections to it are the ones it opened."""
    spec = write_spec(tmp_path / "spec.toml", str(tiny_model), target_batch_size=1440)
    with Lab("nat") as lab, killed_at_exit([]) as peers:
        a, b, home = lab.host("a"), lab.host("b"), lab.natted("c")
        extra = ["--data", str(text_data), "--batch-size", "8", "--max-epochs", "6", "--join-timeout", "90",
                 "--wait-for-peers", "3"]  # fmt: skip
        peers.append(lab_peer(tmp_path, a, "a", ["--run-spec", str(spec), *extra]))
        started = peers[0].wait_event("started", 90)
        first = next(m for m in started["maddrs"] if f"/{a.addr}/" in m)
        join = ["--initial-peers", first, "--run", started["run_id"]]
        peers.append(lab_peer(tmp_path, b, "b", [*join, "--seed", "1", *extra]))
        peers.append(lab_peer(tmp_path, home, "c", [*join, "--seed", "2", "--client-mode", *extra]))
        natted = peers[2].wait_event("started", 90)["peer_id"]

        codes = [p.wait_exit(300) for p in peers]
        assert codes == [0, 0, 0], "\n\n".join(p.tail() for p in peers)
        rounds = [e for e in peers[2].events("epoch") if len(e["group"]) >= 2]
        assert rounds and all(natted in e["group"] for e in rounds), peers[2].tail()
        seen = [e for p in peers[:2] for e in p.events("epoch") if natted in e["group"]]
        assert seen, "the public peers never averaged with the NATed one"
        finals = [p.wait_event("final", 1) for p in peers]
        assert len({f["adapter_hash"] for f in finals}) == 1 and all(f["agreed"] for f in finals), finals
