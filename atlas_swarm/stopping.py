"""How a peer stops: SIGINT/SIGTERM ask the training loop to stop after the current step; a blocking call (an
averaging round, joining, fetching the spec) is interrupted after STOP_GRACE seconds; if shutdown still hangs, the
peer's children are killed and it exits with EXIT_FORCED at STOP_HARD (the user was promised an exit within 10 s).
A second signal interrupts at once."""

from __future__ import annotations

import _thread
import os
import signal
import threading

import psutil

STOP_GRACE = 6.0
STOP_HARD = 9.5
EXIT_FORCED = 3  # the watchdog ended a hung shutdown: the adapter may not have been saved (a clean stop exits 0)


class GracefulStop:
    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._previous = {}
        self._timers: list[threading.Timer] = []

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
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        self._timers = [threading.Timer(STOP_GRACE, _thread.interrupt_main),
                        threading.Timer(STOP_HARD, kill_children_and_exit)]  # fmt: skip
        for timer in self._timers:
            timer.daemon = True
            timer.start()

    def uninstall(self) -> None:
        """Restore the previous handlers and cancel the watchdogs: a caller in the same process (a notebook, a test)
        must not get a KeyboardInterrupt or an exit seconds after a clean stop."""
        for timer in self._timers:
            timer.cancel()
        if threading.current_thread() is threading.main_thread():
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)


def kill_children_and_exit(code: int = EXIT_FORCED) -> None:
    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.Error:
            pass
    os._exit(code)
