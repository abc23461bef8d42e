"""A round's search declares the epoch's estimated end, its leader holds the group open for the peers it follows, and
a searcher fetches the others' declared ends again when it may have missed one (swarm/hold.py,
schedule.search_ends_in and assemble_now): three or four gradient averagers over real DHTs and averager processes,
each following all (and in one case a fourth that never looks)."""

import time

import pytest
import torch
from hivemind.utils import get_dht_time

from atlas_swarm.swarm.averagers import GradAverager
from atlas_swarm.swarm.gate import Gate
from atlas_swarm.swarm.rounds import Settings
from atlas_swarm.swarm.schedule import search_ends_in
from tests.integration.test_averagers import SHAPES, dhts

MM, TIMEOUT = 1.0, 15.0  # matchmaking_time and averaging_timeout


@pytest.fixture
def three(tmp_path):
    yield from dhts(tmp_path, 3)


@pytest.fixture
def four(tmp_path):
    yield from dhts(tmp_path, 4)


def following(all_dhts, prefix: str, absent: tuple = (), cls=GradAverager,
              newcomer: bool = False) -> list[GradAverager]:  # fmt: skip
    """One averager per DHT, each following all (and ``absent``); with ``newcomer``, the others do not follow the
    last one yet (its progress record has not reached them)."""
    ids = [dht.peer_id.to_base58() for dht in all_dhts]
    averagers = []
    for dht in all_dhts:
        gate = Gate(open_run=True)
        gate.set_followed([*(ids[:-1] if newcomer and dht is not all_dhts[-1] else ids), *absent])
        own = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
        averagers.append(cls(own, dht=dht, prefix=prefix, min_group_size=2, min_matchmaking_time=MM,
                             request_timeout=MM / 2, start=False,
                             gather_settings=Settings(rule="mean", signer=dht.settings.signer, gate=gate)))
        # bounded: hivemind waits for an averager's start without a limit, and one start hung a full-suite run here
        # (the averager's process waiting in replicate_p2p, 10 min)
        averagers[-1].run_in_background(await_ready=True, timeout=60)
        for param in own:
            param.grad = torch.ones_like(param)
    return averagers


def trigger(averagers, controls) -> None:
    """Each peer's epoch ends: the transition triggers its round (with one sample accumulated)."""
    for averager, control in zip(averagers, controls):
        averager.accumulate_grads_(batch_size=1)
        averager.step(control=control, wait=False)


def all_look_then_trigger(averagers, epoch_ends_in: float) -> float:
    """All look at once for an epoch estimated to end 8 s later (their searches declare 9 s); it ends
    ``epoch_ends_in`` s later (each is triggered then). Each is in a group of all; the seconds until every round
    is done."""
    began = get_dht_time()
    controls = [a.schedule_step(began + search_ends_in(8.0, MM, TIMEOUT), timeout=TIMEOUT, gather=1)
                for a in averagers]  # fmt: skip
    time.sleep(epoch_ends_in)
    trigger(averagers, controls)
    assert sizes(controls) == [len(averagers)] * len(averagers)
    return get_dht_time() - began


def two_look_then_a_third(averagers, first_ends_in: float, third_ends_in: float, gather: int = 1) -> list[int]:
    """A and B look for an epoch they estimate ends ``first_ends_in`` s later, C 1.5 s after them estimating
    ``third_ends_in``; all three epochs end ``first_ends_in`` s after the first look. Each round's group size."""
    began = get_dht_time()
    first = [a.schedule_step(began + search_ends_in(first_ends_in, MM, TIMEOUT), timeout=TIMEOUT, gather=gather)
             for a in averagers[:2]]  # fmt: skip
    time.sleep(1.5)
    late = averagers[2].schedule_step(get_dht_time() + search_ends_in(third_ends_in, MM, TIMEOUT), timeout=TIMEOUT,
                                      gather=gather)  # fmt: skip
    time.sleep(first_ends_in - 1.5)
    trigger(averagers, [*first, late])
    return sizes([*first, late])


def sizes(controls, timeout: float = 30.0) -> list[int]:
    """Each round's group size (0: it failed, as a round with no group does)."""
    out = []
    for c in controls:
        try:
            out.append(len(c.result(timeout)))
        except Exception:
            out.append(0)
    return out


def test_a_peer_that_looks_after_hiveminds_window_but_before_the_epoch_ends_is_grouped(three):
    averagers = following(three, "late")
    try:
        # Execute, as the swarm did before: A and B look at their transition, for an epoch that ends 1.8 s later,
        # with hivemind's expiration (the look plus matchmaking_time); C looks 1.5 s after them (a peer whose
        # estimate of the epoch's end came late)
        early = [a.schedule_step(timeout=TIMEOUT, gather=1) for a in averagers[:2]]
        time.sleep(1.5)
        late = averagers[2].schedule_step(timeout=4.0, gather=1)
        time.sleep(0.3)
        trigger(averagers, [*early, late])
        before = sizes([*early, late])
        # Execute: the same, each search declaring the epoch's estimated end past the leader's hold
        after = two_look_then_a_third(averagers, 1.8, 0.5, gather=2)
        # Assert: C was left out (its round found nobody), and now all three are grouped
        assert before == [2, 2, 0], before
        assert after == [3, 3, 3], after
    finally:
        for averager in averagers:
            averager.shutdown()


def test_a_leader_assembles_when_everyone_it_follows_joined_or_its_hold_ends_not_at_the_declared_end(three):
    complete = following(three, "complete")
    missing = []
    try:
        # Execute: all three look at once, and their epoch ends 0.2 s later
        took = all_look_then_trigger(complete, 0.2)
        # Assert: assembled after matchmaking_time (about 1 s), not at the declared end (9 s)
        assert took < 6.0, took
        while complete:
            complete.pop().shutdown()

        # Prepare: the three follow a fourth peer that never looks (gone, its progress record not yet expired)
        missing = following(three, "missing", absent=("QmGoneButFollowed",))
        # Execute: all three look at once; their epoch ends 1.5 s later
        took = all_look_then_trigger(missing, 1.5)
        # Assert: held for the fourth until HOLD after the epoch's end (2 s), then assembled without it
        assert took < 6.0, took
    finally:
        for averager in complete + missing:
            averager.shutdown()


def test_a_newcomer_that_looks_before_the_epoch_ends_is_grouped_though_not_followed_yet(three):
    averagers = following(three, "newcomer", newcomer=True)
    try:
        # Execute: A and B (who do not follow C yet) look for an epoch estimated to end 2 s later; C, a newcomer
        # whose first epoch began late, looks 1.5 s later (after hivemind's window: A and B were both in by then),
        # estimating 1 s; the epoch ends 2 s after the first look
        grouped = two_look_then_a_third(averagers, 2.0, 1.0)
        # Assert: the leader held its group open until its epoch ended, and C was in it (it was left out when the
        # leader assembled once everyone it followed had joined: [2, 2, 0])
        assert grouped == [3, 3, 3], grouped
    finally:
        for averager in averagers:
            averager.shutdown()


class HivemindSearch(GradAverager):
    fetch_leaders = False  # hivemind's PotentialLeaders: ends more than 3 s before the latest fetched assumed known


def three_look_then_one_with_the_earliest_end(averagers) -> list[int]:
    """X, Y and Z look at once, estimating that the epoch ends in 4, 4.5 and 8 s (each search declares its estimate
    plus 1 s); W looks 1 s later estimating 1 s (a peer whose estimate came from a faster rate): its end is the
    earliest. All four epochs end 2.5 s after the first look. Each round's group size."""
    began = get_dht_time()
    first = [a.schedule_step(began + s, timeout=10.0, gather=1) for a, s in zip(averagers, (5.0, 5.5, 9.0))]
    time.sleep(1.0)
    last = averagers[3].schedule_step(get_dht_time() + 2.0, timeout=6.0, gather=1)
    time.sleep(1.5)
    trigger(averagers, [*first, last])
    return sizes([*first, last])


def test_a_peer_that_looks_last_but_declares_the_earliest_end_is_grouped(four):
    plain, fetching = following(four, "plain", cls=HivemindSearch), []
    try:
        # Execute: with hivemind's search (X has fetched Y's and Z's ends, and fetches again only for ends within
        # 3 s of Z's), then with FetchingLeaders (swarm/hold.py)
        before = three_look_then_one_with_the_earliest_end(plain)
        while plain:
            plain.pop().shutdown()
        fetching = following(four, "fetching")
        after = three_look_then_one_with_the_earliest_end(fetching)
        # Assert: W was left out (X led the others and never found W's declaration), and now all four are grouped
        assert before == [3, 3, 3, 0], before
        assert after == [4, 4, 4, 4], after
    finally:
        for averager in plain + fetching:
            averager.shutdown()
