"""The tracker thread's event loop (swarm/tracker.OwnedLoop): hivemind's MPFuture runs the loop its future was made
on from its own background thread when the future's result comes while that loop is stopped; the tracker closing its
loop just then raised "Cannot close a running event loop" (a traceback on a peer's stderr, 1 full-suite run)."""

import asyncio
import threading
import time
import warnings

import pytest

from atlas_swarm.swarm.tracker import OwnedLoop


def run_in_another_thread(loop, coro) -> threading.Thread:
    thread = threading.Thread(target=loop.run_until_complete, args=(coro,))
    thread.start()
    return thread


def test_a_plain_loop_run_by_another_thread_cannot_be_closed_by_its_owner():
    # what hivemind's MPFuture._set_event_threadsafe does with a stopped loop (the bug OwnedLoop avoids)
    loop = asyncio.new_event_loop()
    other = run_in_another_thread(loop, asyncio.sleep(0.5))
    try:
        deadline = time.monotonic() + 5
        while not loop.is_running() and time.monotonic() < deadline:
            time.sleep(0.001)
        with pytest.raises(RuntimeError, match="running event loop"):
            loop.close()
    finally:
        other.join()
        loop.close()


def test_another_threads_run_of_an_owned_loop_does_nothing_and_its_owner_closes_it():
    loop = OwnedLoop()
    ran = []

    async def set_event():
        ran.append(True)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a coroutine never awaited would warn
        other = run_in_another_thread(loop, set_event())
        other.join()
        assert not ran and not loop.is_running()
        assert loop.run_until_complete(asyncio.sleep(0, result="owner")) == "owner"
        loop.close()
    assert loop.is_closed()
