"""Tasks in hivemind's DHT and averager processes are kept until they end.

hivemind runs every call it is sent (``DHT.run_coroutine``, a ``get``, an averaging round, a state download) as an
asyncio task it keeps no reference to, and an event loop holds its tasks weakly. A call that waits on p2pd's control
socket (listing connections, opening a stream to a peer) is then reachable from nothing while it waits, because
Python's StreamReaderProtocol holds its reader weakly too. A garbage collection at that moment destroys the task
("Task was destroyed but it is pending!", GeneratorExit): the call is lost, and its caller got a GeneratorExit or
waited forever. Seen as honest finishers that never exited after `stopping` (CI, stop 36); reproduced by
tests/integration/test_dht_tasks.py (about one call in five lost while collections ran).

The fix: in those processes (only there: the patch runs after the fork, in the child's ``run``), the event loop that
hivemind's ``switch_to_uvloop`` makes gets a task factory that holds every task until it is done.

The same processes read each call from a pipe, and a call carries its reply pipe (an ``MPFuture``'s), which the
process fetches from the asking process while it unpickles the call. When the asker has just exited (an averager
process, as its peer leaves), that fetch fails: hivemind catches the ``ConnectionError`` it usually is, but once it
was an ``EOFError`` (the reply cut short), which hivemind's loop does not catch, and the DHT process died with a
traceback (a full suite's test_compression, 2026-12-04). ``CallPipe`` makes that one a ``ConnectionResetError``.
"""

from __future__ import annotations

import asyncio
import sys
from multiprocessing.reduction import ForkingPickler

_PINNED: set = set()  # every live task of this process's loop (a done task removes itself)
_LOOP_MAKERS = ("hivemind.dht.dht", "hivemind.averaging.averager")  # modules whose run() makes the loop


def _pinned_task(loop, coro, context=None):
    task = asyncio.Task(coro, loop=loop, context=context)  # (None: a copy of the current context, as by default)
    _PINNED.add(task)
    task.add_done_callback(_PINNED.discard)
    return task


def _pinning(switch_to_uvloop):
    def switch_and_pin() -> asyncio.AbstractEventLoop:
        loop = switch_to_uvloop()
        loop.set_task_factory(_pinned_task)
        return loop

    switch_and_pin.pins = True
    return switch_and_pin


def pin_tasks_in_this_process() -> None:
    """Make the loops hivemind creates in this process keep their tasks (call it in a child process's ``run``)."""
    for name in _LOOP_MAKERS:
        module = sys.modules.get(name)
        if module is not None and not getattr(module.switch_to_uvloop, "pins", False):
            module.switch_to_uvloop = _pinning(module.switch_to_uvloop)


class CallPipe:
    """The process's end of hivemind's call pipe; ``recv`` raises ConnectionResetError, which hivemind logs and reads
    on after, for a call that arrived whole but whose unpickling hit an end of file (its asker is gone). An EOFError
    of the pipe itself (its other end closed: the parent exited) is not the call's and still ends the process."""

    def __init__(self, pipe):
        self._pipe = pipe

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def recv(self):
        data = self._pipe.recv_bytes()
        try:
            return ForkingPickler.loads(data)
        except EOFError as e:
            raise ConnectionResetError(f"a call's reply pipe could not be fetched from its sender: {e!r}") from e


class PinsTasks:
    """Mixin for a hivemind class that runs in a process of its own (DHT, DecentralizedAverager)."""

    def run(self):
        pin_tasks_in_this_process()
        self._inner_pipe = CallPipe(self._inner_pipe)  # (this process's copy of the object only)
        super().run()
