"""swarm/stragglers.py: which groupmates a round does not wait the grace for, and for how long."""

from hypothesis import given, settings
from hypothesis import strategies as st

from atlas_swarm.swarm.stragglers import CUT_OFF, MAX_WAIVED, REMEMBERED, Stragglers

MEMBERS = ["a", "b", "c"]


def rounds_until_waited_for(s: Stragglers, peer: str) -> list[bool]:
    """Run rounds in which ``peer`` is always cut off; which of the first 40 waived it."""
    waived_in = []
    for _ in range(40):
        waived = s.waive(MEMBERS)
        waived_in.append(peer in waived)
        s.record(MEMBERS, waived, {peer: CUT_OFF})
    return waived_in


def test_a_member_cut_off_is_waived_next_round_then_probed_with_a_doubling_backoff():
    s = Stragglers()
    pattern = rounds_until_waited_for(s, "c")
    # round 0 waits for it (cut off), round 1 waives it, round 2 probes, then 2 waived, probe, 4, probe, 8, probe, 8 ...
    assert pattern[:12] == [False, True, False, True, True, False, True, True, True, True, False, True]
    runs, current = [], 0
    for waived in pattern:
        if waived:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    assert runs[:3] == [1, 2, 4] and set(runs[3:]) == {MAX_WAIVED}


def test_an_update_in_time_clears_a_member_and_others_are_not_affected():
    s = Stragglers()
    s.record(MEMBERS, frozenset(), {"c": CUT_OFF})
    assert s.waive(MEMBERS) == {"c"}
    s.record(MEMBERS, frozenset({"c"}), {})  # it came in time although waived
    assert s.waive(MEMBERS) == frozenset() and len(s) == 0


def test_only_lateness_counts_not_a_refused_update():
    s = Stragglers()
    refused = {"a": "bad signature", "b": "exchange failed: ControlFailure", "c": "non-finite values"}
    s.record(MEMBERS, frozenset(), refused)
    assert s.waive(MEMBERS) == frozenset() and len(s) == 0


def test_a_waived_member_cut_off_again_keeps_counting_down():
    s = Stragglers()
    s.record(MEMBERS, frozenset(), {"c": CUT_OFF})
    s.record(MEMBERS, frozenset(), {"c": CUT_OFF})  # cut off again while not waived (a probe): 2 rounds now
    first = s.waive(MEMBERS)
    s.record(MEMBERS, first, {"c": CUT_OFF + " (late before: not waited for)"})
    second = s.waive(MEMBERS)
    s.record(MEMBERS, second, {"c": CUT_OFF})
    assert first == second == {"c"} and s.waive(MEMBERS) == frozenset()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10**6), st.booleans()), max_size=2000))
def test_memory_is_bounded_whoever_is_late(events):
    s = Stragglers()
    for peer, late in events:
        members = [str(peer)]
        s.record(members, s.waive(members), {str(peer): CUT_OFF} if late else {})
    assert len(s) <= REMEMBERED
