"""hivemind's log lines: hidden unless --verbose, in one place for every entry point."""

from __future__ import annotations

import logging


def quiet_hivemind() -> None:
    """hivemind's errors only, and not a round that found no group: an expected outcome that the epoch event reports
    (group 0, rounds_failed), which hivemind logs as an ERROR with a traceback. Averager processes, forked later,
    inherit this."""
    logging.getLogger("hivemind").setLevel(logging.ERROR)
    averager = logging.getLogger("hivemind.averaging.averager")
    if _no_group_is_no_error not in averager.filters:  # main() runs more than once in the tests' process
        averager.addFilter(_no_group_is_no_error)


def _no_group_is_no_error(record: logging.LogRecord) -> bool:
    return "could not find a group" not in record.getMessage()
