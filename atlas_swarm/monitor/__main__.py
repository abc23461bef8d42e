"""`python -m atlas_swarm.monitor --initial-peers MADDR [--http 127.0.0.1:8080]`: the bootstrap node's monitor alone
(a throwaway identity unless --identity is given, no relay service)."""

import sys

from atlas_swarm.monitor.service import main

if __name__ == "__main__":
    sys.exit(main(monitor_only=True))
