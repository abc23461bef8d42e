"""Who is admitted and which progress claims are followed (admission.py): tables in, sets out."""

import math

from hypothesis import given
from hypothesis import strategies as st

from atlas_swarm.admission import admitted_peers, epoch_ceiling, sane_progress, trusted_states
from atlas_swarm.config import TrustSpec
from atlas_swarm.swarm.records import parse_state

A, B = "Qm" + "a" * 44, "Qm" + "b" * 44
ADDR = "0x" + "1" * 40


def test_open_admits_everyone_and_an_allowlist_its_peers_and_bound_addresses():
    assert admitted_peers(TrustSpec()) is None
    allow = TrustSpec(admission="allowlist", allowlist=(A, ADDR))
    assert admitted_peers(allow, bindings={B: ADDR.upper().replace("0X", "0x"), "Qmc": "0x" + "2" * 40}) == {A, B}


def test_staked_admits_bound_peers_at_or_above_min_stake():
    staked = TrustSpec(admission="staked")
    bindings = {A: ADDR, B: "0x" + "2" * 40}
    stakes = {ADDR: (True, 10), "0x" + "2" * 40: (True, 9)}
    assert admitted_peers(staked, bindings, stakes, min_stake=10) == {A}
    assert admitted_peers(staked, bindings, {ADDR: (False, 10**20)}, min_stake=10) == frozenset()


def test_one_liar_cannot_raise_the_epoch_ceiling():
    assert epoch_ceiling([5, 5, 10**6]) == 6
    assert epoch_ceiling([5, 10**6]) == 6  # of two, the lower
    assert epoch_ceiling([]) is None


def record(epoch, samples=8, rate=10.0):
    return {"epoch": epoch, "samples_accumulated": samples, "samples_per_second": rate, "time": 0.0,
            "client_mode": False}  # fmt: skip


def test_progress_far_ahead_is_not_followed_and_claims_are_capped():
    records = {"me": record(5), A: record(5, 10), B: record(10**6, 10**9, float("inf"))}
    kept, refused = sane_progress(records, "me", lambda p: True, cap=96, target=96)
    assert set(kept) == {"me", A} and refused == 1
    kept, _ = sane_progress({"me": record(5, 8), B: record(5, 10**9, 1e9)}, "me", lambda p: True, cap=96, target=96)
    assert kept[B]["samples_accumulated"] == 24 and kept[B]["samples_per_second"] == 40.0  # max(2*8, 96/4); 4x rate


def test_a_waiting_peers_status_outvotes_a_lone_liars_progress():
    records = {"me": record(0), B: record(10**6)}
    kept, _ = sane_progress(records, "me", lambda p: True, 96, 96, others_epochs={A: 0})
    assert set(kept) == {"me"}


def test_a_newcomer_follows_a_swarm_ahead_of_it():
    kept, _ = sane_progress({"me": record(0), A: record(7), B: record(7)}, "me", lambda p: True, 96, 96)
    assert set(kept) == {"me", A, B}



def test_a_lone_record_one_epoch_ahead_is_held_at_this_epoch_with_what_it_last_counted_there():
    C = "Qm" + "c" * 44
    # a liar one ahead beside an honest peer at this epoch: held, with nothing (it never counted here)
    kept, _ = sane_progress({"me": record(5), A: record(5), B: record(6, 500)}, "me", lambda p: True, 96, 96,
                            held=(5, {}))  # fmt: skip
    assert {p: r["epoch"] for p, r in kept.items()} == {"me": 5, A: 5, B: 5}
    assert kept[B]["samples_accumulated"] == 0 and kept[B]["samples_per_second"] == 0.0
    # an honest peer that moved on alone still counts the samples its record last counted here
    kept, _ = sane_progress({"me": record(5), A: record(5), B: record(6, 500)}, "me", lambda p: True, 96, 96,
                            held=(5, {B: 40}))  # fmt: skip
    assert kept[B]["samples_accumulated"] == 40 and kept[B]["epoch"] == 5
    # a strict majority of the others ahead (this peer missed their round): followed at once, as hivemind does
    for records in ({"me": record(5), A: record(6), B: record(6), C: record(5)}, {"me": record(5), B: record(6)}):
        kept, _ = sane_progress(records, "me", lambda p: True, 96, 96, held=(5, {}))
        assert kept[B]["epoch"] == 6
    # a status counts in the electorate: a waiting peer at this epoch and a lone record ahead
    kept, _ = sane_progress({"me": record(5), B: record(6)}, "me", lambda p: True, 96, 96, others_epochs={A: 5},
                            held=(5, {}))  # fmt: skip
    assert kept[B]["epoch"] == 5


def test_a_record_ahead_of_the_majority_that_moved_on_is_held_at_the_majoritys_epoch():
    """The honest peer A ended epoch 5 a moment before this one; the liar B publishes its epoch + 1. Followed, B's
    record made this peer two epochs behind (hivemind downloads the state then, instead of joining A's round)."""
    C = "Qm" + "c" * 44
    kept, _ = sane_progress({"me": record(5), A: record(6, 300), B: record(7, 500)}, "me", lambda p: True, 96, 96,
                            held=(5, {B: 40}))  # fmt: skip
    assert {p: r["epoch"] for p, r in kept.items()} == {"me": 5, A: 6, B: 6}
    assert kept[B]["samples_accumulated"] == 0 and kept[B]["samples_per_second"] == 0.0
    # two honest peers ahead by two (this peer really is behind): followed, as hivemind does
    kept, _ = sane_progress({"me": record(5), A: record(7), C: record(7), B: record(8)}, "me", lambda p: True, 96, 96,
                            held=(5, {}))  # fmt: skip
    assert {p: r["epoch"] for p, r in kept.items()} == {"me": 5, A: 7, C: 7, B: 7}


def test_a_liars_record_read_before_this_peers_own_counts_no_more_than_a_median_peer_could():
    """As a run starts, the liar (waiting least) steps and stores its record first: a reader that had read it and
    neither its own record nor A's (A's status says A is there) made the liar its own median and counted the whole
    target: the epoch ended at once. Peers known only by their statuses (this one too, at ``own_epoch``) now count
    in the caps as peers that have done nothing yet, and so do peers behind the record's epoch."""
    now = 1000.0
    liar = dict(record(0, 10**6 + 4, 1e12), time=now - 1e4)

    def added(records, **kw):
        kept, _ = sane_progress(records, "me", lambda p: True, 1920, 1920, others_epochs={A: 0, B: 0}, now=now,
                                own_epoch=0, **kw)  # fmt: skip
        r = kept[B]
        return r["samples_accumulated"] + max(0.0, now - r["time"]) * r["samples_per_second"]

    assert added({B: liar}) <= 1920 / 6  # the floor of 3 peers
    assert added({B: liar, "me": dict(record(0, 4, 50.0), time=now)}) <= 1920 / 6
    # its own record still at epoch 0 with no rate, the liar alone at epoch 1
    assert added({B: dict(liar, epoch=1), "me": record(0, 4, 0.0)}, began=(1, now - 0.1)) <= 1920 / 6
    # every reader caps alike from what all can read: the first to step, before the other's record is stored
    first = {A: dict(record(0, 120, 400.0), time=now)}
    for reader in (A, "me"):
        kept, _ = sane_progress(first, reader, lambda p: True, 240, 240, others_epochs={A: 0, "me": 0}, now=now,
                                own_epoch=0)  # fmt: skip
        assert kept[A]["cap"] == 60 and kept[A]["samples_accumulated"] == 60, (reader, kept)


def test_non_admitted_writers_are_not_followed():
    kept, refused = sane_progress({"me": record(1), A: record(1)}, "me", lambda p: p != A, 96, 96)
    assert set(kept) == {"me"} and refused == 1


def test_trusted_states_are_those_a_strict_majority_claims():
    claims = {A: [(4, "x"), (5, "y")], B: [(5, "y")], "c": [(5, "z")]}
    assert trusted_states(claims) == {(5, "y")}
    assert trusted_states({A: [(5, "y")], B: [(5, "z")]}) == set()  # 1-1: nothing to trust


@given(st.text(max_size=40))
def test_any_state_claim_parses_or_is_none(text):
    parsed = parse_state(text)
    assert parsed is None or (isinstance(parsed[0], int) and parsed[1])


def test_a_capped_record_gives_the_same_epoch_end_fresh_or_stale():
    """A fast peer's record is capped at twice the median rate from the transition on (``began``): the estimate of
    the swarm's samples (each record's samples plus its rate times its age, as hivemind's tracker makes it) is then
    the same whether a reader's copy of it is fresh or seconds old. With a constant cap it was not: the fast peer,
    reading its own record fresh, saw the epoch end seconds after the others did (3 peers on 2 cores)."""
    def estimate(now, fast_age):
        records = {"me": dict(record(5, int(450 * (now - fast_age)), 450.0), time=now - fast_age),
                   A: dict(record(5, int(56 * 2.3), 56.0), time=2.3), B: dict(record(5, int(93 * 2.3), 93.0), time=2.3)}
        kept, _ = sane_progress(records, "me", lambda p: True, 10**6, 1440, began=(5, 0.0), now=now)
        return sum(r["samples_accumulated"] + (now - r["time"]) * r["samples_per_second"] for r in kept.values())

    for now in (3.0, 5.0, 8.0):
        fresh = estimate(now, 0.0)
        assert abs(estimate(now, 1.0) - fresh) <= 2 and abs(estimate(now, 2.0) - fresh) <= 2, now
    kept, _ = sane_progress({"me": record(5, 10**6, 1e6), A: record(5, 10, 10.0)}, "me", lambda p: True, 10**9, 96,
                            began=(5, 100.0), now=104.0)  # fmt: skip
    assert kept["me"]["samples_per_second"] == 20.0 and kept["me"]["samples_accumulated"] == 0  # its time: 0.0
    future = dict(record(5, 10**6, 1e6), time=10**9)  # a record from the future counts up to now
    kept, _ = sane_progress({"me": future, A: record(5, 10, 10.0)}, "me", lambda p: True, 10**9, 96,
                            began=(5, 100.0), now=104.0)  # fmt: skip
    assert kept["me"]["samples_accumulated"] == 80  # 2 x 10/s x 4 s


def test_in_a_first_epoch_a_capped_record_counts_no_more_stale_than_fresh():
    """Without a transition (a first epoch) a record is capped at a constant, and its rate x age stops at that cap:
    a stale copy of a fast peer's record counts what its fresh copy does. Before, a NATed peer doing 1,432 of the
    first epoch's 1,440 samples read itself fresh (capped) while the others added its rate to a stale copy, and it
    ended the epoch 1.3 s after them."""
    def estimate(now, fast_age):
        records = {"me": dict(record(0, int(450 * (now - fast_age)), 450.0), time=now - fast_age),
                   A: dict(record(0, int(56 * 2.3), 56.0), time=2.3), B: dict(record(0, int(60 * 2.3), 60.0), time=2.3)}
        kept, _ = sane_progress(records, "me", lambda p: True, 10**6, 1440, now=now)
        return sum(r["samples_accumulated"] + max(0.0, now - r["time"]) * r["samples_per_second"]
                   for r in kept.values())  # fmt: skip

    for now in (3.0, 5.0, 8.0):
        fresh = estimate(now, 0.0)
        assert estimate(now, 1.0) == fresh == estimate(now, 2.0), now
    kept, _ = sane_progress({"me": record(0, 10, 10.0), A: record(0, 8, 10.0)}, "me", lambda p: True, 96, 96, now=1.0)
    assert kept["me"]["cap"] == 24 and kept["me"]["time"] == 0.0  # under its cap: extrapolated as it was


@given(time=st.floats(), samples=st.integers(0, 10**12), rate=st.floats(0.0), transitioned=st.booleans())
def test_whatever_one_writer_claims_a_reader_adds_a_bounded_finite_count(time, samples, rate, transitioned):
    """A reader counts each kept record as its samples plus its rate times its age (hivemind's tracker). Whatever one
    writer claims (samples, rate, and the time its record was written, a NaN or an infinity included), that is finite
    and at most twice the median rate times the seconds since the transition, or in a first epoch its cap. Before,
    a record dated 10^4 s back (or -inf) ended every epoch the moment it was read, caps or not."""
    now = 1000.0
    records = {"me": dict(record(5, 200, 100.0), time=now - 1), A: dict(record(5, 200, 100.0), time=now - 2),
               B: dict(record(5, samples, rate), time=time)}  # fmt: skip
    kept, _ = sane_progress(records, "me", lambda p: True, 10**9, 1920, began=(5, now - 4) if transitioned else None,
                            now=now)  # fmt: skip
    liar = kept[B]
    added = liar["samples_accumulated"] + max(0.0, now - liar["time"]) * liar["samples_per_second"]
    assert math.isfinite(added) and added <= (2 * 100.0 * 4 if transitioned else liar["cap"]) + 1e-6, (liar, added)
    for p in ("me", A):  # the honest records are counted as written
        assert kept[p]["time"] == records[p]["time"] and kept[p]["samples_accumulated"] == 200


@given(epoch=st.integers(-1, 12) | st.integers(-1, 2**63), time=st.floats(), samples=st.integers(0, 10**12),
       rate=st.floats(0.0))
def test_whatever_epoch_one_writer_claims_beside_an_honest_peer_the_reader_stays_in_its_epoch(epoch, time, samples,
                                                                                             rate):  # fmt: skip
    """hivemind moves a reader to the highest epoch among the records it follows, and ends its epoch on the samples
    counted there. One writer beside an honest peer at the reader's epoch: whatever epoch it claims, it moves no
    reader (above the ceiling it is not followed, one ahead it is held), and what it adds is bounded as above."""
    now = 1000.0
    records = {"me": dict(record(5, 200, 100.0), time=now - 1), A: dict(record(5, 200, 100.0), time=now - 2),
               B: dict(record(epoch, samples, rate), time=time)}  # fmt: skip
    kept, _ = sane_progress(records, "me", lambda p: True, 10**9, 1920, began=(5, now - 4), now=now, held=(5, {}))
    assert max(r["epoch"] for r in kept.values()) == 5
    liar = kept.get(B)
    if liar is not None and liar["epoch"] == 5:
        added = liar["samples_accumulated"] + max(0.0, now - liar["time"]) * liar["samples_per_second"]
        assert math.isfinite(added) and added <= 2 * 100.0 * 4 + 1e-6, (liar, added)
