"""`python -m atlas_swarm.bootstrap`: a bootstrap node (DHT entry point, relay, monitor); see monitor/service.py and
bootstrap/RUNBOOK.md."""

import sys

from atlas_swarm.monitor.service import main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
