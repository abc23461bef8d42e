"""A call into hivemind's DHT process must never be lost to Python's garbage collector (real DHT node and p2pd).

hivemind runs each call it is sent as a task it keeps no reference to, and asyncio's event loop holds tasks weakly. A
call that waits on p2pd's control socket (listing connections, opening a stream) is then reachable from nothing while
it waits: Python's StreamReaderProtocol holds its reader weakly too. A garbage collection at that moment destroyed the
task ("Task was destroyed but it is pending!", GeneratorExit) and its caller waited forever: the honest finishers that
hung after `stopping` in CI (session 17, stop 36)."""

from __future__ import annotations

import asyncio
import gc
import time
from functools import partial

import pytest
import torch
from hivemind.utils import MPFuture

from atlas_swarm.identity import Identity
from atlas_swarm.swarm import Swarm
from atlas_swarm.swarm.averagers import GradAverager
from atlas_swarm.swarm.node import _connections
from atlas_swarm.swarm.rounds import Settings

pytestmark = pytest.mark.integration


async def _collect_for(_dht, _node, seconds: float) -> int:
    """Full collections in the DHT process, back to back, for ``seconds``."""
    end, n = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        gc.collect()
        n += 1
        await asyncio.sleep(0.001)
    return n


def _lost_while_collecting(collecting, call) -> tuple[int, list]:
    """Make calls (each waits on p2pd's answer) until ``collecting`` ends; how many got no answer within 10 s."""
    calls = []
    while not collecting.done():
        calls.append(call())
        time.sleep(0.002)
    deadline, lost = time.monotonic() + 10, 0
    for c in calls:
        try:
            assert c.result(timeout=max(0.0, deadline - time.monotonic())) == 0
        except BaseException:  # TimeoutError: never answered; GeneratorExit: destroyed while it waited
            lost += 1
    return lost, calls


def test_calls_waiting_on_p2pd_survive_a_garbage_collection(tmp_path):
    swarm = Swarm.join(Identity.load_or_create(tmp_path / "node"), [], ["/ip4/127.0.0.1/tcp/0"])
    try:
        collecting = swarm.dht.run_coroutine(partial(_collect_for, seconds=3.0), return_future=True)
        lost, calls = _lost_while_collecting(collecting, partial(swarm.dht.run_coroutine, _connections, True))
        assert len(calls) > 50
        assert lost == 0, f"{lost} of {len(calls)} calls into the DHT process were lost"
        assert swarm.connected() is False  # and the node still answers
    finally:
        swarm.shutdown()


class ProbedAverager(GradAverager):
    """A gradient averager that also answers two test calls, sent through its pipe as hivemind sends its own."""

    async def _probe(self, future: MPFuture) -> None:  # waits on p2pd, like a round's or a download's stream
        future.set_result(len(await self._p2p.list_peers()))

    async def _collect(self, future: MPFuture, seconds: float) -> None:
        future.set_result(await _collect_for(None, None, seconds))

    def call(self, method: str, **kwargs) -> MPFuture:
        future = MPFuture()
        self._outer_pipe.send((method, [], dict(future=future, **kwargs)))
        return future


def test_an_averager_process_keeps_calls_that_wait_on_p2pd(tmp_path):
    swarm = Swarm.join(Identity.load_or_create(tmp_path / "node"), [], ["/ip4/127.0.0.1/tcp/0"])
    averager = None
    try:
        averager = ProbedAverager([torch.nn.Parameter(torch.zeros(3))], dht=swarm.dht, prefix="probe", start=True,
                                  gather_settings=Settings(rule="mean", signer=swarm.private_key))  # fmt: skip
        lost, calls = _lost_while_collecting(averager.call("_collect", seconds=3.0), partial(averager.call, "_probe"))
        assert len(calls) > 50
        assert lost == 0, f"{lost} of {len(calls)} calls into the averager process were lost"
    finally:
        if averager is not None:
            averager.shutdown()
        swarm.shutdown()


def _reply_pipe_gone():
    raise EOFError  # what unpickling a call raised when its asker's process had exited as the call was read


class _CallFromAGoneProcess:
    def __reduce__(self):
        return _reply_pipe_gone, ()


def test_a_call_whose_asker_is_gone_does_not_end_the_process(tmp_path, capfd):
    """The DHT process of a peer that was leaving died with an EOFError traceback from inside the unpickling of a call
    (hivemind's loop catches only the ConnectionError such a call usually raises); that one call is now all it costs."""
    swarm = Swarm.join(Identity.load_or_create(tmp_path / "node"), [], ["/ip4/127.0.0.1/tcp/0"])
    averager = None
    try:
        averager = ProbedAverager([torch.nn.Parameter(torch.zeros(3))], dht=swarm.dht, prefix="probe", start=True,
                                  gather_settings=Settings(rule="mean", signer=swarm.private_key))  # fmt: skip
        swarm.dht._outer_pipe.send(("_get", [], dict(key=_CallFromAGoneProcess())))
        averager._outer_pipe.send(("_probe", [], dict(future=_CallFromAGoneProcess())))
        # each process reads its calls in order: an answer to the next call means it read that one and lived on
        answers = swarm.dht.get("nothing-stored-here", return_future=True), averager.call("_probe")
        try:
            got = tuple(a.result(timeout=10) for a in answers)
        except TimeoutError:
            got = None
        assert got == (None, 0), (f"DHT process alive: {swarm.dht.is_alive()}, averager process alive: "
                                  f"{averager.is_alive()}\n{capfd.readouterr().err[-3000:]}")  # fmt: skip
        assert "EOFError" not in capfd.readouterr().err.replace("from EOFError", "")
    finally:
        if averager is not None:
            averager.shutdown()
        swarm.shutdown()
