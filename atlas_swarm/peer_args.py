"""The flags of `python -m atlas_swarm.peer` (README "Using it") and the PeerConfig they make."""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from atlas_swarm.config import ChainConfig, PeerConfig
from atlas_swarm.errors import ConfigError

DESCRIPTION = "join (or start) a swarm and fine-tune its shared LoRA adapter on local data."


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m atlas_swarm.peer", description=DESCRIPTION,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--run-spec", help="TOML run spec: starts that run (first peer) or checks it against --run")
    p.add_argument("--run", dest="run_id", help="run id to join (printed by the first peer)")
    p.add_argument("--initial-peers", nargs="*", default=[], help="multiaddrs of any peers already in the swarm")
    p.add_argument("--data", help="local data: .jsonl/.csv/.txt, a datasets.save_to_disk folder, or builtin:NAME")
    p.add_argument("--batch-size", default="auto", help="samples per step, or 'auto' (largest micro-batch that fits)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--precision", default="auto", help="auto (bf16 if the GPU has it, else fp16; fp32 on CPU), fp32, "
                   "bf16 (on a CPU too: torch's CPU autocast) or fp16 (GPU)")  # fmt: skip
    p.add_argument("--quantize", default="none", help="none, nf4 or int8: load the base quantized (bitsandbytes, CUDA; "
                   "QLoRA's NF4 with double quantization). The adapter stays fp32, so it averages with full-precision "
                   "peers")  # fmt: skip
    p.add_argument("--gradient-checkpointing", default="auto", help="auto (on with --quantize, or when the GPU fits a "
                   "micro-batch below 4 without it), on or off: recompute activations to save memory")  # fmt: skip
    p.add_argument("--max-memory", type=float, help="GB of GPU memory this peer may use [default: the whole card]")
    p.add_argument("--identity", help="libp2p key file (created if missing) [default: OUT/identity.key]")
    p.add_argument("--out", default=PeerConfig.out, help="folder for the identity, checkpoints and adapter")
    p.add_argument("--base-model", help="local folder holding the spec's base model (offline copies)")
    p.add_argument("--host-maddrs", nargs="*", default=["/ip4/0.0.0.0/tcp/0"], help="addresses to listen on")
    p.add_argument("--announce-maddrs", nargs="*", default=[], help="public addresses to advertise (NAT/port forward)")
    p.add_argument("--client-mode", action="store_true", help="behind a firewall: connect out only")
    p.add_argument("--auto-relay", action="store_true", help=argparse.SUPPRESS)  # removed: config_from_args says why
    p.add_argument("--max-epochs", type=int, help="stop when the swarm reaches this epoch")
    p.add_argument("--max-steps", type=int, help="stop after this many local steps")
    p.add_argument("--save-every", type=int, default=1, help="write the adapter every N epochs (and at exit)")
    p.add_argument("--log-format", default="rich", help="rich (live bar), plain (lines) or json (one object per event)")
    p.add_argument("--threads", type=int, help="torch CPU threads [default: torch's]")
    p.add_argument("--wait-for-peers", type=int, default=1, help="start training once N peers are in the run")
    p.add_argument("--join-timeout", type=float, default=30.0, help="seconds to wait for peers and the run spec")
    p.add_argument("--seed", type=int, default=0, help="seed of this peer's data order")
    p.add_argument("--chain-rpc", help="co-sign and settle receipts of averaged rounds on this EVM chain (RPC URL)")
    p.add_argument("--staking-contract", help="the AtlasStaking contract's address")
    p.add_argument("--wallet", help="encrypted keystore JSON that signs receipts (never a raw key on the command line)")
    p.add_argument("--wallet-password-file", help="file with the keystore password [default: $ATLAS_WALLET_PASSWORD]")
    p.add_argument("--receipt-batch", type=int, default=4, help="epochs' receipts per transaction (saves gas)")
    p.add_argument("--receipt-max-wait", type=float, default=120.0, help="seconds a receipt waits at most for a batch")
    p.add_argument("--publish-every", type=int, default=5, help="publish the swarm's adapter (content-addressed, "
                   "served to the swarm) every N epochs when this peer is elected; 0: never")  # fmt: skip
    p.add_argument("--store", help="folder of the embedded block store [default: OUT/store]")
    p.add_argument("--ipfs-api", help="use this IPFS daemon's RPC (e.g. http://127.0.0.1:5001) as the store")
    p.add_argument("--verbose", action="store_true", help="show hivemind's own log lines")
    return p.parse_args(argv)


def config_from_args(a: argparse.Namespace) -> PeerConfig:
    if a.auto_relay:
        raise ConfigError(
            "--auto-relay was removed: in the network tests a peer behind NAT that asked for a relay waited about 3 "
            "minutes for one (hivemind's p2pd wants 4 relay candidates first), was not given a slot, and meanwhile, "
            "unreachable but announced, kept the other peers from forming groups. Behind NAT use --client-mode (it "
            "averages with every reachable peer); README, \"Running on real networks\".")
    if a.batch_size == "auto":
        batch_size = None
    else:
        try:
            batch_size = int(a.batch_size)
        except ValueError:
            raise ConfigError(f"--batch-size {a.batch_size!r} is not an integer or 'auto'.") from None
    return PeerConfig(
        run_spec=a.run_spec, run_id=a.run_id, initial_peers=tuple(a.initial_peers), data=a.data, batch_size=batch_size,
        device=a.device, precision=a.precision, quantize=a.quantize, gradient_checkpointing=a.gradient_checkpointing,
        max_memory=a.max_memory, identity=a.identity, out=a.out, base_model=a.base_model, host_maddrs=tuple(a.host_maddrs),
        announce_maddrs=tuple(a.announce_maddrs), client_mode=a.client_mode, max_epochs=a.max_epochs,
        max_steps=a.max_steps, save_every=a.save_every, log_format=a.log_format, threads=a.threads,
        join_timeout=a.join_timeout, wait_for_peers=a.wait_for_peers, seed=a.seed,
        chain=ChainConfig.from_flags(a.chain_rpc, a.staking_contract, a.wallet, a.wallet_password_file,
                                     a.receipt_batch, a.receipt_max_wait),
        publish_every=a.publish_every, store=a.store, ipfs_api=a.ipfs_api, verbose=a.verbose,
    )  # fmt: skip
