"""`python -m atlas_swarm.peer`: join (or start) a swarm and fine-tune its shared LoRA adapter on local data.

run() is the whole pipeline, in order:
    identity → join DHT → fetch/publish run spec → load base model + LoRA → resume local checkpoint
    → [chain: check run, binding, stake] → local steps ⇄ decentralized averaging (hivemind.Optimizer)
    → per epoch: sign contribution proof → outbox → posted on chain (background) ; save adapter
    → every K epochs (elected peer): publish the adapter content-addressed (CID in the run's DHT record) → leave
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from atlas_swarm.config import ChainConfig, PeerConfig, RunSpec, check_same_spec
from atlas_swarm.errors import AtlasError, CheckpointError, ConfigError, DataError, ModelError
from atlas_swarm.identity import Identity
from atlas_swarm.model.hashing import shapes_hash, tensors_hash
from atlas_swarm.model.lora import adapter_parameters, adapter_state, load_adapter_weights, load_model, save_adapter
from atlas_swarm.swarm import EpochDone, PeerStatus, Swarm, make_optimizer
from atlas_swarm.swarm.consensus import agree_on_final_adapter
from atlas_swarm.swarm.records import STATUS_EVERY, finite, not_finite, other_shapes
from atlas_swarm.train.data import Batches, load_examples
from atlas_swarm.train.steps import LossScaler, Precision, accumulate_gradients, find_micro_batch, pick_device
from atlas_swarm.ui import Reporter, quiet_hivemind

SPEC_REFRESH_EVERY = 300.0
STOP_GRACE = 6.0  # after a stop request, interrupt a blocking averaging call after this many seconds
STOP_HARD = 9.5  # ... and kill our children and exit after this many (the user was promised < 10 s)
FINAL_FLUSH = 20.0  # seconds a finishing peer waits for its last proofs to be posted (a stopped one: 3)


@dataclass
class EpochReport:
    """Handed to each epoch hook: everything a contribution proof or checkpoint publisher needs."""

    run_id: str
    peer_id: str
    epoch: int
    samples: int
    group: tuple[str, ...]
    adapter_hash: str
    adapter: dict = field(repr=False, default_factory=dict)  # name -> CPU tensor


@dataclass
class RunResult:
    run_id: str
    peer_id: str
    epoch: int
    samples_total: int
    steps: int
    last_loss: Optional[float]
    adapter_dir: Optional[str]


def run(cfg: PeerConfig, reporter: Reporter, hooks: Sequence[Callable[[EpochReport], None]] = ()) -> RunResult:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    identity = Identity.load_or_create(cfg.identity_path)
    local_spec = RunSpec.from_toml(cfg.run_spec) if cfg.run_spec else None
    device = pick_device(cfg.device)
    if cfg.data is None:
        raise DataError("No --data given: pass a .jsonl/.csv/.txt file or a saved dataset folder (it never leaves you).")
    examples = None if local_spec is None else load_examples(cfg.data, local_spec)  # fail on bad data before joining

    stop = GracefulStop.install()
    swarm = opt = model = publish_status = chain = None
    state = {"epoch": 0, "samples_total": 0, "steps": 0, "loss": None, "rounds_averaged": 0, "rounds_failed": 0}
    try:
        swarm = Swarm.join(identity, cfg.initial_peers, cfg.host_maddrs, cfg.announce_maddrs, cfg.client_mode,
                           startup_timeout=cfg.join_timeout, **({"use_auto_relay": True} if cfg.auto_relay else {}))  # fmt: skip

        # 1. The run spec: ours (first peer) or the swarm's, and they must agree field by field.
        if cfg.run_id is not None and (local_spec is None or local_spec.run_id != cfg.run_id):
            spec = swarm.fetch_spec(cfg.run_id, timeout=cfg.join_timeout)
            if local_spec is not None:
                check_same_spec(local_spec, spec)
        else:
            spec = local_spec
        swarm.publish_spec(spec, timeout=cfg.join_timeout)
        if examples is None:
            examples = load_examples(cfg.data, spec)
        if cfg.chain is not None:  # before the model: a chain misconfiguration should not cost a model load
            from atlas_swarm.chain.session import ChainSession

            chain = ChainSession.open(cfg.chain, spec, swarm, out, reporter)

        publish_hooks: list = []  # before the model, for the same reason: a bad --ipfs-api fails fast
        publisher = None
        if cfg.publish_every:
            from atlas_swarm.storage.publish import AdapterPublisher

            publisher = AdapterPublisher(swarm, spec.run_id, spec.model.base, cfg.store_path, cfg.ipfs_api,
                                         cfg.publish_every)  # fmt: skip
            if chain is not None:  # the contract's run record keeps epoch -> CID too
                publisher.on_published = chain.record_checkpoint

            publish_hooks.append(lambda report: publisher.on_epoch(model, report, reporter))

        # 2. Base model + LoRA, identical on every peer (seeded); refuse adapters the swarm cannot average with ours.
        model, tokenizer = load_model(spec, cfg.base_model, device)
        model.train()
        named = adapter_parameters(model)
        shapes = shapes_hash({n: p for n, p in named})
        theirs = other_shapes(swarm.peer_statuses(spec.run_id).values(), shapes)  # a majority, not one record
        if theirs is not None:
            raise ModelError(
                f"Your adapter's tensor shapes ({shapes}) differ from those of most of the run's peers ({theirs}): "
                f"the same run spec gave a different model here. Use the base model the run expects "
                f"({spec.model.base}); check --base-model."
            )
        batches = Batches(examples, tokenizer, spec, seed=cfg.seed)
        precision = Precision.for_device(device, cfg.precision)
        micro = find_micro_batch(model, batches.next, device, precision)
        batch_size = cfg.batch_size or micro
        micro = min(micro, batch_size)
        next_batch, hooks = batches.next, list(hooks) + publish_hooks
        if chain is not None:  # the proof commits to the batches trained on in each epoch (Merkle root of hashes)
            from atlas_swarm.proofs.commit import batch_hash

            batch_hashes: list[bytes] = []

            def hashed_next(n: int) -> dict:
                b = batches.next(n)
                batch_hashes.append(batch_hash(b))
                return b

            def sign_proof(report: EpochReport) -> None:
                taken = _drain(batch_hashes)
                chain.on_epoch(report.epoch - 1, report.samples, report.adapter_hash, taken, reporter)

            next_batch = hashed_next
            hooks.append(sign_proof)

        # 3. Resume this peer's last checkpoint (the swarm overrides it below if it is ahead).
        adapter_dir = out / "adapter"
        if adapter_dir.exists():
            meta = load_adapter_weights(model, adapter_dir)
            if meta.get("run_id") != spec.run_id:
                raise CheckpointError(
                    f"{str(adapter_dir)!r} holds an adapter of run {meta.get('run_id')!r}, not {spec.run_id!r}. "
                    f"Use another --out for this run."
                )
            state.update(epoch=meta["epoch"], samples_total=meta["samples_total"])
            reporter.event("resumed", f"Resumed from {adapter_dir} at epoch {meta['epoch']}", epoch=meta["epoch"])
        opt = make_optimizer(swarm, spec, [p for _, p in named], batch_size, verbose=cfg.verbose)
        stop.arm()  # hivemind's averagers set SIGINT to SIG_IGN in this process when they start (and never restore it)
        opt_state_path = out / "optimizer.pt"
        if adapter_dir.exists() and opt_state_path.exists():
            opt.load_state_dict(_load_optimizer_state(opt_state_path))
        opt.state_averager.local_epoch = state["epoch"]
        if opt.tracker.global_epoch > opt.local_epoch:
            reporter.event("syncing", f"The swarm is at epoch {opt.tracker.global_epoch}; downloading its state...",
                           epoch=opt.tracker.global_epoch)  # fmt: skip
            opt.load_state_from_peers()
            reporter.event("synced", f"Synced to epoch {opt.local_epoch}", epoch=opt.local_epoch)

        maddrs = sorted(swarm.visible_maddrs(), key=lambda a: a.startswith("/ip4/127."))
        join = f"python -m atlas_swarm.peer --initial-peers {maddrs[0]} --run {spec.run_id} --data YOUR_DATA"
        reporter.event(
            "started",
            "\n".join(
                [f"Peer {swarm.peer_id} on run {spec.run_id} ({device}, {precision}, batch {batch_size}, "
                 f"micro-batch {micro}, {len(batches)} local examples"
                 + (f"; {batches.skipped} of one token left out" if batches.skipped else "") + ")", "Multiaddrs:"]
                + [f"  {a}" for a in maddrs] + ["Others join with:", f"  {join}"]
            ),  # fmt: skip
            peer_id=swarm.peer_id, run_id=spec.run_id, maddrs=maddrs, join_command=join, device=device,
            precision=str(precision), batch_size=batch_size, micro_batch=micro, examples=len(batches),
            skipped_examples=batches.skipped, epoch=opt.local_epoch,
        )  # fmt: skip

        def publish_status(loss: Optional[float], sps: float, leaving: bool = False, final: Optional[str] = None):
            proofs = chain.progress() if chain is not None else {}
            swarm.publish_status(spec.run_id, PeerStatus(
                peer_id=swarm.peer_id, device=device, precision=str(precision), client_mode=cfg.client_mode,
                adapter_shapes=shapes, epoch=opt.local_epoch, samples_total=state["samples_total"],
                samples_per_second=finite(sps), loss=finite(loss, None), loss_nonfinite=not_finite(loss),
                time=time.time(), leaving=leaving, final_hash=final,
                rounds_averaged=state["rounds_averaged"], rounds_failed=state["rounds_failed"],
                proofs_posted=proofs.get("proofs_posted", 0), proofs_pending=proofs.get("proofs_pending", 0),
                rewards_eth=proofs.get("rewards_wei", 0) / 1e18),
                wait=leaving or final is not None)  # fmt: skip
            if not leaving:
                swarm.announce_run(spec.run_id)

        publish_status(None, 0.0)
        if cfg.wait_for_peers > 1:
            # our status records appear at once (hivemind's tracker lists a peer only after its first samples)
            _wait_for_peers(lambda: len(swarm.peer_statuses(spec.run_id)), cfg.wait_for_peers, cfg.join_timeout,
                            stop, reporter)  # fmt: skip

        # 4. The training loop: accumulate a local batch, hand it to hivemind, which averages at epoch boundaries.
        # The tracker's samples/s counts from its creation: a first peer that waited 12 s for company reported half
        # its rate for its first epoch (the estimate weights its first step heavily), and the others planned the
        # epoch's end from it.
        opt.tracker.performance_ema.reset_timer()
        last_status = last_spec = time.monotonic()
        scaler = LossScaler() if precision.needs_loss_scaling else None
        while not stop.requested:
            samples = opt.next_step_samples(batch_size)  # the last step of an epoch may be shorter
            loss = accumulate_gradients(model, next_batch, samples, min(micro, samples), device, precision,
                                        scale=scaler.scale if scaler else (lambda x: x))  # fmt: skip
            if scaler is not None and not scaler.unscale_(p for _, p in named):
                opt.zero_grad(set_to_none=True)  # fp16 overflow: drop this batch, retry at half the scale
                continue
            opt.step(batch_size=samples)
            opt.zero_grad(set_to_none=True)
            state["steps"] += 1
            state["samples_total"] += samples
            state["loss"] = loss
            state["epoch"] = opt.local_epoch

            epochs_done = _drain(opt.completed)
            for done in epochs_done:
                _finish_epoch(done, spec, swarm, model, out, opt, state, cfg, reporter, hooks)

            now = time.monotonic()
            progress = opt.swarm_progress()
            sps = float(opt.tracker.performance_ema.samples_per_second)
            if epochs_done:  # watchers see every epoch's loss, however short epochs are
                last_status = now - STATUS_EVERY
            reporter.progress(epoch=opt.local_epoch, swarm_samples=progress["samples"], target=progress["target"],
                              peers=progress["peers"], loss=round(loss, 5), samples_per_second=round(sps, 2),
                              local_samples=state["samples_total"], **(chain.progress() if chain else {}))  # fmt: skip
            if now - last_status >= STATUS_EVERY:
                publish_status(float(loss), sps)
                last_status = now
            if now - last_spec >= SPEC_REFRESH_EVERY:
                swarm.publish_spec(spec, wait=False)
                if publisher is not None:
                    publisher.refresh()
                last_spec = now
            if cfg.max_epochs is not None and opt.local_epoch >= cfg.max_epochs:
                reporter.event("stopping", f"Reached epoch {opt.local_epoch} (--max-epochs)", reason="max_epochs")
                # peers stopping at this epoch agree on one adapter (a peer that missed the last round downloads it)
                agreement = agree_on_final_adapter(
                    swarm, opt, spec.run_id, opt.local_epoch, lambda: tensors_hash(adapter_state(model)),
                    lambda h: publish_status(float(loss), sps, final=h), cfg.join_timeout, lambda: stop.requested)
                reporter.event(
                    "final", f"Final adapter {agreement.adapter_hash[:12]}: "
                    + ("agreed by all " if agreement.agreed else "NOT agreed by all ") + f"{agreement.peers} finishing peers"
                    + (" (downloaded)" if agreement.downloaded else ""), **agreement.__dict__)  # fmt: skip
                if publisher is not None and agreement.agreed:  # equal adapters, equal CIDs: every finisher serves it
                    publisher.finish(model, opt.local_epoch, agreement.adapter_hash, cfg.join_timeout, reporter)
                break
            if cfg.max_steps is not None and state["steps"] >= cfg.max_steps:
                reporter.event("stopping", f"Did {state['steps']} steps (--max-steps)", reason="max_steps")
                break
        if stop.requested:
            reporter.event("stopping", f"Stopping on {stop.signal_name}", reason=stop.signal_name)
    except KeyboardInterrupt:
        if not stop.requested:
            raise
        reporter.event("stopping", "Abandoned the averaging round in progress", reason="interrupted")
    finally:
        reporter.close()
        saved = None
        try:
            if opt is not None:
                state["epoch"] = opt.local_epoch
                saved = _save(model, opt, out, spec, swarm.peer_id, state)
        finally:
            if publish_status is not None:
                try:
                    publish_status(state["loss"], 0.0, leaving=True)  # finishing peers stop waiting for us
                except Exception:
                    pass  # best effort: the record expires on its own
            if chain is not None:
                # a peer that finished (or hit --max-steps) waits longer for its last proofs than one asked to stop,
                # which was promised an exit within 10 s; what is left stays in the outbox for the next start
                counts = chain.close(3.0 if stop.requested else FINAL_FLUSH)
                reporter.event("proofs", f"Proofs: {counts.posted} posted, {counts.pending} pending (posted on the "
                               f"next start), {counts.rejected} rejected; checkpoints on chain: "
                               f"{sorted(chain.recorded) or 'none'}", **counts.__dict__,
                               checkpoints={str(e): c for e, c in chain.recorded.items()})  # fmt: skip
            if opt is not None:
                opt.shutdown()
            if swarm is not None:
                swarm.shutdown()
            stop.uninstall()
    result = RunResult(spec.run_id, swarm.peer_id, state["epoch"], state["samples_total"], state["steps"],
                       state["loss"], str(saved) if saved else None)  # fmt: skip
    reporter.event("stopped", f"Stopped at epoch {result.epoch}; adapter saved to {result.adapter_dir}",
                   **result.__dict__)  # fmt: skip
    return result


def _wait_for_peers(count: Callable[[], int], wanted: int, timeout: float, stop, reporter: Reporter) -> None:
    reporter.event("waiting", f"Waiting for {wanted} peers in the run (up to {timeout:.0f} s)...", wanted=wanted)
    deadline = time.monotonic() + timeout
    while not stop.requested:
        seen = count()
        if seen >= wanted:
            reporter.event("peers_ready", f"{seen} peers in the run; training", peers=seen)
            return
        if time.monotonic() > deadline:
            reporter.event("peers_timeout", f"Only {seen}/{wanted} peers after {timeout:.0f} s; training anyway",
                           peers=seen)  # fmt: skip
            return
        time.sleep(0.5)


def _finish_epoch(done: EpochDone, spec, swarm, model, out, opt, state, cfg, reporter, hooks) -> None:
    tensors = adapter_state(model)
    report = EpochReport(spec.run_id, swarm.peer_id, done.epoch, done.samples, done.group, tensors_hash(tensors), tensors)
    with_whom = f"averaged with {len(done.group)} peers" if done.group else "local gradients only"
    if len(done.group) >= 2:
        state["rounds_averaged"] += 1
    elif opt.swarm_progress()["peers"] > 1:
        state["rounds_failed"] += 1  # others were there, but no group formed (or the all-reduce failed)
    reporter.event(
        "epoch", f"Epoch {done.epoch}: contributed {done.samples} samples, {with_whom}",
        epoch=done.epoch, samples=done.samples, group=list(done.group), adapter_hash=report.adapter_hash,
        averaging_s=round(done.seconds, 3),
    )  # fmt: skip
    for hook in hooks:
        hook(report)
    if done.epoch % cfg.save_every == 0:
        state["epoch"] = done.epoch
        path = _save(model, opt, out, spec, swarm.peer_id, state, report.adapter_hash)
        reporter.event("saved", "", path=str(path), epoch=done.epoch)


def _save(model, opt, out: Path, spec: RunSpec, peer_id: str, state: dict, adapter_hash: Optional[str] = None) -> Path:
    if adapter_hash is None:
        adapter_hash = tensors_hash(adapter_state(model))
    meta = {"run_id": spec.run_id, "epoch": state["epoch"], "samples_total": state["samples_total"],
            "adapter_hash": adapter_hash, "peer_id": peer_id, "base_model": spec.model.base}  # fmt: skip
    path = save_adapter(model, out / "adapter", meta)
    tmp = out / "optimizer.pt.tmp"
    torch.save(opt.state_dict(), tmp)
    os.replace(tmp, out / "optimizer.pt")
    return path


def _load_optimizer_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{str(path)!r} is corrupted ({e}); delete it to restart the optimizer state.") from None


def _drain(queue: list) -> list:
    items = list(queue)
    del queue[: len(items)]
    return items


class GracefulStop:
    """SIGINT/SIGTERM ask the loop to stop after the current step; a blocking averaging round is interrupted after
    STOP_GRACE seconds, and if shutdown still hangs, children are killed at STOP_HARD. A second signal interrupts now."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._previous = {}
        self._timers: list[threading.Timer] = []

    @classmethod
    def install(cls) -> "GracefulStop":
        self = cls()
        self.arm()
        return self

    def arm(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous = signal.signal(sig, self._handle)
                self._previous.setdefault(sig, previous)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        self._timers = [threading.Timer(STOP_GRACE, _interrupt_main), threading.Timer(STOP_HARD, _kill_children_and_exit)]
        for timer in self._timers:
            timer.daemon = True
            timer.start()

    def uninstall(self) -> None:
        """Restore the previous handlers and cancel the watchdogs: a caller in the same process (a notebook, a test)
        must not get a KeyboardInterrupt or an exit seconds after a clean stop."""
        for timer in self._timers:
            timer.cancel()
        if threading.current_thread() is threading.main_thread():
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)


def _interrupt_main() -> None:
    import _thread

    _thread.interrupt_main()


def _kill_children_and_exit() -> None:
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.Error:
            pass
    os._exit(0)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m atlas_swarm.peer", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--run-spec", help="TOML run spec: starts that run (first peer) or checks it against --run")
    p.add_argument("--run", dest="run_id", help="run id to join (printed by the first peer)")
    p.add_argument("--initial-peers", nargs="*", default=[], help="multiaddrs of any peers already in the swarm")
    p.add_argument("--data", help="local data: .jsonl/.csv/.txt, a datasets.save_to_disk folder, or builtin:NAME")
    p.add_argument("--batch-size", default="auto", help="samples per step, or 'auto' (largest micro-batch that fits)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--precision", default="auto", help="auto (bf16 if the GPU has it, else fp16; fp32 on CPU), fp32, "
                   "bf16 or fp16")  # fmt: skip
    p.add_argument("--identity", help="libp2p key file (created if missing) [default: OUT/identity.key]")
    p.add_argument("--out", default="atlas-runs/peer", help="folder for the identity, checkpoints and adapter")
    p.add_argument("--base-model", help="local folder holding the spec's base model (offline copies)")
    p.add_argument("--host-maddrs", nargs="*", default=["/ip4/0.0.0.0/tcp/0"], help="addresses to listen on")
    p.add_argument("--announce-maddrs", nargs="*", default=[], help="public addresses to advertise (NAT/port forward)")
    p.add_argument("--client-mode", action="store_true", help="behind a firewall: connect out only")
    p.add_argument("--auto-relay", action="store_true", help="behind NAT: be reachable through a relay (bootstrap nodes "
                   "run one)")  # fmt: skip
    p.add_argument("--max-epochs", type=int, help="stop when the swarm reaches this epoch")
    p.add_argument("--max-steps", type=int, help="stop after this many local steps")
    p.add_argument("--save-every", type=int, default=1, help="write the adapter every N epochs (and at exit)")
    p.add_argument("--log-format", default="rich", help="rich (live bar), plain (lines) or json (one object per event)")
    p.add_argument("--threads", type=int, help="torch CPU threads [default: torch's]")
    p.add_argument("--wait-for-peers", type=int, default=1, help="start training once N peers are in the run")
    p.add_argument("--join-timeout", type=float, default=30.0, help="seconds to wait for peers and the run spec")
    p.add_argument("--seed", type=int, default=0, help="seed of this peer's data order")
    p.add_argument("--chain-rpc", help="post contribution proofs to this EVM chain (RPC URL)")
    p.add_argument("--staking-contract", help="the AtlasStaking contract's address")
    p.add_argument("--wallet", help="encrypted keystore JSON that signs proofs (never a raw key on the command line)")
    p.add_argument("--wallet-password-file", help="file with the keystore password [default: $ATLAS_WALLET_PASSWORD]")
    p.add_argument("--proof-batch", type=int, default=4, help="epochs' proofs per transaction (saves gas)")
    p.add_argument("--proof-max-wait", type=float, default=120.0, help="seconds a proof waits at most for a batch")
    p.add_argument("--publish-every", type=int, default=5, help="publish the swarm's adapter (content-addressed, "
                   "served to the swarm) every N epochs when this peer is elected; 0: never")  # fmt: skip
    p.add_argument("--store", help="folder of the embedded block store [default: OUT/store]")
    p.add_argument("--ipfs-api", help="use this IPFS daemon's RPC (e.g. http://127.0.0.1:5001) as the store")
    p.add_argument("--verbose", action="store_true", help="show hivemind's own log lines")
    return p.parse_args(argv)


def config_from_args(a: argparse.Namespace) -> PeerConfig:
    if a.batch_size == "auto":
        batch_size = None
    else:
        try:
            batch_size = int(a.batch_size)
        except ValueError:
            raise ConfigError(f"--batch-size {a.batch_size!r} is not an integer or 'auto'.") from None
    return PeerConfig(
        run_spec=a.run_spec, run_id=a.run_id, initial_peers=tuple(a.initial_peers), data=a.data, batch_size=batch_size,
        device=a.device, precision=a.precision, identity=a.identity, out=a.out, base_model=a.base_model, host_maddrs=tuple(a.host_maddrs),
        announce_maddrs=tuple(a.announce_maddrs), client_mode=a.client_mode, auto_relay=a.auto_relay, max_epochs=a.max_epochs,
        max_steps=a.max_steps, save_every=a.save_every, log_format=a.log_format, threads=a.threads,
        join_timeout=a.join_timeout, wait_for_peers=a.wait_for_peers, seed=a.seed,
        chain=ChainConfig.from_flags(a.chain_rpc, a.staking_contract, a.wallet, a.wallet_password_file,
                                     a.proof_batch, a.proof_max_wait),
        publish_every=a.publish_every, store=a.store, ipfs_api=a.ipfs_api, verbose=a.verbose,
    )  # fmt: skip


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if not args.verbose:
        quiet_hivemind()
        warnings.filterwarnings("ignore", category=FutureWarning)
    reporter = Reporter(args.log_format if args.log_format in ("rich", "json", "plain") else "plain")
    try:
        run(config_from_args(args), reporter)
        return 0
    except AtlasError as e:
        reporter.close()
        reporter.event("error", f"error: {e}", error=str(e), kind=type(e).__name__)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
