"""When SwarmOptimizer looks for averaging groups, and how long it makes an epoch's last step (the decisions only; the
rounds themselves run in the multi-peer tests).

The optimizer is built without hivemind's __init__ (no DHT, no averager processes): a fake tracker and fake averagers
stand in for the layer below, and record what was scheduled.
"""

import math
import time
from types import SimpleNamespace

from hivemind.averaging.control import AveragingStage
from hivemind.utils import get_dht_time

from atlas_swarm.swarm.optimizer import SwarmOptimizer


class FakeAverager:
    def __init__(self):
        self.scheduled = []
        self.averaging_in_progress = False

    def schedule_step(self, **kwargs):
        self.scheduled.append(kwargs)
        return SimpleNamespace(triggered=False, done=lambda: False)


def optimizer(eta: float, peers: int = 2, epoch: int = 0, every: int = 2, rate: float = 8.0) -> SwarmOptimizer:
    opt = object.__new__(SwarmOptimizer)
    opt._parent_pid = -1  # hivemind's __del__ then leaves the (never started) optimizer alone
    opt.tracker = SimpleNamespace(
        global_progress=SimpleNamespace(num_peers=peers),
        estimated_next_update_time=get_dht_time() + eta,
        global_epoch=epoch,
        performance_ema=SimpleNamespace(samples_per_second=rate),
    )
    opt.state_averager = FakeAverager()
    opt.state_averager.local_epoch = epoch
    opt.grad_averager = FakeAverager()
    opt.scheduled_grads = opt.scheduled_state = None
    opt.delay_before_state_averaging = SimpleNamespace(ema_seconds_per_sample=0.0)
    opt.averaging_timeout, opt.matchmaking_time, opt.average_state_every = 20.0, 4.0, every
    opt.status_loglevel = 10
    opt._epoch_began, opt._epoch_seconds = None, math.inf
    return opt


def test_groups_are_looked_for_once_the_epoch_ends_within_half_the_averaging_timeout():
    far, near = optimizer(eta=30.0), optimizer(eta=9.0)
    for opt in (far, near):
        opt._maybe_schedule_gradient_averaging()
    assert far.grad_averager.scheduled == []
    assert near.grad_averager.scheduled == [{"timeout": 20.0, "gather": 1}]  # the round ends epoch 0
    near._maybe_schedule_gradient_averaging()  # a pending group is kept, not replaced
    assert len(near.grad_averager.scheduled) == 1


def test_right_after_a_transition_the_last_epochs_length_stands_in_for_the_unknown_eta():
    opt = optimizer(eta=math.inf, epoch=1)  # hivemind's tracker knows nothing until its next fetch
    opt._maybe_schedule_gradient_averaging()
    assert opt.grad_averager.scheduled == []  # never transitioned: the tracker's next fetch will tell
    opt._epoch_began, opt._epoch_seconds = time.monotonic(), 7.5
    opt._maybe_schedule_gradient_averaging()
    opt._maybe_schedule_state_averaging()  # the next epoch (2) averages state
    assert opt.grad_averager.scheduled == [{"timeout": 20.0, "gather": 2}]
    assert opt.state_averager.scheduled == [{"gather": 2, "timeout": 20.0}]
    long = optimizer(eta=math.inf, epoch=1)
    long._epoch_began, long._epoch_seconds = time.monotonic(), 60.0
    long._maybe_schedule_gradient_averaging()
    assert long.grad_averager.scheduled == []


def test_at_its_first_transition_a_peer_estimates_the_epoch_from_its_own_rate():
    # 2 peers at 8 samples/s each: target 100 takes about 6 s (within the horizon, 10 s); target 960 about 60 s
    short, long = optimizer(eta=math.inf, epoch=1), optimizer(eta=math.inf, epoch=1)
    short.tracker.target_batch_size, long.tracker.target_batch_size = 100, 960
    for opt in (short, long):
        opt._epoch_began = time.monotonic()  # the transition just happened; no earlier one to measure from
        opt._maybe_schedule_gradient_averaging()
    assert short.grad_averager.scheduled == [{"timeout": 20.0, "gather": 2}] and long.grad_averager.scheduled == []


def test_no_groups_while_alone_and_state_rounds_only_on_their_epochs():
    alone = optimizer(eta=1.0, peers=1)
    alone._maybe_schedule_gradient_averaging()
    alone._maybe_schedule_state_averaging()
    assert alone.grad_averager.scheduled == [] and alone.state_averager.scheduled == []
    odd = optimizer(eta=1.0, epoch=1, every=4)  # next epoch 2 is not a multiple of 4
    odd._maybe_schedule_state_averaging()
    assert odd.state_averager.scheduled == []


def test_the_last_step_of_an_epoch_is_cut_to_the_time_left():
    # 8 samples/s: a batch of 16 takes 2 s
    assert optimizer(eta=30.0).next_step_samples(16) == 16
    assert optimizer(eta=1.0).next_step_samples(16) == 8  # ends with the epoch, not 1 s after it
    assert optimizer(eta=0.35).next_step_samples(16) == 4  # never below a quarter batch
    assert optimizer(eta=0.0).next_step_samples(16) == 4  # the epoch is over: join the others soonest
    assert optimizer(eta=0.0).next_step_samples(2) == 1
    assert optimizer(eta=math.inf).next_step_samples(16) == 16  # no estimate yet (right after a transition)
    assert optimizer(eta=1.0, rate=0.0).next_step_samples(16) == 16  # no speed measured yet
    assert optimizer(eta=1.0, peers=1).next_step_samples(16) == 16  # alone: nobody waits for this peer


class FakeControl:
    def __init__(self, stage, grouped_after: float = math.inf):
        self._stage, self.cancelled = stage, False
        self._grouped_at = time.monotonic() + grouped_after

    @property
    def stage(self):
        return AveragingStage.AWAITING_TRIGGER if time.monotonic() >= self._grouped_at else self._stage

    def done(self):
        return self.cancelled

    def cancel(self):
        self.cancelled = True


def test_a_round_without_a_group_is_given_up_once_the_swarm_is_in_the_next_epoch():
    opt = optimizer(eta=5.0, epoch=3)
    opt._swarm_epoch = lambda: 4  # the others averaged epoch 3 and moved on
    missed = FakeControl(AveragingStage.LOOKING_FOR_GROUP)
    opt._give_up_without_a_group(missed)
    assert missed.cancelled
    opt._swarm_epoch = lambda: 3
    grouped = FakeControl(AveragingStage.AWAITING_TRIGGER)
    opt._give_up_without_a_group(grouped)
    assert not grouped.cancelled
    forming = FakeControl(AveragingStage.LOOKING_FOR_GROUP, grouped_after=0.3)
    opt._give_up_without_a_group(forming)  # no group yet, but the swarm is still in this epoch: the group comes
    assert not forming.cancelled and forming.stage == AveragingStage.AWAITING_TRIGGER


def test_the_swarms_epoch_is_read_from_the_peers_progress_records():
    from hivemind.utils import ValueWithExpiration

    opt = optimizer(eta=5.0)
    opt.tracker.training_progress_key = "run_progress"
    records = {b"a": ValueWithExpiration({"epoch": 3, "samples_accumulated": 5}, 1e12),
               b"b": ValueWithExpiration({"epoch": 4}, 1e12), b"c": ValueWithExpiration(None, 1e12)}  # fmt: skip
    opt.dht = SimpleNamespace(get=lambda key, latest: ValueWithExpiration(records, 1e12) if key == "run_progress" else None)
    assert opt._swarm_epoch() == 4
    opt.dht = SimpleNamespace(get=lambda key, latest: None)
    assert opt._swarm_epoch() == -1
