"""What every entry point (`python -m atlas_swarm.peer | chain | bootstrap | monitor`) does around its work: hivemind
quiet unless --verbose, a user's mistake as one line ``error: ...`` and exit 2 (never a traceback), Ctrl-C exit 130."""

from __future__ import annotations

import sys
import warnings
from typing import Callable, Optional

from atlas_swarm.errors import AtlasError
from atlas_swarm.swarm.logs import quiet_hivemind


def run_cli(body: Callable[[], Optional[int]], verbose: bool = False,
            report: Optional[Callable[[AtlasError], None]] = None) -> int:  # fmt: skip
    """``body()``'s exit code (None: 0). ``report``: how to show an error (default: stderr)."""
    if not verbose:
        quiet_hivemind()
        warnings.filterwarnings("ignore", category=FutureWarning)  # torch/transformers deprecations, not the user's
    try:
        return body() or 0
    except AtlasError as e:
        if report is not None:
            report(e)
        else:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
