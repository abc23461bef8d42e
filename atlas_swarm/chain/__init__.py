"""The chain side: the staking contract's Python client, wallets, the persistent proof outbox and a local anvil.

    client.StakingClient   deploy / stake / register / create run / submit proofs / claim / slash / reputation
    outbox.Outbox          signed proofs on disk, posted exactly once (ProofPoster: the background thread)
    wallet                 encrypted keystore files
    anvil.Anvil            a local chain for the demo and tests
    __main__               the operator CLI: python -m atlas_swarm.chain ...
"""

from atlas_swarm.chain.client import ETHER, StakingClient, decode_revert
from atlas_swarm.chain.outbox import Outbox, ProofPoster

__all__ = ["ETHER", "Outbox", "ProofPoster", "StakingClient", "decode_revert"]
