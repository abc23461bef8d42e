"""`python -m atlas_swarm.bootstrap` (and `python -m atlas_swarm.monitor`, the monitor alone): a long-lived, well-known
entry point to the swarm, with a monitor.

    identity (same PeerID across restarts) → DHT node (relay service for peers behind NAT) → joins other bootstrap
    nodes → prints the multiaddrs to hand out → watches every run it sees → serves /health, /metrics, /

See bootstrap/RUNBOOK.md for deployment (systemd unit, container file, example config).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Optional, Sequence

from atlas_swarm.checkpoints.keeper import Keeper, most_announced
from atlas_swarm.cli import run_cli
from atlas_swarm.config import validate_run_id
from atlas_swarm.errors import ConfigError
from atlas_swarm.identity import Identity
from atlas_swarm.monitor.http import parse_listen, serve
from atlas_swarm.monitor.state import Monitor
from atlas_swarm.swarm import Swarm


def parse_args(argv: Optional[Sequence[str]] = None, monitor_only: bool = False) -> argparse.Namespace:
    prog = "python -m atlas_swarm.monitor" if monitor_only else "python -m atlas_swarm.bootstrap"
    p = argparse.ArgumentParser(prog=prog, description=(__doc__ if not monitor_only else
                                "Watch every atlas-swarm run visible in the DHT; serve /health, /metrics and a "
                                "dashboard.").split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--identity",
                   help="libp2p key file: created (mode 0600) on first start, the same PeerID ever after")
    p.add_argument("--host-maddrs", nargs="*", default=["/ip4/0.0.0.0/tcp/31337"] if not monitor_only
                   else ["/ip4/0.0.0.0/tcp/0"], help="addresses to listen on")  # fmt: skip
    p.add_argument("--announce-maddrs", nargs="*", default=[], help="public addresses to advertise (and print)")
    p.add_argument("--initial-peers", nargs="*", default=[], required=monitor_only,
                   help="other bootstrap nodes (or any peer) to join, so several maintainers form one mesh")
    p.add_argument("--http", default=None if not monitor_only else "127.0.0.1:8080",
                   help="HOST:PORT for /health, /metrics and the dashboard (off if not given)")
    p.add_argument("--run", action="append", default=[], help="also watch this run id (runs announce themselves)")
    p.add_argument("--poll-interval", type=float, default=5.0, help="seconds between DHT polls of the monitor")
    p.add_argument("--keep-adapters", metavar="DIR", help="keep a verified copy of the adapters the watched runs "
                   "publish (what most of a run's peers vouch for; the 16 most announced runs and every --run) in "
                   "this block store, and serve it (so results outlive the peers)")  # fmt: skip
    p.add_argument("--keep-quota-gb", type=float, default=2.0, help="with --keep-adapters: GB kept per run at most")
    if not monitor_only:
        p.add_argument("--no-relay", action="store_true", help="do not relay connections for peers behind NAT")
    p.add_argument("--join-timeout", type=float, default=30.0, help="seconds to wait for --initial-peers")
    p.add_argument("--verbose", action="store_true", help="show hivemind's own log lines")
    p.add_argument("--config", help="TOML file whose keys are these flags' names (identity, host_maddrs, ...); "
                   "flags on the command line win")  # fmt: skip
    first, _ = p.parse_known_args(argv)
    if first.config:
        p.set_defaults(**_read_config(first.config, p))
    args = p.parse_args(argv)
    if not args.identity and not monitor_only:
        p.error("--identity is required (or `identity = ...` in --config)")
    return args


def _read_config(path: str, parser: argparse.ArgumentParser) -> dict:
    import tomllib

    try:
        with open(path, "rb") as f:
            cfg = tomllib.load(f)
    except OSError as e:
        raise SystemExit(f"error: cannot read --config {path!r}: {e.strerror}")
    except tomllib.TOMLDecodeError as e:
        raise SystemExit(f"error: --config {path!r} is not valid TOML: {e}")
    known = {a.dest for a in parser._actions}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise SystemExit(f"error: --config {path!r} has unknown keys {unknown}; known: {sorted(known - {'help'})}")
    return cfg


def run(args: argparse.Namespace, monitor_only: bool = False, ready: Optional[threading.Event] = None,
        stop: Optional[threading.Event] = None) -> int:  # fmt: skip

    for run_id in args.run:
        validate_run_id(run_id)
    listen = parse_listen(args.http) if args.http else None
    if args.poll_interval <= 0:
        raise ConfigError(f"--poll-interval {args.poll_interval} must be positive.")
    if args.identity:
        identity = Identity.load_or_create(args.identity)
    else:
        import tempfile
        from pathlib import Path

        identity = Identity.load_or_create(Path(tempfile.mkdtemp(prefix="atlas-monitor-")) / "identity.key")
    relay = not monitor_only and not args.no_relay
    p2p = {"use_relay": relay}
    if relay and args.announce_maddrs:
        p2p["force_reachability"] = "public"  # a node with a public address serves as a relay for NATed peers
    swarm = Swarm.join(identity, args.initial_peers, args.host_maddrs, args.announce_maddrs, client_mode=False,
                       startup_timeout=args.join_timeout, audit=True, **p2p)  # fmt: skip
    stop = stop or threading.Event()
    monitor = server = keeper = None
    try:
        # the keeper first: its block server is registered from this thread, and hivemind's DHT pipe has no lock,
        # so a call made while the monitor's poll threads use it can be lost (seen once: no banner within 90 s)
        if args.keep_adapters:
            watched = set(args.run)
            keeper = Keeper(swarm, args.keep_adapters, lambda: watched | most_announced(swarm.announcers()),
                            every=args.poll_interval, run_quota=int(args.keep_quota_gb * 2**30)).start()  # fmt: skip
        monitor = Monitor(swarm, interval=args.poll_interval, runs=tuple(args.run)).start()
        if listen is not None:
            server = serve(monitor, *listen)
        maddrs = sorted(swarm.visible_maddrs(), key=lambda a: ("/127." in a, "/ip6/" in a))
        kind = "monitor" if monitor_only else "bootstrap node"
        print(f"atlas-swarm {kind} {swarm.peer_id} (identity {identity.path})")
        if not monitor_only:
            print("relay: " + ("ON (libp2p circuit relay service; atlas peers behind NAT use --client-mode, not "
                               "relays)" if relay else "off (--no-relay)"))  # fmt: skip
        if server is not None:
            host, port = server.server_address[:2]
            print(f"monitor: http://{host}:{port}/  (/health, /metrics)")
        print("multiaddrs (give peers one of these as --initial-peers):")
        for a in maddrs:
            print(a)
        sys.stdout.flush()
        if keeper is not None:
            print(f"keeping every published adapter in {keeper.store.root}")
        if ready is not None:
            ready.set()
        _wait_for_signal(stop)
        return 0
    finally:
        if server is not None:
            server.shutdown()
        if keeper is not None:
            keeper.stop()
        if monitor is not None:
            monitor.stop()
        swarm.shutdown()


def _wait_for_signal(stop: threading.Event) -> None:
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


def main(argv: Optional[Sequence[str]] = None, monitor_only: bool = False) -> int:
    args = parse_args(argv, monitor_only)
    return run_cli(lambda: run(args, monitor_only), verbose=args.verbose)
