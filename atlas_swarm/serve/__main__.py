"""`python -m atlas_swarm.serve`: serve a run's adapters over OpenAI-compatible HTTP (serve/api.py).

    --run RUN_ID --initial-peers MADDR   the newest adapter the run vouches for (on chain, with --chain-rpc), every
                                         block verified against its CID; a newer one is loaded beside it as the run
                                         publishes it (hot swap), the old one retired --keep-old s later
    --run-spec FILE --adapter DIR|CID    adapters without a swarm (a CID from --ipfs-api, verified); with --follow,
                                         each newer epoch written to DIR (a local peer's OUT/adapter) is hot-swapped
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Optional, Sequence

from atlas_swarm.cli import run_cli
from atlas_swarm.config import RunSpec, validate_run_id
from atlas_swarm.errors import AtlasError, ConfigError
from atlas_swarm.monitor.http import parse_listen


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m atlas_swarm.serve", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--run", help="the run id whose adapters to serve (joins its swarm)")
    p.add_argument("--initial-peers", nargs="*", default=[], help="with --run: multiaddrs of the run's peers")
    p.add_argument("--epoch", action="append", default=[], metavar="N|latest",
                   help="with --run: serve this epoch (repeatable, to compare epochs), and with 'latest' (the default) "
                   "the newest one, following newer ones")  # fmt: skip
    p.add_argument("--run-spec", help="with --adapter: the run's spec (TOML): base model, task, labels")
    p.add_argument("--adapter", action="append", default=[], metavar="DIR|CID",
                   help="serve this adapter folder (or CID, fetched from --ipfs-api and verified); repeatable")
    p.add_argument("--follow", action="store_true",
                   help="with one --adapter DIR: serve each newer epoch written there (a peer's OUT/adapter)")
    p.add_argument("--base-model", help="a local copy of the spec's base model (offline)")
    p.add_argument("--ipfs-api", help="IPFS daemon API multiaddr for CIDs (e.g. /ip4/127.0.0.1/tcp/5001)")
    p.add_argument("--chain-rpc", help="with --run: trust only checkpoints recorded by this chain's contract")
    p.add_argument("--contract", help="with --chain-rpc: the AtlasStaking contract address")
    p.add_argument("--http", default="127.0.0.1:8000", help="HOST:PORT to listen on (port 0: any free one)")
    p.add_argument("--api-key-file", help="require 'Authorization: Bearer KEY' with the key in this file")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--quantize", choices=("none", "nf4", "int8"), default="none",
                   help="load the base quantized by bitsandbytes (a ~7B base on an 8 GB card in nf4); CUDA, or nf4 "
                   "on CPU (slower, less memory)")  # fmt: skip
    p.add_argument("--max-batch", type=int, default=32, help="requests sharing one forward pass at most")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting at most; more get HTTP 429")
    p.add_argument("--max-tokens", type=int, default=512, help="max_tokens a request may ask for at most")
    p.add_argument("--max-prompt-tokens", type=int, help="prompt tokens at most (default: the model's context)")
    p.add_argument("--max-body-kb", type=int, default=1024, help="request bodies larger than this get HTTP 413")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds a request may take (HTTP 504)")
    p.add_argument("--poll", type=float, default=10.0, help="with --run: seconds between looks for a newer adapter")
    p.add_argument("--keep-old", type=float, default=60.0,
                   help="seconds an adapter stays listed after a newer one serves (requests in flight always finish)")
    p.add_argument("--fetch-timeout", type=float, default=120.0, help="seconds to wait for the first adapter")
    p.add_argument("--workdir", default="atlas-runs/serve", help="verified adapter blocks and folders go here")
    p.add_argument("--verbose", action="store_true", help="show hivemind's own log lines")
    args = p.parse_args(argv)
    if bool(args.run) == bool(args.adapter):
        p.error("give either --run RUN_ID (with --initial-peers) or --adapter DIR|CID (with --run-spec)")
    if args.adapter and not args.run_spec:
        p.error("--adapter needs --run-spec FILE (the run's base model, task and labels)")
    if args.follow and (len(args.adapter) != 1 or not Path(args.adapter[0]).is_dir()):
        p.error("--follow takes exactly one --adapter DIR")
    if args.run and not args.initial_peers:
        p.error("--run needs --initial-peers MADDR")
    if bool(args.chain_rpc) != bool(args.contract):
        p.error("--chain-rpc and --contract go together")
    for name in ("max_batch", "max_queue", "max_tokens", "max_body_kb"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    args.epoch = args.epoch or ["latest"]
    if not all(e == "latest" or e.isdigit() for e in args.epoch):
        p.error("--epoch must be a number or 'latest'")
    if args.epoch != ["latest"] and not args.run:
        p.error("--epoch goes with --run (an --adapter folder says its own epoch)")
    return args


def adapter_epoch(folder: Path) -> int:
    try:
        return int(json.loads((folder / "atlas.json").read_text()).get("epoch", 0))
    except (OSError, ValueError, TypeError):
        return 0


def fetch_cid(cid: str, ipfs_api: Optional[str], workdir: Path) -> Path:
    from atlas_swarm.storage import IpfsStore, LocalStore, cid_of_folder
    from atlas_swarm.storage.dag import parse_cid

    parse_cid(cid)  # a clear error for a malformed one
    dest = workdir / "adapters" / cid
    if dest.is_dir() and cid_of_folder(dest) == cid:
        return dest
    if not ipfs_api:
        raise ConfigError(f"--adapter {cid} is not a folder; to fetch it as a CID, give --ipfs-api.")
    local = LocalStore(workdir / "store")
    local.pin(IpfsStore(ipfs_api).get_blocks, cid)  # every block verified against its CID
    return local.fetch_folder(cid, dest)


def snapshot(folder: Path, workdir: Path) -> Path:
    """A copy of an adapter folder that a peer may rewrite at any moment, named by its CID (checked after copying)."""
    import shutil
    import tempfile

    from atlas_swarm.storage import cid_of_folder

    (workdir / "adapters").mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=workdir / "adapters", prefix=".copy-"))
    try:
        before = _stamp(folder)
        try:
            for f in ("adapter_config.json", "adapter_model.safetensors", "atlas.json"):
                if (folder / f).exists():
                    shutil.copy2(folder / f, tmp / f)
        except OSError as e:
            raise AtlasError(f"Could not copy the adapter in {str(folder)!r}: {e.strerror}") from None
        if before is None or _stamp(folder) != before:  # a peer replaced it while we copied: the next poll
            raise AtlasError(f"{str(folder)!r} has no complete adapter yet, or it changed while being copied.")
        cid = cid_of_folder(tmp)
        dest = workdir / "adapters" / cid
        if not dest.exists():
            tmp.rename(dest)
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _stamp(folder: Path):
    try:
        return tuple((folder / f).stat().st_mtime_ns for f in ("adapter_config.json", "adapter_model.safetensors"))
    except OSError:
        return None


class Follower:
    """Serves the newest adapter ``source()`` gives, and every --poll s looks for a newer one (hot swap): the newer
    one is loaded beside the current one, requests move to it, the old one is retired --keep-old s later."""

    def __init__(self, args, engine, run_id: str, source, pinned: frozenset = frozenset()):
        self.args, self.engine, self.run_id, self.source = args, engine, run_id, source
        self.pinned = pinned  # epochs asked for by number: never retired
        self.stop = threading.Event()
        self.current = None
        self.last_warning = ""

    def once(self, timeout: float) -> None:
        folder = self.source(timeout)
        found = adapter_epoch(folder)
        if self.current is not None and found <= self.current.epoch:
            return
        adapter = self.engine.add_adapter(self.run_id, found, folder)
        previous, self.current = self.current, adapter
        print(f"serving {adapter.name} from {folder}" + (f" (replaces {previous.name}, listed {self.args.keep_old:g} s "
                                                        f"more)" if previous else ""), flush=True)  # fmt: skip
        if previous is not None and previous.epoch not in self.pinned:
            self.engine.retire(previous.name, after=self.args.keep_old)

    def follow(self) -> None:
        while not self.stop.wait(self.args.poll):
            try:
                self.once(timeout=min(self.args.poll, 30.0))
            except AtlasError as e:  # nothing newer yet, a corrupt block, publishers gone: the current one serves on
                self.engine.stats.fetch_failures += 1
                if str(e) != self.last_warning:  # once per reason, not once per poll
                    self.last_warning = str(e)
                    print(f"warning: no newer adapter this time: {e}", file=sys.stderr, flush=True)


def serve(args: argparse.Namespace, ready: Optional[threading.Event] = None,
          stop: Optional[threading.Event] = None) -> int:  # fmt: skip
    from atlas_swarm.serve.api import Api
    from atlas_swarm.serve.engine import Engine

    host, port = parse_listen(args.http)
    api_key = None
    if args.api_key_file:
        try:
            api_key = Path(args.api_key_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"Cannot read --api-key-file {args.api_key_file!r}: {e.strerror}") from None
        if not api_key:
            raise ConfigError(f"--api-key-file {args.api_key_file!r} is empty.")
    from atlas_swarm.model.fit import check_quantize

    check_quantize(args.quantize, args.device, args.device)  # before joining anything
    workdir = Path(args.workdir)
    run = follower = None
    stop = stop or threading.Event()
    try:
        if args.run:
            from atlas_swarm.notebook.run import Run

            validate_run_id(args.run)
            run = Run.attach(args.run, args.initial_peers, timeout=args.fetch_timeout, workdir=workdir,
                             ipfs_api=args.ipfs_api)  # fmt: skip
            if args.chain_rpc:
                run.connect_chain(args.chain_rpc, args.contract)
            spec = run.spec
        else:
            spec = RunSpec.from_toml(args.run_spec)
        engine = Engine(spec, args.base_model, args.device, args.max_batch, args.max_queue, args.max_tokens,
                        args.max_prompt_tokens, args.quantize)  # fmt: skip
        try:
            if run is not None:
                from atlas_swarm.notebook.fetch import fetch_adapter

                pinned = frozenset(int(e) for e in args.epoch if e != "latest")
                for epoch in sorted(pinned):
                    adapter = engine.add_adapter(run.run_id, epoch, fetch_adapter(run, epoch, args.fetch_timeout))
                    print(f"serving {adapter.name} (--epoch {epoch})", flush=True)
                if "latest" in args.epoch:
                    follower = Follower(args, engine, run.run_id, lambda t: fetch_adapter(run, None, t), pinned)
                    follower.once(args.fetch_timeout)
            elif args.follow:
                folder = Path(args.adapter[0])
                follower = Follower(args, engine, spec.run_id, lambda t: snapshot(folder, workdir))
                follower.once(args.fetch_timeout)
            if follower is not None:
                threading.Thread(target=follower.follow, name="atlas-serve-follow", daemon=True).start()
            for source in ([] if args.follow else args.adapter):
                folder = Path(source) if Path(source).is_dir() else fetch_cid(source, args.ipfs_api, workdir)
                adapter = engine.add_adapter(spec.run_id, adapter_epoch(folder), folder)
                print(f"serving {adapter.name} from {folder}", flush=True)
            api = Api(engine, api_key, args.request_timeout, args.max_body_kb * 1024)
            return asyncio.run(_listen(api, host, port, stop, ready))
        finally:
            if follower is not None:
                follower.stop.set()
            engine.stop()
    finally:
        if run is not None:
            run.close()


async def _listen(api, host: str, port: int, stop: threading.Event, ready: Optional[threading.Event]) -> int:
    from aiohttp import web

    runner = web.AppRunner(api.app, access_log=None, handler_cancellation=True)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as e:
            raise ConfigError(f"Cannot listen on {host}:{port} for --http: {e.strerror}. Pick another port.") from None
        bound = site._server.sockets[0].getsockname()[:2]
        print(f"listening on http://{bound[0]}:{bound[1]}/v1 (OpenAI-compatible; /health, /metrics)", flush=True)
        if ready is not None:
            ready.set()
        loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
        while not stop.is_set():
            await asyncio.sleep(0.2)
        return 0
    finally:
        await runner.cleanup()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: serve(args), verbose=args.verbose)


if __name__ == "__main__":
    from atlas_swarm.model.fit import skip_bitsandbytes_unless_quantizing

    skip_bitsandbytes_unless_quantizing(sys.argv[1:])  # PEFT imports bitsandbytes if present: 1 s and a warning
    sys.exit(main())
