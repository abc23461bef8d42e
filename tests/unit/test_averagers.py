"""The buffer layout behind OneBufferAllReduce (averaged tensors as consecutive views of one shared buffer), and the
epoch a round's group key carries (EpochGroups), and when a state round stops waiting (GivesUp)."""

import asyncio
import threading
import time
from concurrent.futures import CancelledError
from types import SimpleNamespace

import pytest
import torch
from hivemind.averaging.control import AveragingStage, StepControl
from hivemind.averaging.key_manager import is_valid_group
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.proto import averaging_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.mpfuture import MPFuture
from hivemind.utils.serializer import MSGPackSerializer

from atlas_swarm.swarm import averagers
from atlas_swarm.swarm.averagers import EpochKeys, GivesUp, StateAverager, flat_buffer, round_epoch, round_group
from atlas_swarm.swarm.rounds import RoundResult, spanned_buffer


def test_flat_buffer_views_tile_one_shared_buffer_in_order():
    views = flat_buffer([torch.Size([2, 3]), torch.Size([4]), torch.Size([1, 1])], torch.float64)
    assert [v.shape for v in views] == [torch.Size([2, 3]), torch.Size([4]), torch.Size([1, 1])]
    flat = spanned_buffer(views)
    assert flat is not None and flat.shape == (11,) and flat.dtype == torch.float64 and flat.is_shared()
    flat.copy_(torch.arange(11.0))
    assert views[1].tolist() == [6.0, 7.0, 8.0, 9.0] and views[2].item() == 10.0  # writes reach the views


def test_tensors_that_do_not_tile_one_buffer_in_order_are_left_alone():
    a, b = flat_buffer([torch.Size([3]), torch.Size([2])])
    assert spanned_buffer([b, a]) is None  # out of order
    assert spanned_buffer([a]) is not None and spanned_buffer([a]).shape == (3,)
    assert spanned_buffer([a, torch.zeros(2)]) is None  # another storage
    c, d = flat_buffer([torch.Size([2]), torch.Size([2])])
    assert spanned_buffer([c, d[1:]]) is None  # a gap
    assert spanned_buffer([]) is None


def packed(gather) -> bytes:  # what hivemind's DecentralizedAverager.step puts in a StepControl
    return MSGPackSerializer.dumps([None, 0, MSGPackSerializer.dumps(gather)])


def test_a_rounds_group_key_carries_the_epoch_it_gathers():
    matchmaking = SimpleNamespace(step_control=None)
    dht = SimpleNamespace(peer_id="me")
    keys = EpochKeys(dht, "run_grad_averager", "", None, matchmaking, MSGPackSerializer)
    assert keys.current_key == "run_grad_averager.0b"  # not looking for a group: hivemind's key
    matchmaking.step_control = SimpleNamespace(data_for_gather=packed(7))
    assert keys.current_key == "run_grad_averager_epoch7.0b" and is_valid_group(keys.current_key)
    matchmaking.step_control = SimpleNamespace(data_for_gather=packed(None))
    assert keys.current_key == "run_grad_averager.0b"  # a round without an epoch


def test_only_an_integer_gathered_is_an_epoch():
    assert round_epoch(packed(3), MSGPackSerializer) == 3
    for other in (None, True, 2.0, "3", [3]):
        assert round_epoch(packed(other), MSGPackSerializer) is None
    assert round_epoch(b"\xc1 not msgpack", MSGPackSerializer) is None


def test_a_state_round_the_swarm_already_had_is_skipped_and_its_search_cancelled_unless_it_has_its_group(monkeypatch):
    calls = []
    monkeypatch.setattr(TrainingStateAverager, "step", lambda self, **kw: calls.append(kw))
    averager = object.__new__(StateAverager)  # no processes: only the step's arguments matter here
    averager._parent_pid = -1  # hivemind's __del__ then leaves the (never started) averager alone
    searching = SimpleNamespace(done=lambda: False, cancel=lambda: calls.append("cancelled"),
                                stage=AveragingStage.LOOKING_FOR_GROUP)  # fmt: skip
    averager.step(averaging_round=True, averaging_control=searching, increment_epoch=True)
    averager.skip_round = True
    averager.step(averaging_round=True, averaging_control=searching, increment_epoch=True)
    averager.step(averaging_round=False, increment_epoch=True)  # nothing to skip
    # a search that has its group already: its groupmates wait for this peer's state, so the round runs (unless the
    # peer is stopping)
    grouped = SimpleNamespace(done=lambda: False, cancel=lambda: calls.append("cancelled"),
                              stage=AveragingStage.AWAITING_TRIGGER)  # fmt: skip
    averager.step(averaging_round=True, averaging_control=grouped, increment_epoch=True)
    averager.should_stop = lambda: True
    averager.step(averaging_round=True, averaging_control=grouped, increment_epoch=True)
    assert calls == [
        {"averaging_round": True, "averaging_control": searching, "increment_epoch": True},
        "cancelled",
        {"averaging_round": False, "averaging_control": None, "increment_epoch": True},
        {"averaging_round": False, "averaging_control": None, "increment_epoch": True},
        {"averaging_round": True, "averaging_control": grouped, "increment_epoch": True},
        "cancelled",
        {"averaging_round": False, "averaging_control": None, "increment_epoch": True},
    ]


def looking_control() -> StepControl:
    """A StepControl as hivemind's averager makes one: its trigger and cancel futures attached (plain MPFutures first:
    hivemind's backend set up by a StepControl is its own, and the next plain MPFuture fails)."""
    trigger, cancel = MPFuture(), MPFuture()
    control = StepControl(scheduled_time=get_dht_time(), deadline=get_dht_time() + 60, allow_retries=True, weight=1.0,
                          data_for_gather=packed(4))  # fmt: skip
    control.attach(trigger, cancel)
    control.allow_allreduce()  # triggered, as StateAverager._do's round is before it waits for the result
    control.stage = AveragingStage.LOOKING_FOR_GROUP
    return control


def averager(swarm_epoch: int = 3, stop: bool = False) -> SimpleNamespace:
    return SimpleNamespace(swarm_epoch=lambda: swarm_epoch, should_stop=lambda: stop)


def test_a_state_round_still_looking_when_a_followed_peer_has_finished_its_epoch_is_cancelled():
    control = looking_control()
    began = time.monotonic()
    with pytest.raises(CancelledError):
        GivesUp(control, 4, averager(swarm_epoch=4)).result(timeout=15)
    assert control.cancelled() and time.monotonic() - began < 1.0


def test_a_state_round_still_looking_while_nobody_has_finished_its_epoch_waits_out_its_timeout():
    control = looking_control()
    with pytest.raises(TimeoutError):
        GivesUp(control, 4, averager(swarm_epoch=3)).result(timeout=0.6)
    assert not control.done()


def test_a_state_round_that_has_its_group_is_not_given_up_and_its_result_comes_through():
    control = looking_control()
    control.stage = AveragingStage.RUNNING_ALLREDUCE  # the group is averaging: its round ends by itself (gather.WAIT)
    threading.Timer(0.4, lambda: control.set_result({"peer": 4})).start()
    assert GivesUp(control, 4, averager(swarm_epoch=9)).result(timeout=5) == {"peer": 4}


def test_a_rounds_group_is_what_its_report_names_and_empty_unless_it_ended_with_one():
    ended, looking, cancelled, bare = looking_control(), looking_control(), looking_control(), looking_control()
    ended.set_result(RoundResult(peer=4))
    ended.result().report = SimpleNamespace(group=("a", "b"))
    cancelled.cancel()
    bare.set_result({"peer": 4})  # a result without our report (no round of ours ran)
    wrapped = GivesUp(ended, 4, averager())
    assert [round_group(c) for c in (ended, wrapped, looking, cancelled, bare)] == [("a", "b"), ("a", "b"), (), (), ()]


def test_a_peer_asked_to_stop_leaves_its_state_round_at_once():
    control = looking_control()
    with pytest.raises(CancelledError):
        GivesUp(control, 4, averager(stop=True)).result(timeout=15)
    assert control.cancelled()


def test_a_leader_keeps_a_followers_join_stream_open_after_the_groups_message_until_it_is_closed(monkeypatch):
    class Base:
        codes = ()

        async def rpc_join_group(self, request, context):
            for code in self.codes:
                yield averaging_pb2.MessageFromLeader(code=code)

    class Leader(averagers.Admitted, Base):
        gather_settings = SimpleNamespace(gate=None)

    monkeypatch.setattr(averagers, "JOIN_LINGER", 0.3)

    async def serve(codes):
        leader, got = Leader(), []
        leader.codes = codes
        began = time.monotonic()
        async for message in leader.rpc_join_group(None, None):
            got.append(message.code)
        return got, time.monotonic() - began

    begin = (averaging_pb2.ACCEPTED, averaging_pb2.BEGIN_ALLREDUCE)
    got, took = asyncio.run(serve(begin))
    assert got == list(begin) and took >= 0.3  # open until the follower closes (here: nobody does)
    got, took = asyncio.run(serve((averaging_pb2.ACCEPTED, averaging_pb2.GROUP_DISBANDED)))
    assert took < 0.3  # other answers end the stream at once
