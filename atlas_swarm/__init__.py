"""atlas-swarm: fine-tune one LoRA adapter together over a peer-to-peer Hivemind swarm, with no central server.

Map of the package (one epoch, read top to bottom — see peer.run):

    peer.py       `python -m atlas_swarm.peer`: CLI → PeerConfig → run(), the whole pipeline in order
    config.py     RunSpec (shared by a run's peers; its hash is the run id) and PeerConfig (one peer's settings)
    errors.py     the exception tree; every user mistake is an AtlasError with the fix in its message
    identity.py   the persistent libp2p RSA key: fixes the PeerID and signs this peer's DHT records
    swarm/        the only hivemind user: DHT join, signed run records (spec, peer status), SwarmOptimizer
    model/        base model + PEFT LoRA: load (hub name or local folder), save as a PEFT folder, canonical hashes
    train/        local data and steps, pure torch: batching, gradient accumulation, autocast, evaluation
    storage/      content addressing: IPFS CIDs computed locally, embedded + IPFS RPC stores, verified fetch, publishing
    notebook/     the trainer's API, ``from atlas_swarm import Run``: launch, watch, contribute, fetch, evaluate, fund
    chain/ proofs/  the staking contract's client, EIP-712 contribution proofs; monitor/ + bootstrap.py: the swarm's
                  long-lived entry points and dashboard
    ui.py         progress display: rich live bar, plain lines, or JSON events
    specs/        run specs shipped with the package (the demo's)
"""

__version__ = "0.1.0"
__all__ = ["Run"]


def __getattr__(name: str):
    if name == "Run":  # imported on first use: `import atlas_swarm` stays free of torch and hivemind
        from atlas_swarm.notebook import Run

        return Run
    raise AttributeError(f"module 'atlas_swarm' has no attribute {name!r}")
