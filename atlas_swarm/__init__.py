"""atlas-swarm: fine-tune one LoRA adapter together over a peer-to-peer Hivemind swarm, with no central server.

Map of the package, bottom layer first (each imports only what is above it; tests/unit/test_layers.py checks):

    errors.py     the exception tree; every user mistake is an AtlasError with the fix in its message
    majority.py   the one rule untrusting peers agree by: most votes win, ties go to the smallest value
    config.py     RunSpec (shared by a run's peers; its hash is the run id) and PeerConfig (one peer's settings)
    identity.py   the persistent libp2p RSA key: fixes the PeerID and signs this peer's DHT records
    proofs/       what a peer signs: the group's receipt and checkpoint vote (EIP-712), the PeerID binding
    model/        base model + PEFT LoRA: load (hub name or local folder), save as a PEFT folder, canonical hashes
    train/        local data and steps, pure torch: batching, gradient accumulation, autocast, evaluation
    storage/      content addressing: IPFS CIDs computed locally, embedded + IPFS RPC stores, verified DAG walks
    devnet/       local services for the demo, tests and benchmarks (anvil, js-ipfs, the tiny model)
    swarm/        the only hivemind user: DHT join, signed run records, SwarmOptimizer, scheduling maths, blocks
    cli.py        every entry point's wrapper: quiet hivemind, `error: ...` exit 2, Ctrl-C 130
    checkpoints/  publishing the swarm's adapter, choosing the one a run vouches for, keeping copies
    chain/        the staking contract's client, wallets, receipt outbox + poster, the operator CLI
    ui.py, stopping.py, launch.py   the peer's display; how it stops; starting peer processes
    monitor/      the bootstrap node / monitor service: DHT poll, /metrics, dashboard
    notebook/     the trainer's API, ``from atlas_swarm import Run``: launch, watch, contribute, fetch, evaluate, fund
    peer.py       `python -m atlas_swarm.peer`: CLI -> PeerConfig -> run(): join, open services, load, train, leave
    bootstrap.py  `python -m atlas_swarm.bootstrap`
    specs/        run specs shipped with the package (the demo's)
"""

__version__ = "0.1.0"
__all__ = ["Run"]


def __getattr__(name: str):
    if name == "Run":  # imported on first use: `import atlas_swarm` stays free of torch and hivemind
        from atlas_swarm.notebook import Run

        return Run
    raise AttributeError(f"module 'atlas_swarm' has no attribute {name!r}")
