"""The chain side: the staking contract's Python client, wallets and the persistent receipt outbox.

    client.StakingClient     deploy / stake / register / create run / settle receipts / record checkpoints / claim /
                             slash / reputation
    receipts.ReceiptBox      co-signed receipts on disk, gathered and settled once (ReceiptPoster: the background
                             thread)
    session.ChainSession     a training peer's chain side: checks at start, a receipt per round, checkpoint votes
    wallet                   encrypted keystore files
    __main__                 the operator CLI: python -m atlas_swarm.chain ...
"""

from atlas_swarm.chain.client import ETHER, StakingClient, decode_revert
from atlas_swarm.chain.receipts import ReceiptBox, ReceiptPoster

__all__ = ["ETHER", "ReceiptBox", "ReceiptPoster", "StakingClient", "decode_revert"]
