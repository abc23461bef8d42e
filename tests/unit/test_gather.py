"""What a member checks in each groupmate's update before it aggregates it (swarm/gather.py): one bad update costs its
sender that round, never the round itself, and no bytes from the network raise."""

import asyncio
import time

import msgpack
import pytest
import torch
from hivemind.compression import Float16Compression, NoCompression
from hivemind.compression.base import CompressionInfo
from hivemind.proto import runtime_pb2
from hivemind.utils.crypto import RSAPrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from atlas_swarm.swarm import gate as gate_module
from atlas_swarm.swarm import updates
from atlas_swarm.swarm.gate import Gate
from atlas_swarm.swarm.node import peer_id_of_key
from atlas_swarm.swarm.rounds import Round, Settings, pair_refused
from atlas_swarm.swarm.updates import check_update, parse_relay_request, relay_request, sign_update

KEY = RSAPrivateKey()
PEER = peer_id_of_key(KEY.get_public_key())
GROUP, PREFIX, NUMEL = b"g" * 20, "run_grad_averager", 12
NONE = runtime_pb2.CompressionType.NONE


def serialized(values, compression=NoCompression()):
    t = torch.as_tensor(values, dtype=torch.float32)
    return compression.compress(t, CompressionInfo.from_tensor(t), allow_inplace=False)


def update(values=None, weight=8.0, key=KEY, peer=PEER, group=GROUP):
    s = serialized(torch.arange(NUMEL, dtype=torch.float32) if values is None else values)
    return sign_update(key, PREFIX, group, peer, weight, s), s


def check(blob, s, sender=PEER):
    return check_update(blob, s, PREFIX, GROUP, sender, NUMEL, NONE)


def test_a_good_update_gives_its_weight_and_tensor():
    weight, tensor = check(*update())
    assert weight == 8.0 and torch.equal(tensor, torch.arange(NUMEL, dtype=torch.float32))


@pytest.mark.parametrize("bad, why", [
    (dict(values=torch.full((NUMEL,), float("nan"))), "non-finite values"),
    (dict(values=torch.zeros(NUMEL + 1)), "wrong size"),
    (dict(weight=-1.0), "weight not finite or negative"),
    (dict(weight=float("inf")), "weight not finite or negative"),
    (dict(key=RSAPrivateKey()), "bad signature"),  # signed by another key than the sender's PeerID
    (dict(group=b"h" * 20), "another round"),  # replayed from another round
])  # fmt: skip
def test_a_bad_update_is_refused_with_its_reason(bad, why):
    assert why in check(*update(**bad))


def test_an_update_sent_for_another_peer_is_refused():
    other = peer_id_of_key(RSAPrivateKey().get_public_key())
    assert "another round or sender" in check(*update(), sender=other)


def test_a_tampered_tensor_or_compression_is_refused():
    blob, s = update()
    tampered = runtime_pb2.Tensor()
    tampered.CopyFrom(s)
    tampered.buffer = bytes(len(s.buffer))
    assert "digest" in check(blob, tampered)
    half = serialized(torch.zeros(NUMEL), Float16Compression())  # well signed, but not the run's compression
    assert "compression" in check(sign_update(KEY, PREFIX, GROUP, PEER, 8.0, half), half)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048), st.binary(max_size=256), st.sampled_from([0, 1, 2, 3]),
       st.lists(st.integers(0, 64), max_size=3))  # fmt: skip
def test_no_bytes_from_a_groupmate_raise(blob, buffer, compression, size):
    s = runtime_pb2.Tensor(buffer=buffer, compression=compression, size=size, dtype="float32")
    assert isinstance(check(blob, s), str)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=64), st.floats(), st.integers(-2**63, 2**64 - 1), st.text(max_size=8)),
                max_size=10))
def test_no_well_formed_msgpack_of_the_wrong_shape_raises(fields):
    s = serialized(torch.zeros(NUMEL))
    assert isinstance(check(msgpack.packb([msgpack.packb(fields), b"sig"]), s), str)


def test_a_relay_request_names_its_round_and_the_wanted_member():
    assert parse_relay_request(relay_request(GROUP, PEER)) == (GROUP, PEER)


# what msgpack packs (it refuses integers beyond 64 bits: an unbounded strategy failed 1 full-suite run)
FIELDS = st.one_of(st.binary(max_size=64), st.integers(-2**63, 2**64 - 1), st.text(max_size=8), st.none())


@given(st.one_of(st.binary(max_size=5000), st.lists(FIELDS, max_size=4).map(msgpack.packb)))
def test_no_bytes_asking_for_a_relay_raise(blob):
    got = parse_relay_request(blob)
    assert got is None or (isinstance(got[0], bytes) and isinstance(got[1], str)), got


def test_a_refusal_names_its_round_and_no_relay_request_or_update_is_one():
    assert updates.parse_refusal(updates.refusal(GROUP)) == GROUP
    assert updates.parse_refusal(relay_request(GROUP, PEER)) is None
    assert updates.parse_refusal(update()[0]) is None


@given(st.one_of(st.binary(max_size=5000), st.lists(FIELDS, max_size=4).map(msgpack.packb)))
def test_no_bytes_refusing_a_pair_raise(blob):
    got = updates.parse_refusal(blob)
    assert got is None or isinstance(got, bytes), got


def finished_round(members: int, arrivals: dict, wait: float, grace: float, waived=(), least=3) -> tuple[set, float]:
    """Who had settled when Round.wait_for_updates returned, and after how long: member i settles after
    ``arrivals[i]`` s (members absent from ``arrivals`` never do; member 0 is this peer, settled at once); the
    members numbered in ``waived`` are not waited for past the quorum (swarm/stragglers.py); ``least``: the updates
    a quorum needs at least (3 under a robust rule, 2 under the mean)."""
    names = [f"m{i}" for i in range(members)]

    async def scenario():
        round_ = Round(GROUP, tuple(names), NUMEL, NONE, [], waived=frozenset(names[i] for i in waived), least=least)
        round_.settle("m0", (1.0, torch.zeros(NUMEL)))
        loop = asyncio.get_running_loop()
        for i, delay in arrivals.items():
            loop.call_later(delay, round_.settle, names[i], (1.0, torch.zeros(NUMEL)))
        began = time.monotonic()
        await round_.wait_for_updates(wait=wait, grace=grace)
        return set(round_.updates), time.monotonic() - began

    return asyncio.run(scenario())


def test_a_missing_groupmate_costs_the_others_the_grace_not_the_whole_wait():
    # Execute: 3 of 4 updates are in at once, the fourth never comes
    settled, took = finished_round(4, {1: 0.01, 2: 0.02}, wait=60.0, grace=0.3)
    # Assert
    assert settled == {"m0", "m1", "m2"}
    assert took < 30.0, "waited out the whole wait for a straggler"


def test_a_groupmate_late_by_less_than_the_grace_is_waited_for():
    settled, _ = finished_round(4, {1: 0.01, 2: 0.02, 3: 0.2}, wait=60.0, grace=30.0)
    assert settled == {"m0", "m1", "m2", "m3"}


def test_without_a_quorum_the_round_waits_for_everyone_up_to_the_wait():
    # Prepare: half of a group of 4 is in; the grace does not start
    settled, took = finished_round(4, {1: 0.01, 3: 0.5}, wait=60.0, grace=0.01)
    assert settled == {"m0", "m1", "m3"}, "the grace started before a quorum was in"


@pytest.mark.parametrize("members", [2, 3])
def test_a_pair_or_a_group_of_three_waits_for_everyone(members):
    # a cut-off would leave a pair, which the robust rule does not average: no grace
    settled, took = finished_round(members, {i: 0.1 * i + 0.01 for i in range(1, members - 1)} | {members - 1: 0.5},
                                   wait=60.0, grace=0.01)  # fmt: skip
    assert settled == {f"m{i}" for i in range(members)}
    assert took < 30.0, "waited out the whole wait with every update in"


def test_under_the_mean_a_group_of_three_waits_the_grace_for_a_straggler_and_a_pair_for_its_partner():
    # the mean averages a pair (allowlist runs), so what a cut-off leaves of a group of 3 still averages
    settled, took = finished_round(3, {1: 0.01}, wait=60.0, grace=0.3, least=2)
    assert settled == {"m0", "m1"} and took < 30.0, "waited out the whole wait for a straggler"
    settled, took = finished_round(2, {1: 0.5}, wait=60.0, grace=0.01, least=2)
    assert settled == {"m0", "m1"}, "a pair cut its partner off"


def test_the_straggler_gets_twice_what_the_quorum_took():
    # Prepare: a quorum of a group of 5 (3 updates) is in after 0.3 s; the fourth comes 0.2 s later, within 2 x 0.3 s
    settled, _ = finished_round(5, {1: 0.3, 2: 0.3, 3: 0.5}, wait=60.0, grace=0.01)
    assert settled == {"m0", "m1", "m2", "m3"}


def test_a_pair_does_not_count_a_newcomer_that_arrived_after_its_round_began(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(gate_module.time, "time", lambda: clock[0])
    gate = Gate(open_run=True)
    settings = Settings(rule="centered_clip", gate=gate)
    gate.set_followed(["QmA", "QmB"])
    clock[0] = 105.0
    gate.set_followed(["QmA", "QmB", "QmC"])  # 5 s after the first sighting: started with the others, not new
    assert gate.followed(since=101.0) == {"QmA", "QmB", "QmC"}
    assert pair_refused(settings, ["QmA", "QmB"], since=101.0)
    clock[0] = 130.0
    gate.set_followed(["QmA", "QmB", "QmC", "QmNew"])  # a newcomer, first seen at 130
    assert gate.followed() == {"QmA", "QmB", "QmC", "QmNew"}
    assert gate.followed(since=129.0) == {"QmA", "QmB", "QmC"}
    assert pair_refused(settings, ["QmA", "QmB"], since=129.0)  # QmC, an old peer, still counts
    gate.set_followed(["QmA", "QmB", "QmNew"])  # QmC's record lapsed
    assert not pair_refused(settings, ["QmA", "QmB"], since=129.0)  # a round begun before the newcomer came
    assert pair_refused(settings, ["QmA", "QmB"], since=130.0)  # one begun after
    assert pair_refused(settings, ["QmA", "QmB"])  # no round time: any third peer counts
    clock[0] = 140.0
    gate.set_followed(["QmA", "QmB", "QmC"])  # a lapsed record that returns is not new
    assert pair_refused(settings, ["QmA", "QmB"], since=139.0)
    assert not pair_refused(Settings(rule="mean", gate=gate), ["QmA", "QmB"])  # the mean has no pair rule


def test_a_waived_straggler_is_not_waited_for_past_the_quorum():
    # Prepare: member 3 was cut off in its last round (waived); it would arrive 0.5 s after the quorum, within the grace
    settled, took = finished_round(4, {1: 0.01, 2: 0.02, 3: 0.5}, wait=60.0, grace=30.0, waived=[3])
    assert settled == {"m0", "m1", "m2"}
    assert took < 0.4, "waited past the quorum for a waived member"


def test_a_waived_member_is_still_waited_for_when_the_quorum_needs_it():
    # a group of 4 with one update missing and one waived: without the waived one's update there is no quorum
    settled, _ = finished_round(4, {1: 0.01, 3: 0.3}, wait=60.0, grace=0.01, waived=[3])
    assert settled == {"m0", "m1", "m3"}
    # a group of 3: the quorum is everyone, so waiving changes nothing
    settled, _ = finished_round(3, {1: 0.01, 2: 0.3}, wait=60.0, grace=0.01, waived=[2])
    assert settled == {"m0", "m1", "m2"}
