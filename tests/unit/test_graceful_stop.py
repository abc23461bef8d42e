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
