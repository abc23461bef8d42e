"""A round cancelled from the training process is cancelled before its averager process hears of it (cancel_round).

The averager's round wakes on the cancel message and reads the round's shared state: hivemind's StepControl.cancel
sends the message first and sets the state last, so an averager that read in between looked for a group on until the
round's deadline (swarm/averagers.py, cancel_round)."""

import logging
from types import SimpleNamespace

from hivemind.averaging.control import AveragingStage, StepControl
from hivemind.utils import get_dht_time
from hivemind.utils.mpfuture import MPFuture

from atlas_swarm.swarm.averagers import CancelsStateFirst, GivesUp, cancel_round
from atlas_swarm.swarm.optimizer import SwarmOptimizer


class Message:
    """Stands in for the averager's end of a round's trigger / cancel futures: records the round's state (as the
    averager would read it) when the message is sent."""

    def __init__(self, control: StepControl):
        self.control, self.seen = control, None

    def set_result(self, _value) -> None:
        self.seen = self.control.cancelled()

    def cancel(self) -> bool:
        return False  # a trigger already sent (the round was triggered)

    def done(self) -> bool:
        return True


def a_round() -> tuple[StepControl, Message]:
    MPFuture()  # hivemind sets up its futures' backend on a plain MPFuture (a StepControl first fails an assert)
    now = get_dht_time()
    control = StepControl(scheduled_time=now + 5, deadline=now + 20, allow_retries=True, weight=1.0,
                          data_for_gather=b"")  # fmt: skip
    message = Message(control)
    control.attach(Message(control), message)
    return control, message


def test_hivemind_tells_the_averager_before_the_round_is_cancelled():
    control, message = a_round()
    assert control.cancel()
    assert message.seen is False  # what an averager that reads at once sees: the bug cancel_round avoids


def test_cancel_round_cancels_before_the_averager_hears_of_it():
    control, message = a_round()
    assert cancel_round(control)
    assert message.seen is True and control.cancelled()


def test_a_round_our_averagers_schedule_cancels_first_whoever_calls_its_cancel():
    # hivemind's optimizer calls the round's own cancel() where we do not override it (a lone peer's pre-scheduled
    # round at its epoch's end, a failed tag-along, a shutdown while the round still looks for a group)
    class Scheduler:
        def schedule_step(self, **kwargs):
            self.control, self.message = a_round()
            return self.control

    averager = type("Averager", (CancelsStateFirst, Scheduler), {})()
    control = averager.schedule_step(gather=3)
    assert control.cancel() and averager.message.seen is True and control.cancelled()


def test_cancel_round_cancels_the_round_a_state_round_wraps_and_a_done_round_stays_done():
    control, message = a_round()
    assert cancel_round(GivesUp(control, 3, averager=None)) and message.seen is True
    done, _ = a_round()
    done.set_result("group")
    assert not cancel_round(done) and done.result() == "group"


def a_peer_whose_swarm_moved_on(local_epoch: int = 1) -> SimpleNamespace:
    """What SwarmOptimizer._give_up_without_a_group reads of its optimizer: the swarm is one epoch ahead."""
    return SimpleNamespace(local_epoch=local_epoch, status_loglevel=logging.INFO, should_stop=lambda: False,
                           _swarm_epoch=lambda: local_epoch + 1, state_averager=SimpleNamespace(skip_round=False))


def test_a_round_the_swarm_moved_past_is_given_up_before_its_averager_begins_the_search():
    # hivemind's step() returns once its averager has the round, a moment before that process sets the stage to
    # LOOKING_FOR_GROUP: read then, the stage is still IDLE. The check used to end there, and the peer waited for the
    # round until averaging_timeout (a WAN late joiner, 1 run: 20.0 s alone at its first transition)
    control, message = a_round()
    assert control.stage == AveragingStage.IDLE
    peer = a_peer_whose_swarm_moved_on()
    SwarmOptimizer._give_up_without_a_group(peer, control)
    assert control.cancelled() and message.seen is True and peer.state_averager.skip_round


def test_a_round_that_found_its_group_is_not_given_up():
    control, message = a_round()
    control.stage = AveragingStage.AWAITING_TRIGGER
    peer = a_peer_whose_swarm_moved_on()
    SwarmOptimizer._give_up_without_a_group(peer, control)
    assert not control.done() and message.seen is None and not peer.state_averager.skip_round
