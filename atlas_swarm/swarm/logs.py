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
                        ("hivemind.optim.optimizer", _no_group_is_no_error), ("hivemind.dht.dht", _other_end_gone),
                        ("hivemind.utils.asyncio", _other_end_gone), ("hivemind.p2p.p2p_daemon", _p2pd_stopping)):
        logger = logging.getLogger(name)
        if noise not in logger.filters:  # main() runs more than once in the tests' process
            logger.addFilter(noise)


def _no_group_is_no_error(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return "could not find a group" not in message and "a pair has no majority" not in message


def _other_end_gone(record: logging.LogRecord) -> bool:
    """A traceback for a call whose other end is gone, an expected outcome. The DHT process logs one when a request's
    reply channel is gone: the asking process exited (or shut the DHT down) while a call was in flight, as when a peer
    is stopped in the middle of an averaging round. A call carries its reply pipe, which the DHT process fetches from
    the asker's process as it reads the call: when that process has just exited (most likely an averager process, as
    the peer leaves), the fetch fails with ECONNRESET (seen on 16 peers' stderr in a day's test runs, and it failed
    test_compression's "no traceback" once). hivemind's matchmaking logs one (utils/asyncio.py, await_cancelled) when
    it cancels a join request that had already failed: a leader SIGKILLed while we asked to join it
    (ConnectionResetError; a survivor's stderr in a full run). The round fails as it should; its epoch event says so."""
    error = record.exc_info[1] if record.exc_info else None
    return not isinstance(error, (FileNotFoundError, ConnectionError, EOFError))


def _p2pd_stopping(record: logging.LogRecord) -> bool:
    """p2pd's accept loop reports its own listener closing as an error when the daemon stops ("error accepting
    connection: accept unix ...sock: use of closed network connection"), and hivemind relays p2pd's errors: an
    [ERROR] line on the terminal of a peer stopped with Ctrl-C (11 of 13 runs of the Ctrl-C-in-a-terminal test)."""
    return "use of closed network connection" not in record.getMessage()
