"""The only package that imports hivemind's DHT and optimizer: join a swarm, publish/read run records, train together."""

from atlas_swarm.swarm.logs import quiet_hivemind
from atlas_swarm.swarm.node import Swarm
from atlas_swarm.swarm.optimizer import EpochDone, SwarmOptimizer, make_optimizer
from atlas_swarm.swarm.records import PeerStatus

__all__ = ["Swarm", "EpochDone", "SwarmOptimizer", "make_optimizer", "PeerStatus", "quiet_hivemind"]
