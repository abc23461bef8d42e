"""Local services for the demo, the tests and the benchmarks; nothing a user's peer runs imports this package.

    anvil.Anvil           a local EVM chain (Foundry's anvil from npm) with funded dev keys
    ipfs.IpfsDaemon       a local js-ipfs RPC daemon (npm), offline, on loopback
    tiny_model            a tiny random Llama + a BPE tokenizer trained on local text (offline models of a real shape)
"""
