"""Watching swarms: what a bootstrap node (or `python -m atlas_swarm.monitor`) serves to its maintainer.

    state.Monitor       polls the DHT for every announced run: peers, epoch, progress, loss, rounds, receipts;
                        keeps a bounded history; counts rejected and forged records
    metrics             the Prometheus text exposition of a snapshot (atlas_* names, labels per run and peer)
    http.serve          GET /health, /metrics, /api/state, / (the dashboard, self-contained: works offline)
    service             the bootstrap node / monitor process: flags, DHT node (relay), monitor, keeper, HTTP
"""

from atlas_swarm.monitor.state import Monitor

__all__ = ["Monitor"]
