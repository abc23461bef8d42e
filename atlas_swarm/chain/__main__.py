"""`python -m atlas_swarm.chain`: the operator CLI for the staking contract.

    new-wallet PATH [--import-key-file F] create an encrypted keystore (a new key, or one read from a file)
    deploy                               deploy AtlasStaking (prints its address)
    stake ETH | unstake ETH | withdraw   manage your stake (unstaked ether waits out the unbonding period)
    register --identity KEY              bind your libp2p PeerID to your wallet's address
    create-run --run-spec FILE ...       open a run with a funded reward budget (trainers; the spec names you)
    fund-run RUN_ID ETH                  add to your run's budget (someone else's: --trainer ADDR --not-mine)
    close-run RUN_ID | reclaim-budget RUN_ID   start closing (receipts are paid one more challenge window), then
                                         take back what is left
    status [--address A] [--run RUN_ID [--trainer ADDR]]  stake, reputation, rewards; a run's escrow
    peers --initial-peers M --run ID     a live run's peers: wallet bound both ways (DHT + chain), stake, rewards
    claim                                pay out rewards past their challenge window

Common flags: --rpc URL (or $ATLAS_CHAIN_RPC), --contract ADDR (or $ATLAS_STAKING_CONTRACT), --wallet KEYFILE,
--wallet-password-file FILE (or $ATLAS_WALLET_PASSWORD).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from decimal import Decimal
from pathlib import Path
from typing import Optional, Sequence

from atlas_swarm.chain.client import ETHER, StakingClient, eth
from atlas_swarm.chain.wallet import create_wallet, load_wallet, read_password
from atlas_swarm.cli import run_cli
from atlas_swarm.config import RunSpec
from atlas_swarm.errors import ConfigError
from atlas_swarm.identity import Identity


def fmt_eth(wei: int) -> str:
    return f"{Decimal(wei) / ETHER:f} ETH"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--rpc", default=os.environ.get("ATLAS_CHAIN_RPC", "http://127.0.0.1:8545"),
                        help="chain RPC URL [$ATLAS_CHAIN_RPC]")  # fmt: skip
    common.add_argument("--contract", default=os.environ.get("ATLAS_STAKING_CONTRACT"),
                        help="AtlasStaking address [$ATLAS_STAKING_CONTRACT]")  # fmt: skip
    common.add_argument("--wallet", help="encrypted keystore JSON of the account that signs")
    common.add_argument("--wallet-password-file", help="file holding the keystore password [$ATLAS_WALLET_PASSWORD]")
    p = argparse.ArgumentParser(prog="python -m atlas_swarm.chain", description="Operate the atlas-swarm staking "
                                "contract.", formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n")[1])  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("new-wallet", parents=[common], help="create an encrypted keystore")
    s.add_argument("path")
    s.add_argument("--import-key-file", help="encrypt this existing private key (hex, in a file) instead of a new one")
    s = sub.add_parser("deploy", parents=[common], help="deploy AtlasStaking")
    s.add_argument("--unbonding", type=int, default=7 * 86400, help="unbonding period, seconds")
    s.add_argument("--challenge-window", type=int, default=86400, help="seconds before rewards can be claimed")
    s.add_argument("--slash-bps", type=int, default=5000, help="share of stake slashed per equivocation (bps)")
    s.add_argument("--bounty-bps", type=int, default=2000, help="share of the slash paid to the reporter (bps)")
    for name, what in (("stake", "ether to stake"), ("unstake", "ether to start unbonding")):
        s = sub.add_parser(name, parents=[common], help=what)
        s.add_argument("amount", help="ether, e.g. 1.5")
    sub.add_parser("withdraw", parents=[common], help="withdraw stake whose unbonding period is over")
    s = sub.add_parser("register", parents=[common], help="bind your PeerID to your wallet")
    s.add_argument("--identity", required=True, help="the peer's libp2p key file (its --identity / OUT/identity.key)")
    s = sub.add_parser("create-run", parents=[common], help="open a run with a reward budget")
    s.add_argument("--run-spec", required=True, help="the run's TOML spec (the run id and spec hash come from it)")
    s.add_argument("--reward-per-sample", required=True, help="ether per verified sample, e.g. 0.000001")
    s.add_argument("--budget", required=True, help="ether to escrow")
    s.add_argument("--min-stake", default="0", help="ether of stake a peer needs for its signature and pay to count")
    s.add_argument("--max-samples-per-epoch", type=int, help="per peer [default: 2 x the spec's target batch size]")
    s.add_argument("--samples-per-epoch", type=int,
                   help="all peers of one epoch together [default: 2 x the spec's target batch size]")
    s.add_argument("--min-epoch-seconds", type=int, default=1,
                   help="epoch e is paid from creation + e x this on: what colluders can claim ahead [default: 1]")
    s = sub.add_parser("fund-run", parents=[common], help="add ether to your run's budget")
    s.add_argument("run_id")
    s.add_argument("amount")
    s.add_argument("--trainer", help="the run's trainer, if not you: what is left at the close goes back to it")
    s.add_argument("--not-mine", action="store_true", help="yes, fund a run whose trainer is someone else")
    s = sub.add_parser("close-run", parents=[common], help="start closing your run (receipts paid one more window)")
    s.add_argument("run_id")
    s = sub.add_parser("reclaim-budget", parents=[common], help="after the closing window, refund what is left")
    s.add_argument("run_id")
    s = sub.add_parser("status", parents=[common], help="stake, reputation and rewards")
    s.add_argument("--address", help="whose status [default: the wallet's]")
    s.add_argument("--run", help="also show this run's escrow")
    s.add_argument("--trainer", help="the run's trainer [default: the wallet's address]")
    sub.add_parser("claim", parents=[common], help="pay out claimable rewards")
    s = sub.add_parser("peers", parents=[common], help="a live run's peers, their verified wallets and rewards")
    s.add_argument("--initial-peers", nargs="+", required=True, help="multiaddr of any peer of the run")
    s.add_argument("--run", required=True, help="run id")
    return p.parse_args(argv)


def _client(a: argparse.Namespace, need_wallet: bool = True) -> StakingClient:
    account = _account(a) if (need_wallet or a.wallet) else None
    w3 = StakingClient.web3(a.rpc)
    if not a.contract:
        raise ConfigError("Which contract? Pass --contract ADDR or set $ATLAS_STAKING_CONTRACT.")
    return StakingClient.connect(w3, a.contract, account)


def _account(a: argparse.Namespace):
    if not a.wallet:
        raise ConfigError("This command signs a transaction: pass --wallet KEYFILE (create one with new-wallet).")
    return load_wallet(a.wallet, read_password(a.wallet_password_file))


def run(a: argparse.Namespace) -> None:
    cmd = a.command
    if cmd == "new-wallet":
        key = None
        if a.import_key_file:
            try:
                key = bytes.fromhex(open(a.import_key_file).read().strip().removeprefix("0x"))
            except (OSError, ValueError) as e:
                raise ConfigError(f"--import-key-file {a.import_key_file!r}: not a readable hex private key ({e}).")
        account = create_wallet(a.path, read_password(a.wallet_password_file, "New wallet password: "), key)
        print(f"created {a.path} for address {account.address}")
        return
    if cmd == "deploy":
        c = StakingClient.deploy(StakingClient.web3(a.rpc), _account(a), a.unbonding, a.challenge_window,
                                 a.slash_bps, a.bounty_bps)  # fmt: skip
        print(f"AtlasStaking deployed at {c.address} on chain {c.chain_id}")
        print(f"  export ATLAS_STAKING_CONTRACT={c.address}")
        return
    c = _client(a, need_wallet=cmd not in ("status", "peers"))
    if cmd == "peers":
        _peers(c, a)
        return
    if cmd == "stake":
        r = c.stake(eth(a.amount))
        print(f"staked {a.amount} ETH (tx {r.tx_hash}); active stake {fmt_eth(c.reputation(c.account.address)['stake'])}")
    elif cmd == "unstake":
        r = c.request_unstake(eth(a.amount))
        rep = c.reputation(c.account.address)
        print(f"unbonding {fmt_eth(rep['unbonding'])}, withdrawable after unix time {rep['unbonding_ready_at']} "
              f"(tx {r.tx_hash})")  # fmt: skip
    elif cmd == "withdraw":
        before = c.reputation(c.account.address)["unbonding"]
        r = c.withdraw()
        print(f"withdrew {fmt_eth(before)} (tx {r.tx_hash})")
    elif cmd == "register":
        if not os.path.isfile(a.identity):  # a typo must not bind the wallet to a brand-new key nobody uses
            raise ConfigError(f"--identity {a.identity!r} does not exist: pass the peer's key file (OUT/identity.key).")
        peer_id = Identity.load_or_create(a.identity).peer_id
        if c.binds(c.account.address, peer_id):
            print(f"PeerID {peer_id} is already bound to {c.account.address}")
            return
        r = c.register_peer(peer_id)
        print(f"bound PeerID {peer_id} to {c.account.address} (tx {r.tx_hash})")
    elif cmd == "create-run":
        spec = RunSpec.from_toml(a.run_spec)
        if spec.trainer != c.account.address.lower():
            raise ConfigError(f"The spec {a.run_spec} names trainer {spec.trainer or '(none)'}, not your wallet "
                              f"{c.account.address}: add `trainer = \"{c.account.address}\"` to it (peers read the "
                              f"trainer from the spec to find the run on chain; it changes the run id).")
        max_samples = a.max_samples_per_epoch or 2 * spec.averaging.target_batch_size
        per_epoch = a.samples_per_epoch or 2 * spec.averaging.target_batch_size
        if a.min_epoch_seconds < 1 or per_epoch < 1:
            raise ConfigError("--min-epoch-seconds and --samples-per-epoch must be at least 1.")
        r = c.create_run(spec.run_id, spec.spec_hash, eth(a.reward_per_sample), eth(a.min_stake), max_samples,
                         eth(a.budget), per_epoch, a.min_epoch_seconds)  # fmt: skip
        print(f"run {spec.run_id} open with {a.budget} ETH at {a.reward_per_sample} ETH/sample, min stake "
              f"{a.min_stake} ETH, at most {max_samples} samples per peer and {per_epoch} per epoch, epochs at "
              f"least {a.min_epoch_seconds} s apart (tx {r.tx_hash})")  # fmt: skip
    elif cmd == "fund-run":
        if a.trainer and a.trainer.lower() != c.account.address.lower() and not a.not_mine:
            raise ConfigError(f"Run {a.run_id} of trainer {a.trainer} is not yours: what is left at its close goes "
                              f"back to {a.trainer}, not to you. Add --not-mine if that is what you want.")
        run_ = c.run_of(a.run_id, a.trainer)
        if c.get_run(run_) is None:
            raise ConfigError(f"No run {a.run_id} of trainer {a.trainer or c.account.address} on {c.address}.")
        c.fund_run(run_, eth(a.amount))
        print(f"run {a.run_id} budget now {fmt_eth(c.get_run(run_)['budget'])}")
    elif cmd == "close-run":
        run_ = c.run_of(a.run_id)
        c.close_run(run_)
        print(f"run {a.run_id} closing: receipts are paid until unix time {c.get_run(run_)['closes_at']}; then "
              f"`reclaim-budget {a.run_id}` refunds what is left")  # fmt: skip
    elif cmd == "reclaim-budget":
        run_ = c.run_of(a.run_id)
        before = c.get_run(run_)
        c.reclaim_budget(run_)
        print(f"run {a.run_id} closed; refunded {fmt_eth(before['budget'] if before else 0)}")
    elif cmd == "claim":
        rep = c.reputation(c.account.address)
        r = c.claim()
        print(f"claimed {fmt_eth(rep['claimable'])} (tx {r.tx_hash})")
    elif cmd == "status":
        who = a.address or (c.account.address if c.account else None)
        if who is None and not a.run:
            raise ConfigError("status of whom? Pass --address ADDR, --wallet KEYFILE or --run RUN_ID.")
        print(f"chain {c.chain_id}, contract {c.address}")
        if who:
            rep = c.reputation(who)
            bound = "not bound" if int.from_bytes(rep["peer_id_hash"], "big") == 0 else "0x" + rep["peer_id_hash"].hex()
            print(f"{who}\n  balance           {fmt_eth(c.balance(who))}\n  stake             {fmt_eth(rep['stake'])}"
                  f"\n  unbonding         {fmt_eth(rep['unbonding'])}\n  PeerID hash       {bound}"
                  f"\n  verified samples  {rep['verified_samples']}\n  epochs            {rep['epochs_contributed']}"
                  f"\n  times slashed     {rep['times_slashed']}\n  claimable         {fmt_eth(rep['claimable'])}"
                  f"\n  pending           {fmt_eth(rep['pending'])} (inside the challenge window)")  # fmt: skip
        if a.run:
            run_ = c.get_run(c.run_of(a.run, a.trainer))
            if run_ is None:
                print(f"run {a.run}: not on this contract")
            else:
                print(f"run {a.run}\n  trainer           {run_['trainer']}\n  budget            "
                      f"{fmt_eth(run_['budget'])}\n  reward/sample     {fmt_eth(run_['reward_per_sample'])}"
                      f"\n  min stake         {fmt_eth(run_['min_stake'])}\n  closing at        "
                      f"{run_['closes_at'] or 'open'}")  # fmt: skip


def _peers(c: StakingClient, a: argparse.Namespace) -> None:
    from atlas_swarm.chain.session import verified_bindings  # hivemind and torch: ~5 s of imports only this needs
    from atlas_swarm.swarm import Swarm, quiet_hivemind

    quiet_hivemind()  # again: hivemind sets its log level when first imported
    with tempfile.TemporaryDirectory() as tmp:  # a throwaway identity: this is a read-only visitor
        swarm = Swarm.join(Identity.load_or_create(Path(tmp) / "id.key"), a.initial_peers, client_mode=True)
        try:
            statuses = swarm.peer_statuses(a.run)
            claimed = swarm.wallet_bindings(a.run)
            verified = verified_bindings(swarm, c, a.run)
        finally:
            swarm.shutdown()
    print(f"run {a.run}: {len(statuses)} peers online")
    for pid in sorted(set(statuses) | set(claimed)):
        st = statuses.get(pid)
        line = f"  {pid}  epoch {st.epoch if st else '?'}  samples {st.samples_total if st else '?'}"
        if pid in verified:
            rep = c.reputation(verified[pid])
            line += (f"  wallet {verified[pid]} (bound both ways)  stake {fmt_eth(rep['stake'])}  paid epochs "
                     f"{rep['epochs_contributed']}  rewards {fmt_eth(rep['claimable'] + rep['pending'])}")  # fmt: skip
        elif pid in claimed:
            line += f"  wallet {claimed[pid]} claimed in the DHT, but that address did not register it (ignored)"
        else:
            line += "  no wallet binding"
        print(line)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
