"""When a peer looks for its averaging groups and how long it makes an epoch's last step: swarm/schedule.py's pure
functions, with numbers (the rounds themselves run in the multi-peer tests)."""

import math

from atlas_swarm.swarm.schedule import (
    HOLD,
    assemble_now,
    fine_step,
    highest_epoch,
    horizon,
    last_step_samples,
    search_ends_in,
    seconds_to_epoch_end,
    state_round_epoch,  # fmt: skip
    time_to_look,
    unheld_state_wait,
)

H = horizon(averaging_timeout=20.0, matchmaking_time=4.0)


def test_the_horizon_is_half_the_averaging_timeout_or_just_past_matchmaking():
    assert H == 10.0
    assert horizon(averaging_timeout=4.0, matchmaking_time=5.0) == 6.0


def test_groups_are_looked_for_once_the_epoch_ends_within_the_horizon():
    assert not time_to_look(peers=2, to_epoch_end=30.0, delay=0.0, horizon_s=H)
    assert time_to_look(peers=2, to_epoch_end=9.0, delay=0.0, horizon_s=H)
    assert not time_to_look(peers=2, to_epoch_end=9.0, delay=2.0, horizon_s=H)  # the gradient round comes first
    assert not time_to_look(peers=1, to_epoch_end=1.0, delay=0.0, horizon_s=H)  # alone: nobody to find


def test_the_trackers_estimate_wins_when_it_has_one():
    assert seconds_to_epoch_end(eta=9.0, since_transition=1.0, last_epoch_seconds=60.0, peers=2, rate=8.0,
                                target=100) == 9.0  # fmt: skip
    # never transitioned and nothing fetched yet: nothing better than the tracker's (unknown) estimate
    assert seconds_to_epoch_end(math.inf, None, math.inf, 2, 8.0, 100) == math.inf


def test_right_after_a_transition_the_last_epochs_length_stands_in():
    assert seconds_to_epoch_end(eta=math.inf, since_transition=0.5, last_epoch_seconds=7.5, peers=2, rate=8.0,
                                target=960) == 7.0  # fmt: skip
    assert seconds_to_epoch_end(math.inf, 0.5, 60.0, 2, 8.0, 960) == 59.5  # a long epoch: not yet


def test_at_its_first_transition_a_peer_estimates_the_epoch_from_its_own_rate():
    # 2 peers at 8 samples/s each: target 100 takes 6.25 s (within the horizon); target 960, 60 s
    assert seconds_to_epoch_end(math.inf, 0.0, math.inf, peers=2, rate=8.0, target=100) == 6.25
    assert seconds_to_epoch_end(math.inf, 0.0, math.inf, peers=2, rate=8.0, target=960) == 60.0
    assert seconds_to_epoch_end(math.inf, 0.0, math.inf, peers=2, rate=0.0, target=100) == math.inf  # no rate yet


def test_at_its_first_transition_a_peer_slower_than_the_rest_estimates_the_epoch_from_the_swarms_rate():
    # a peer still slow from its start-up (30 samples/s) among three at 170-460: four times its own rate says the
    # 480-sample epoch takes 4 s, the peers' summed rate as last fetched (30 + 170 + 300 + 460 = 960) says 0.5 s
    assert seconds_to_epoch_end(math.inf, 0.0, math.inf, peers=4, rate=30.0, target=480) == 4.0
    assert seconds_to_epoch_end(math.inf, 0.25, math.inf, 4, 30.0, 480, swarm_rate=960.0) == 0.25
    assert seconds_to_epoch_end(math.inf, 0.0, math.inf, 4, 0.0, 480, swarm_rate=960.0) == 0.5  # own rate unknown
    assert seconds_to_epoch_end(math.inf, 0.5, 7.5, 4, 30.0, 480, swarm_rate=960.0) == 7.0  # a whole epoch seen wins


def test_a_search_declares_the_epochs_estimated_end_past_its_hold_as_its_end():
    # looking at the transition into a 5-s epoch (matchmaking 2 s, timeout 15 s): the end plus 2 x HOLD
    assert search_ends_in(5.0, matchmaking_time=2.0, averaging_timeout=15.0) == 5.0 + 2 * HOLD
    assert search_ends_in(0.3, 2.0, 15.0) == 2.0  # a late look (or the epoch is over): hivemind's matchmaking_time
    assert search_ends_in(-1.0, 2.0, 15.0) == 2.0
    assert search_ends_in(math.inf, 2.0, 15.0) == 2.0  # no estimate
    assert search_ends_in(30.0, 2.0, 15.0) == 14.0  # a second before the round's timeout
    # a client-mode peer only joins: a leader refuses a request whose end is earlier than its own (in the NAT test
    # every round of one NATed peer in two was refused so), so it asks with the latest end the round allows
    assert search_ends_in(5.0, 2.0, 15.0, client=True) == 14.0
    assert search_ends_in(math.inf, 2.0, 15.0, client=True) == 14.0


def test_a_leader_assembles_at_its_epochs_end_once_everyone_it_follows_joined_or_its_hold_is_over():
    everyone, three = {"a", "b", "c", "d"}, {"a", "b", "c"}
    # not before hivemind's own window of matchmaking_time (2 s from the look at 10.0), even with everyone in
    assert not assemble_now(11.9, 10.0, 11.0, 2.0, everyone, everyone)
    assert assemble_now(12.0, 10.0, 11.0, 2.0, everyone, everyone)
    assert assemble_now(12.0, 10.0, 11.0, 2.0, everyone | {"newcomer"}, everyone)  # one it does not follow yet
    # nor before its own epoch ended (its round not triggered yet): a newcomer may still join
    assert not assemble_now(13.0, 10.0, None, 2.0, everyone, everyone)
    assert assemble_now(14.0, 10.0, 14.0, 2.0, everyone, everyone)
    # one it follows has not joined: held, until HOLD after its own epoch ended (triggered at 14.0)
    assert not assemble_now(13.0, 10.0, None, 2.0, three, everyone)
    assert not assemble_now(14.0 + HOLD - 0.01, 10.0, 14.0, 2.0, three, everyone)
    assert assemble_now(14.0 + HOLD, 10.0, 14.0, 2.0, three, everyone)
    # a look at the epoch's end (a round scheduled there): hivemind's window first
    assert not assemble_now(14.6, 14.0, 14.0, 2.0, three, everyone)
    assert assemble_now(16.0, 14.0, 14.0, 2.0, three, everyone)
    assert assemble_now(12.0, 10.0, 11.0, 2.0, {"a", "b"}, set())  # nobody followed (no gate)


def test_state_rounds_only_on_their_epochs():
    assert state_round_epoch(local_epoch=1, swarm_epoch=1, every=2) == 2
    assert state_round_epoch(local_epoch=1, swarm_epoch=1, every=4) is None  # epoch 2 is not a multiple of 4
    assert state_round_epoch(local_epoch=1, swarm_epoch=4, every=4) == 4  # behind: the swarm's epoch counts
    assert state_round_epoch(local_epoch=5, swarm_epoch=5, every=4, final=6) == 6  # the peer's last epoch
    assert state_round_epoch(local_epoch=4, swarm_epoch=4, every=4, final=6) is None


def test_the_last_step_of_an_epoch_is_cut_to_the_time_left():
    # 8 samples/s: a batch of 16 takes 2 s
    assert last_step_samples(16, peers=2, rate=8.0, left=30.0) == 16
    assert last_step_samples(16, peers=2, rate=8.0, left=1.0) == 8  # ends with the epoch, not 1 s after it
    assert last_step_samples(16, peers=2, rate=8.0, left=0.35) == 4  # never below a quarter batch
    assert last_step_samples(16, peers=2, rate=8.0, left=0.0) == 4  # the epoch is over: join the others soonest
    assert last_step_samples(2, peers=2, rate=8.0, left=0.0) == 1
    assert last_step_samples(16, peers=2, rate=8.0, left=math.inf) == 16  # no estimate (right after a transition)
    assert last_step_samples(16, peers=2, rate=0.0, left=1.0) == 16  # no speed measured yet
    assert last_step_samples(16, peers=1, rate=8.0, left=1.0) == 16  # alone: nobody waits for this peer


def test_steps_near_the_epochs_end_run_in_fine_micro_batches():
    # 8 samples/s: a batch of 16 takes 2 s; fine within two steps (4 s) of the estimated end
    assert not fine_step(16, peers=2, rate=8.0, left=30.0)
    assert fine_step(16, peers=2, rate=8.0, left=3.9) and fine_step(16, peers=2, rate=8.0, left=0.0)
    assert not fine_step(16, peers=2, rate=8.0, left=math.inf)  # no estimate
    assert not fine_step(16, peers=2, rate=0.0, left=1.0)  # no speed measured yet
    assert not fine_step(16, peers=1, rate=8.0, left=1.0)  # alone: nobody waits for this peer


def test_the_swarms_epoch_is_the_highest_in_the_peers_progress_records():
    assert highest_epoch([{"epoch": 3, "samples_accumulated": 5}, {"epoch": 4}, None, {"epoch": "9"}]) == 4
    assert highest_epoch([]) == -1 and highest_epoch([{"samples": 1}]) == -1


def test_a_peer_behind_waits_two_status_refreshes_for_a_held_state_at_most_the_averaging_timeout():
    assert unheld_state_wait(averaging_timeout=20.0, status_every=5.0) == 10.0
    assert unheld_state_wait(averaging_timeout=6.0, status_every=5.0) == 6.0
