"""How a peer stops: SIGINT/SIGTERM ask the training loop to stop after the current step; a blocking call (an
averaging round, joining, fetching the spec) is interrupted after STOP_GRACE seconds; if shutdown still hangs, the
peer's children are killed and it exits with EXIT_FORCED at STOP_HARD (the user was promised an exit within 10 s).
A second signal interrupts at once. ``watch`` stops the peer the same way when a process it cannot train without (an
averager, the DHT) dies under it, and the peer then exits with an error instead of waiting forever."""

from __future__ import annotations

import _thread
import os
import signal
import sys
import threading
import time

import psutil

STOP_GRACE = 6.0
STOP_HARD = 9.5
MARGIN = 1.0  # of the time left before STOP_HARD, kept for what comes after a bounded step of the shutdown
EXIT_FORCED = 3  # the watchdog ended a hung shutdown: the adapter may not have been saved (a clean stop exits 0)


class GracefulStop:
    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._previous = {}
        self._timers: list[threading.Timer] = []
        self._hard_at = float("inf")  # time.monotonic() of the forced exit
        self._pid = os.getpid()  # child processes forked after install() inherit the handlers: not theirs
        self._leaving = False  # the peer is shutting down (each step bounded by budget()): no more interrupts
        self.step = ""  # the step of the shutdown under way (leave() names them): what a forced exit reports
        self.failure = ""  # why the peer stops when a process of its own died (watch): it then exits with an error

    @classmethod
    def install(cls) -> "GracefulStop":
        self = cls()
        self.arm()
        return self

    def arm(self) -> None:
        """(Re)install the handlers: hivemind's averagers set SIGINT to SIG_IGN in this process when they start."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous = signal.signal(sig, self._handle)
                self._previous.setdefault(sig, previous)

    def _handle(self, signum, frame):
        if os.getpid() != self._pid:  # a forked child (the DHT, an averager): the signal's default action, as before
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.requested or self.failure:  # a second signal, or fail()'s own: interrupt here
            if not self.requested:
                self._request("failure")
            raise KeyboardInterrupt
        self._request(signal.Signals(signum).name)

    def _request(self, name: str) -> None:
        self.requested = True
        self.signal_name = name
        self._hard_at = time.monotonic() + STOP_HARD
        self._timers = [threading.Timer(STOP_GRACE, self._interrupt),
                        threading.Timer(STOP_HARD, self._force)]  # fmt: skip
        for timer in self._timers:
            timer.daemon = True
            timer.start()

    def _interrupt(self) -> None:
        """Interrupt the main thread, even inside a blocking wait (an averaging round). A real signal sent to the main
        thread makes its wait return (EINTR) and our handler raise KeyboardInterrupt there; _thread.interrupt_main()
        only sets a flag that a blocked wait never looks at (a peer in a round with a frozen groupmate waited on for
        the round's 30 s, and the watchdog then killed it)."""
        if self._leaving:
            return
        if signal.getsignal(signal.SIGTERM) == self._handle:
            signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
        else:  # our handlers are not installed (not the main thread): the flag is all there is
            _thread.interrupt_main()

    def fail(self, why: str) -> None:
        """A process the peer cannot go on without died: stop as on a signal, and interrupt the main thread now, as
        a second signal would. It may be waiting for that process for ever: an averager killed by the kernel's
        out-of-memory killer in the middle of a state round held the lock on the averaged tensors, and the peer's
        next read of them waited on it (bench_averaging --as-7b: one peer hung, the others stopped)."""
        if self.failure or self._leaving:
            return
        self.failure = why
        if signal.getsignal(signal.SIGTERM) == self._handle:
            # our handler requests the stop and raises in the main thread. Requested here first, the training loop
            # could see `requested`, end and begin to leave before the signal arrived, and the KeyboardInterrupt
            # then cut the shutdown short: exit 130, no "stopped", no error line (1 full-suite run, 2026-12-05)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
        elif not self.requested:  # no handler of ours (not the main thread): the loop sees `requested` after its step
            self._request("failure")

    def _force(self) -> None:
        where = f" while {self.step}" if self.step else ""
        print(f"error: the peer did not stop within {STOP_HARD:.1f} s{where}; its processes were killed and the "
              f"adapter may not have been saved (exit code {EXIT_FORCED})", file=sys.stderr, flush=True)
        kill_children_and_exit()

    def leaving(self) -> None:
        """The shutdown has begun: the grace interrupt would only cut it short (each step of it is bounded by
        budget()); the forced exit stays armed, and a second signal from the user still interrupts at once."""
        self._leaving = True
        if self._timers:
            self._timers[0].cancel()

    def budget(self, seconds: float) -> float:
        """``seconds`` for one step of the shutdown; once a stop was requested, no more than leaves MARGIN before
        the forced exit (at least 0.1 s)."""
        if not self.requested:
            return seconds
        return max(0.1, min(seconds, self._hard_at - time.monotonic() - MARGIN))

    def uninstall(self) -> None:
        """Restore the previous handlers and cancel the watchdogs: a caller in the same process (a notebook, a test)
        must not get a KeyboardInterrupt or an exit seconds after a clean stop."""
        for timer in self._timers:
            timer.cancel()
        if threading.current_thread() is threading.main_thread():
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)


def watch(stop: GracefulStop, processes: dict, every: float = 0.5) -> threading.Thread:
    """A daemon thread that calls ``stop.fail`` when one of ``processes`` (what each is -> a multiprocessing
    Process of this one, or a thread with a ``failure``) is no longer alive before the peer began to leave; it ends
    when the peer leaves."""

    def run() -> None:
        while not stop._leaving and not stop.failure:
            for name, process in processes.items():
                if not process.is_alive() and not stop._leaving:
                    kind = "thread" if isinstance(process, threading.Thread) else "process"
                    how = getattr(process, "failure", None) or how_it_ended(getattr(process, "exitcode", None))
                    stop.fail(f"this peer's {name} {kind} died ({how}), so the peer stopped; start it again to "
                              f"rejoin the run (it resumes from its saved adapter)")
                    return
            time.sleep(every)

    thread = threading.Thread(target=run, name="watch-processes", daemon=True)
    thread.start()
    return thread


def how_it_ended(exitcode) -> str:
    if exitcode is None:
        return "no exit status"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"killed by {name}" + (": the system's out-of-memory killer sends it" if name == "SIGKILL" else "")
    return f"exit code {exitcode}"


def kill_children_and_exit(code: int = EXIT_FORCED) -> None:
    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.Error:
            pass
    os._exit(code)
