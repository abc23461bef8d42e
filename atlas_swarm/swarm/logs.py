"""hivemind's log lines: hidden unless --verbose, in one place for every entry point."""

from __future__ import annotations

import logging


def quiet_hivemind() -> None:
    """hivemind's errors only, and not a round that found no group: an expected outcome that the epoch event reports
    (group 0, rounds_failed), which hivemind logs as an ERROR with a traceback, from its averager and from its
    optimizer (a peer that reloads state "tags along" in the round it had scheduled: seen on a peer's terminal in the
    adversarial tests). Averager processes, forked later, inherit this."""
    logging.getLogger("hivemind").setLevel(logging.ERROR)
    for name, noise in (("hivemind.averaging.averager", _no_group_is_no_error),
                        ("hivemind.optim.optimizer", _no_group_is_no_error), ("hivemind.dht.dht", _asker_gone),
                        ("hivemind.utils.asyncio", _leader_gone)):
        logger = logging.getLogger(name)
        if noise not in logger.filters:  # main() runs more than once in the tests' process
            logger.addFilter(noise)


def _no_group_is_no_error(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return "could not find a group" not in message and "a pair has no majority" not in message


def _asker_gone(record: logging.LogRecord) -> bool:
    """The DHT process logs a traceback when a request's reply channel is gone: the asking process exited (or shut
    the DHT down) while a call was in flight, as when a peer is stopped in the middle of an averaging round. A call
    carries its reply pipe, which the DHT process fetches from the asker's process as it reads the call: when that
    process has just exited (most likely an averager process, as the peer leaves), the fetch fails with ECONNRESET (seen on 16
    peers' stderr in a day's test runs, and it failed test_compression's "no traceback" once)."""
    error = record.exc_info[1] if record.exc_info else None
    return not isinstance(error, (FileNotFoundError, ConnectionError, EOFError))


def _leader_gone(record: logging.LogRecord) -> bool:
    """hivemind's matchmaking cancels its join requests when it stops looking, and logs a traceback for a request that
    had already failed: a leader that died while we asked to join it (SIGKILLed mid-round) is ConnectionResetError
    there. The round fails as it should and its epoch event says so (seen on a survivor's stderr in a full run)."""
    error = record.exc_info[1] if record.exc_info else None
    return not isinstance(error, ConnectionError)
