import signal

from atlas_swarm.stopping import GracefulStop


def test_uninstall_cancels_the_watchdogs_and_restores_handlers():
    # Prepare
    before = signal.getsignal(signal.SIGTERM)
    stop = GracefulStop.install()
    # Execute: a signal arms the watchdogs, then the run stops cleanly
    stop._handle(signal.SIGTERM, None)
    stop.uninstall()
    # Assert
    assert stop.requested and stop.signal_name == "SIGTERM"
    assert all(timer.finished.is_set() for timer in stop._timers)
    assert signal.getsignal(signal.SIGTERM) is before


HUNG = """
import os, signal, time
import atlas_swarm.stopping as stopping
stopping.STOP_GRACE, stopping.STOP_HARD = 0.2, 0.8
stop = stopping.GracefulStop.install()
os.kill(os.getpid(), signal.SIGTERM)
deadline = time.monotonic() + 30
while time.monotonic() < deadline:  # a shutdown that hangs, and swallows the watchdog's interrupt as hivemind does
    try:
        time.sleep(0.05)
    except KeyboardInterrupt:
        pass
"""


def test_the_watchdog_exit_code_tells_a_forced_exit_from_a_clean_one():
    import subprocess
    import sys

    from atlas_swarm.stopping import EXIT_FORCED

    # Execute
    forced = subprocess.run([sys.executable, "-c", HUNG], timeout=30)
    clean = subprocess.run([sys.executable, "-c", HUNG.replace("deadline = time.monotonic() + 30", "stop.uninstall()"
                                                                "; deadline = 0")], timeout=30)  # fmt: skip
    # Assert
    assert forced.returncode == EXIT_FORCED != 0
    assert clean.returncode == 0
