"""A round cancelled from the training process is cancelled before its averager process hears of it (cancel_round).

The averager's round wakes on the cancel message and reads the round's shared state: hivemind's StepControl.cancel
sends the message first and sets the state last, so an averager that read in between looked for a group on until the
round's deadline (swarm/averagers.py, cancel_round)."""

from hivemind.averaging.control import StepControl
from hivemind.utils import get_dht_time
from hivemind.utils.mpfuture import MPFuture

from atlas_swarm.swarm.averagers import GivesUp, cancel_round


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


def test_cancel_round_cancels_the_round_a_state_round_wraps_and_a_done_round_stays_done():
    control, message = a_round()
    assert cancel_round(GivesUp(control, 3, averager=None)) and message.seen is True
    done, _ = a_round()
    done.set_result("group")
    assert not cancel_round(done) and done.result() == "group"
