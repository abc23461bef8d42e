"""`python -m atlas_swarm.peer`: join (or start) a swarm and fine-tune its shared LoRA adapter on local data.

run() is the whole pipeline, in order, each phase a function below it:
    join: identity → DHT → the run spec (ours or the swarm's)
    open services: chain session (check run, binding, stake), checkpoint publisher — before the model: they fail fast
    load: base model + LoRA → resume the local checkpoint → optimizer → sync with the swarm if it is ahead
    train: local steps ⇄ decentralized averaging; per averaged epoch: co-sign the round's receipt (gathered and
           settled in the background), publish the adapter every K epochs (elected peer; the others vote), save
    leave: save the adapter, say we leave, settle the last receipts, shut down
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from atlas_swarm.model.fit import (
    SMALL_MICRO_BATCH,
    check_quantize,
    enable_checkpointing,
    limit_memory,
    skip_bitsandbytes_unless_quantizing,
)

if __name__ == "__main__":  # before peft is imported (below); tests import this module with bitsandbytes in use
    skip_bitsandbytes_unless_quantizing(sys.argv[1:])

from atlas_swarm.checkpoints.publish import AdapterPublisher  # noqa: E402
from atlas_swarm.cli import run_cli
from atlas_swarm.config import PeerConfig, RunSpec, check_same_spec
from atlas_swarm.errors import CheckpointError, DataError, ModelError, SwarmError
from atlas_swarm.gatekeeper import Gatekeeper
from atlas_swarm.identity import Identity
from atlas_swarm.model.hashing import shapes_hash, tensors_hash
from atlas_swarm.model.lora import (
    adapter_parameters,
    adapter_state,
    import_model_libraries,
    load_adapter_weights,
    load_model,
    save_adapter,
)
from atlas_swarm.peer_args import config_from_args, parse_args
from atlas_swarm.peer_state import (
    EpochHook,
    Progress,
    RunResult,
    expected_states,
    note_state,
    note_statuses,
    publish_status,
    report_progress,
    state_claims,
    until_new_states,
)
from atlas_swarm.proofs import EpochRecord
from atlas_swarm.stopping import GracefulStop, watch
from atlas_swarm.swarm import EpochDone, Swarm, make_optimizer
from atlas_swarm.swarm.consensus import agree_on_final_adapter
from atlas_swarm.swarm.records import STATUS_EVERY, other_shapes
from atlas_swarm.swarm.schedule import unheld_state_wait
from atlas_swarm.train.data import Batches, load_examples
from atlas_swarm.train.steps import (
    FINE_MICRO_BATCH,
    MAX_AUTO_MICRO_BATCH,
    LossScaler,
    Precision,
    accumulate_gradients,
    find_micro_batch,
    pick_device,
    shrink_on_oom,
)
from atlas_swarm.ui import Reporter

SPEC_REFRESH_EVERY = 300.0
FINAL_FLUSH = 30.0  # seconds a finishing peer waits for its last receipts and vote to settle (a stopped one: 3)


def run(cfg: PeerConfig, reporter: Reporter, hooks: Sequence[EpochHook] = ()) -> RunResult:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.data is None:
        raise DataError("No --data given: pass a .jsonl/.csv/.txt file or a saved dataset folder (it never leaves you).")
    local_spec = RunSpec.from_toml(cfg.run_spec) if cfg.run_spec else None
    examples = None if local_spec is None else load_examples(cfg.data, local_spec)  # bad data fails before joining
    p = Progress(cfg, reporter, GracefulStop.install(), Path(cfg.out), device=pick_device(cfg.device))
    check_quantize(cfg.quantize, p.device, cfg.device)  # before joining: a peer that cannot fit says so at once
    limit_memory(cfg.max_memory, p.device)
    p.phase("imports")  # interpreter, imports, arguments, local data
    try:
        join(p, local_spec)
        p.phase("join")  # DHT node, bootstrap (peft and transformers imported meanwhile), the run spec
        open_services(p)
        p.phase("services")
        load(p, examples if examples is not None else load_examples(cfg.data, p.spec), hooks)  # phases model, sync
        announce(p)

        # The training loop: accumulate a local batch, hand it to hivemind, which averages at epoch boundaries.
        p.opt.restart_rate_clock()
        last_status = last_spec = time.monotonic()
        scaler = LossScaler() if p.precision.needs_loss_scaling else None
        while not p.stop.requested:
            if cfg.max_epochs is not None and p.opt.local_epoch >= cfg.max_epochs and not p.steps:
                reporter.event("stopping", f"At epoch {p.opt.local_epoch} on joining, --max-epochs "
                               f"{cfg.max_epochs}: nothing to train; the adapter is the one synced at start",
                               reason="max_epochs", trained=False)  # fmt: skip
                break  # not a finisher of its epoch: the others train on, so there is no final vote to wait for
            samples, fine = p.opt.next_step(p.batch_size)  # an epoch's last step may be shorter, and end early

            def attempt(micro: int, samples=samples, fine=fine) -> tuple[float, int]:
                piece = min(micro, max(FINE_MICRO_BATCH, micro // 4) if fine else micro, samples)
                return accumulate_gradients(p.model, p.next_batch, samples, piece, p.device, p.precision,
                                            scale=scaler.scale if scaler else (lambda x: x), stop=p.opt.epoch_over)

            (loss, samples), p.micro = shrink_on_oom(attempt, p.micro, lambda micro: out_of_memory(p, micro))
            if scaler is not None and not scaler.unscale_(p.params):
                p.opt.zero_grad(set_to_none=True)  # fp16 overflow: drop this batch, retry at half the scale
                continue
            p.opt.step(batch_size=samples)
            p.opt.zero_grad(set_to_none=True)
            p.steps, p.samples_total, p.loss, p.epoch = p.steps + 1, p.samples_total + samples, loss, p.opt.local_epoch

            ended = p.opt.take_completed()
            while p.opt.caught_up:
                caught = p.opt.caught_up.pop(0)
                reporter.event("synced", f"No state that a majority of the run's peers hold could be downloaded: "
                               f"moved to epoch {caught} with this peer's own adapter", epoch=caught, verified=False)
            for done in ended:
                finish_epoch(p, done)
            now = time.monotonic()
            report_progress(p)
            if ended or now - last_status >= STATUS_EVERY:  # watchers see every epoch's loss, however short
                publish_status(p)
                last_status = now
            if now - last_spec >= SPEC_REFRESH_EVERY:
                p.swarm.publish_spec(p.spec, wait=False)
                if p.publisher is not None:
                    p.publisher.refresh()
                last_spec = now
            if cfg.max_epochs is not None and p.opt.local_epoch >= cfg.max_epochs:
                reporter.event("stopping", f"Reached epoch {p.opt.local_epoch} (--max-epochs)", reason="max_epochs")
                finish_run(p)
                break
            if cfg.max_steps is not None and p.steps >= cfg.max_steps:
                reporter.event("stopping", f"Did {p.steps} steps (--max-steps)", reason="max_steps")
                break
        if p.stop.requested:
            reporter.event("stopping", p.stop.failure or f"Stopping on {p.stop.signal_name}", reason=p.stop.signal_name)
    except KeyboardInterrupt:
        if not p.stop.requested:
            raise
        # the stop watchdog interrupted a blocking call: an averaging round, or joining / fetching the spec; or a
        # process of ours died (stopping.watch), and what was waiting for it was interrupted
        reporter.event("stopping", p.stop.failure or "Abandoned what was in progress (averaging round, joining)",
                       reason="failure" if p.stop.failure else "interrupted")  # fmt: skip
    finally:
        leave(p)
    if p.stop.failure:
        raise SwarmError(p.stop.failure)  # after leave(): the adapter is saved and every process stopped
    result = p.result()
    reporter.event("stopped", f"Stopped at epoch {result.epoch}; adapter saved to {result.adapter_dir}",
                   **result.__dict__)  # fmt: skip
    return result


def out_of_memory(p: Progress, micro: int) -> None:
    """The step ran out of device memory: its partial gradients are dropped, and it is redone in smaller pieces."""
    p.opt.zero_grad(set_to_none=True)
    p.reporter.event("oom", f"Out of {p.device} memory: micro-batch halved to {micro} (the batch stays "
                     f"{p.batch_size} samples, accumulated in more pieces)", micro_batch=micro)  # fmt: skip


def join(p: Progress, local_spec: Optional[RunSpec]) -> None:
    """A DHT node with our identity, and the run spec: ours (first peer) or the swarm's, agreeing field by field."""
    cfg = p.cfg
    identity = Identity.load_or_create(cfg.identity_path)
    p.swarm = Swarm.join(identity, cfg.initial_peers, cfg.host_maddrs, cfg.announce_maddrs, cfg.client_mode,
                         startup_timeout=cfg.join_timeout, while_joining=import_model_libraries)
    if cfg.run_id is not None and (local_spec is None or local_spec.run_id != cfg.run_id):
        p.spec = p.swarm.fetch_spec(cfg.run_id, timeout=cfg.join_timeout)
        if local_spec is not None:
            check_same_spec(local_spec, p.spec)
    else:
        p.spec = local_spec
    p.swarm.publish_spec(p.spec, timeout=cfg.join_timeout)


def open_services(p: Progress) -> None:
    """The chain session and the checkpoint publisher, before the model: a misconfiguration should not cost a
    model load (a bad --ipfs-api or wallet fails here, fast)."""
    cfg = p.cfg
    if cfg.chain is not None:
        from atlas_swarm.chain.session import ChainSession

        p.chain = ChainSession.open(cfg.chain, p.spec, p.swarm, p.out, p.reporter.event)
    p.gatekeeper = Gatekeeper(p.spec, p.swarm, p.chain).start()
    p.gatekeeper.check_self()  # a peer the run would refuse is told so now (exit 2), not left to train alone
    if cfg.publish_every:
        p.publisher = AdapterPublisher(p.swarm, p.spec.run_id, p.spec.model.base, cfg.store_path, cfg.ipfs_api,
                                       cfg.publish_every)  # fmt: skip
        if p.chain is not None:  # the contract's run record keeps epoch -> CID too
            p.publisher.on_checkpoint = p.chain.on_checkpoint
        p.hooks.append(lambda record: p.publisher.on_epoch(p.model, record, p.reporter))
    if p.chain is not None:
        p.hooks.append(p.chain.on_epoch)


def load(p: Progress, examples, hooks: Sequence[EpochHook]) -> None:
    """Base model + LoRA, identical on every peer (seeded); refuse adapters the swarm cannot average with ours. Then
    this peer's last checkpoint, the optimizer, and the swarm's state if the swarm is ahead."""
    cfg, spec, swarm = p.cfg, p.spec, p.swarm
    p.checkpointing = cfg.gradient_checkpointing == "on" or cfg.quantize != "none"
    p.model, tokenizer = load_model(spec, cfg.base_model, p.device, cfg.quantize, p.checkpointing)
    p.model.train()
    named = adapter_parameters(p.model)
    p.params, p.shapes = [param for _, param in named], shapes_hash(dict(named))
    theirs = other_shapes(swarm.peer_statuses(spec.run_id).values(), p.shapes)  # a majority, not one record
    if theirs is not None:
        raise ModelError(
            f"Your adapter's tensor shapes ({p.shapes}) differ from those of most of the run's peers ({theirs}): "
            f"the same run spec gave a different model here. Use the base model the run expects "
            f"({spec.model.base}); check --base-model."
        )
    p.batches = Batches(examples, tokenizer, spec, seed=cfg.seed)
    p.precision = Precision.for_device(p.device, cfg.precision)
    limit = cfg.batch_size or MAX_AUTO_MICRO_BATCH  # no use probing past the batch
    micro = find_micro_batch(p.model, p.batches.next, p.device, p.precision, limit)
    if cfg.gradient_checkpointing == "auto" and not p.checkpointing and p.device.startswith("cuda") \
            and micro < min(SMALL_MICRO_BATCH, limit):  # recomputing activations costs less than tiny micro-batches
        enable_checkpointing(p.model)
        p.checkpointing, micro = True, find_micro_batch(p.model, p.batches.next, p.device, p.precision, limit)
    if p.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()  # progress events' gpu_peak_gb: training's peak, not the probe's
    p.batch_size = cfg.batch_size or micro
    p.micro = min(micro, p.batch_size)
    p.hooks = list(hooks) + p.hooks

    adapter_dir = p.out / "adapter"  # the swarm overrides it below if it is ahead
    if adapter_dir.exists():
        meta = load_adapter_weights(p.model, adapter_dir)
        if meta.get("run_id") != spec.run_id:
            raise CheckpointError(f"{str(adapter_dir)!r} holds an adapter of run {meta.get('run_id')!r}, not "
                                  f"{spec.run_id!r}. Use another --out for this run.")  # fmt: skip
        p.epoch, p.samples_total = meta["epoch"], meta["samples_total"]
        p.reporter.event("resumed", f"Resumed from {adapter_dir} at epoch {p.epoch}", epoch=p.epoch)
    p.opt = make_optimizer(swarm, spec, p.params, p.batch_size, verbose=cfg.verbose, gate=p.gatekeeper.gate)
    p.opt.final_epoch = cfg.max_epochs  # its transition averages the state too (the final vote then agrees)
    p.opt.should_stop = lambda: p.stop.requested
    p.opt.state_averager.expected_states = lambda: expected_states(p)
    p.stop.arm()  # hivemind's averagers set SIGINT to SIG_IGN in this process when they start (and never restore it)
    watch(p.stop, {name: process for name, process in (("DHT", swarm.dht), ("gradient averager", p.opt.grad_averager),
                                                       ("state averager", p.opt.state_averager),
                                                       ("progress tracker", p.opt.tracker)) if process})
    if adapter_dir.exists() and (p.out / "optimizer.pt").exists():
        p.opt.load_state_dict(_load_optimizer_state(p.out / "optimizer.pt"))
    p.opt.resume(p.epoch)
    # our status goes out before we decide whether to sync: newcomers loading beside one another see each other's
    # statuses, which bound the epochs they follow (admission.sane_progress). Before, a progress liar that was a
    # newcomer's only company held it syncing until --join-timeout (test_a_progress_liar_that_came_first…)
    publish_status(p)
    p.phase("model")  # base model, LoRA, optimizer, averagers
    if p.opt.behind():
        p.reporter.event("syncing", f"The swarm is at epoch {p.opt.swarm_epoch()}; downloading its state...",
                         epoch=p.opt.swarm_epoch())  # fmt: skip
        sync(p)
        p.phase("sync")
    note_state(p)


def sync(p: Progress) -> None:
    """Download the swarm's state: only one a strict majority of the run's admitted peers say they hold
    (expected_states), so a download can fail while their statuses straddle an epoch; retried for --join-timeout."""
    deadline, before = time.monotonic() + p.cfg.join_timeout, p.opt.local_epoch
    unheld, moved = None, False  # since when no state has a majority (the others' states differ: they trained apart)
    tries = 0
    while True:
        tries += 1
        p.opt.load_state_from_peers(catch_up=False)
        note_statuses(p)  # the other newcomers' statuses, published as they load, may end what we follow
        if not p.opt.behind() or time.monotonic() > deadline or p.stop.requested:
            break
        # Nobody may give us a state then, and while we sync, a pair of the others does not average (the pair rule
        # counts us), so their states stay apart: 36-52 s in the SIGKILL-and-restart test until our progress
        # record expired. After schedule.unheld_state_wait we move to the majority's epoch as we are and train.
        held = expected_states(p)
        unheld = None if held else (unheld or time.monotonic())
        wait = unheld_state_wait(p.spec.averaging.averaging_timeout, STATUS_EVERY)
        moved = unheld is not None and time.monotonic() - unheld >= wait \
            and p.opt.move_to_majority_epoch() is not None
        if moved:
            p.opt.caught_up.clear()  # reported below
            break
        until_new_states(p, held, 1.0)
    # verified: a state was downloaded (only one that matched is ever taken), not merely "nobody is ahead any more"
    # (the swarm may have left). Not "and no longer behind": the swarm could end the epoch between the loop's check
    # and this one, and a verified download was reported unverified (test_a_poisoned_state..., 1 full-suite run).
    verified = p.opt.local_epoch > before and not moved
    # unverified: what the others claimed to hold then (epoch:digest, a few each), for whoever must find out why
    seen = {} if verified else {pid: [c[:14] for c in states] for pid, states in state_claims(p).items()}
    p.reporter.event("synced", f"Synced to epoch {p.opt.local_epoch}" if verified else "No state that a majority "
                     f"of the run's peers hold could be downloaded; training from epoch {p.opt.local_epoch}",
                     epoch=p.opt.local_epoch, verified=verified, tries=tries, moved=moved, claims=seen,
                     refused_states=p.opt.trust_counts().get("refused_states", 0))  # fmt: skip


def announce(p: Progress) -> None:
    """Tell the user how others join, publish our first status, and wait for --wait-for-peers."""
    spec, swarm, cfg = p.spec, p.swarm, p.cfg
    maddrs = swarm.visible_maddrs()
    join = f"python -m atlas_swarm.peer --initial-peers {maddrs[0]} --run {spec.run_id} --data YOUR_DATA"
    skipped = f"; {p.batches.skipped} left out: nothing to predict" if p.batches.skipped else ""
    fit = (f", {cfg.quantize} base" if cfg.quantize != "none" else "") + (", checkpointing" if p.checkpointing else "")
    p.reporter.event(
        "started",
        "\n".join([f"Peer {swarm.peer_id} on run {spec.run_id} ({p.device}, {p.precision}{fit}, batch {p.batch_size}, "
                   f"micro-batch {p.micro}, {len(p.batches)} local examples{skipped})", "Multiaddrs:"]
                  + [f"  {a}" for a in maddrs] + ["Others join with:", f"  {join}"]),
        peer_id=swarm.peer_id, run_id=spec.run_id, maddrs=maddrs, join_command=join, device=p.device,
        precision=str(p.precision), quantize=cfg.quantize, checkpointing=p.checkpointing, batch_size=p.batch_size, micro_batch=p.micro, examples=len(p.batches),
        skipped_examples=p.batches.skipped, epoch=p.opt.local_epoch, startup_s=p.startup,
    )  # fmt: skip
    publish_status(p)
    if cfg.wait_for_peers > 1:  # our status records appear at once (hivemind lists a peer after its first samples)
        # each read noted at once: a liar's progress record one epoch ahead, read as our wait ends, was followed
        # as a majority of one before the statuses of the peers waited for with us were noted (README, Known limits)
        _wait_for_peers(lambda: note_statuses(p), cfg.wait_for_peers, cfg.join_timeout, p.stop, p.reporter)


def finish_epoch(p: Progress, done: EpochDone) -> None:
    """An epoch ended: report it, run the hooks (proof, publisher), save every --save-every epochs."""
    tensors = adapter_state(p.model)
    r = done.round
    record = EpochRecord(p.spec.run_id, p.swarm.peer_id, done.ended, done.epoch, done.samples, done.group,
                         tensors_hash(tensors), tensors,
                         weights=tuple(r.weights) if r else (), flagged=tuple(r.flagged) if r else (),
                         result_hash=r.result_hash if r else "", clients=tuple(r.clients) if r else ())  # fmt: skip
    flagged = done.round.flagged if done.round is not None else ()
    p.outliers, p.last_outliers = p.outliers + len(flagged), flagged
    note_state(p)
    if len(done.group) >= 2:
        p.rounds_averaged += 1
    elif p.opt.swarm_progress()["peers"] > 1:
        p.rounds_failed += 1  # others were there, but no group formed (or the all-reduce failed)
    with_whom = f"averaged with {len(done.group)} peers" if done.group else "local gradients only"
    if flagged:
        with_whom += f" ({len(flagged)} outlier{'s' if len(flagged) > 1 else ''} clipped: {', '.join(flagged)})"
    p.reporter.event("epoch", f"Epoch {done.epoch}: contributed {done.samples} samples, {with_whom}",
                     epoch=done.epoch, samples=done.samples, group=list(done.group),
                     adapter_hash=record.adapter_hash, averaging_s=round(done.seconds, 3),
                     rule=r.rule if r else None, weights=dict(zip(r.group, r.weights)) if r else {},
                     kept=dict(zip(r.group, r.kept)) if r else {}, outliers=list(flagged),
                     dropped=dict(r.dropped) if r else {}, relayed=dict(r.relayed) if r else {},
                     aggregate_hash=r.result_hash if r else "",
                     round_s=[round(x, 4) for x in r.seconds] if r else [],
                     state_s=round(done.state[0], 3) if done.state else None,
                     state_group=list(done.state[1]) if done.state else None)  # fmt: skip
    if not finite_adapter(tensors):
        p.reporter.event("nonfinite", f"Epoch {done.epoch}: the adapter holds NaN or infinite values; not proved, "
                         f"published or saved (the swarm's state is downloaded when there is one)", epoch=done.epoch)
        return
    for hook in p.hooks:
        hook(record)
    if done.epoch % p.cfg.save_every == 0:
        p.epoch = done.epoch
        save(p, record.adapter_hash)
        p.reporter.event("saved", "", path=str(p.saved), epoch=done.epoch)


def finish_run(p: Progress) -> None:
    """--max-epochs reached: the peers stopping at this epoch agree on one adapter (a peer that missed the last
    round downloads it); every finisher of an agreed adapter publishes it (equal adapters, equal CIDs)."""
    epoch = p.opt.local_epoch
    if not finite_adapter(adapter_state(p.model)):
        p.opt.load_state_from_peers(catch_up=False)  # only a state a majority of the run's admitted peers hold
        if not finite_adapter(adapter_state(p.model)):
            p.reporter.event("final", "The final adapter holds NaN or infinite values and no verified state could "
                             "be downloaded: nothing agreed, published or saved", agreed=False, nonfinite=True)
            return
    agreement = agree_on_final_adapter(
        p.swarm, p.opt, p.spec.run_id, epoch, lambda: tensors_hash(adapter_state(p.model)),
        lambda h: (note_state(p), publish_status(p, final=h)), p.cfg.join_timeout, lambda: p.stop.requested)  # fmt: skip
    p.reporter.event(
        "final", f"Final adapter {agreement.adapter_hash[:12]}: "
        + ("agreed by all " if agreement.agreed else "NOT agreed by all ") + f"{agreement.peers} finishing peers"
        + (" (downloaded)" if agreement.downloaded else "")
        + (f" (each held its own; one more state round of {agreement.reaveraged})" if agreement.reaveraged else ""),
        **agreement.__dict__)  # fmt: skip
    if p.publisher is not None and agreement.agreed:
        p.publisher.finish(p.model, epoch, agreement.adapter_hash, p.cfg.join_timeout, p.reporter)


def leave(p: Progress) -> None:
    """Whatever happened: save the adapter, tell finishing peers not to wait for us, post what proofs we can in the
    time we have, and stop every process we started. A peer asked to stop was promised an exit within 10 s: each
    step then gets what is left of that (stop.budget); a finishing peer waits longer for its last proofs."""
    p.stop.leaving()
    p.reporter.close()
    if p.gatekeeper is not None:
        p.gatekeeper.close()
    try:
        if p.opt is not None and finite_adapter(adapter_state(p.model)):  # a non-finite one is never saved
            p.stop.step = "saving the adapter"
            p.epoch = p.opt.local_epoch
            save(p)
    finally:
        if p.opt is not None:
            p.stop.step = "publishing its leaving status"
            try:
                publish_status(p, leaving=True)  # finishing peers stop waiting for us
            except Exception:
                pass  # best effort: the record expires on its own
        if p.chain is not None:  # what is not settled stays in the receipt box for the next start
            p.stop.step = "settling receipts"
            counts = p.chain.close(p.stop.budget(3.0) if p.stop.requested else FINAL_FLUSH)
            p.reporter.event("receipts", f"Receipts: {counts.posted} settled, {counts.collecting} still collecting "
                             f"signatures (settled on the next start), {counts.unpaid} without a majority, "
                             f"{counts.rejected} rejected, {p.chain.unpaid_solo} solo epochs (not paid); checkpoints "
                             f"on chain: {sorted(p.chain.recorded) or 'none'}", **counts.__dict__,
                             solo=p.chain.unpaid_solo,
                             checkpoints={str(e): c for e, c in p.chain.recorded.items()})  # fmt: skip
        if p.opt is not None:
            p.stop.step = "stopping the averagers"
            p.opt.shutdown(p.stop.budget(1.0) if p.stop.requested else None)
        if p.swarm is not None:
            p.stop.step = "stopping the DHT and its p2p daemon"
            p.swarm.shutdown(p.stop.budget(3.0) if p.stop.requested else None)
        p.stop.uninstall()


def finite_adapter(tensors: dict) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors.values())


def save(p: Progress, adapter_hash: Optional[str] = None) -> None:
    """The adapter (a stock PEFT folder) and the optimizer state, each replaced atomically."""
    if adapter_hash is None:
        adapter_hash = tensors_hash(adapter_state(p.model))
    meta = {"run_id": p.spec.run_id, "epoch": p.epoch, "samples_total": p.samples_total,
            "adapter_hash": adapter_hash, "peer_id": p.swarm.peer_id, "base_model": p.spec.model.base}  # fmt: skip
    p.saved = save_adapter(p.model, p.out / "adapter", meta)
    tmp = p.out / "optimizer.pt.tmp"
    torch.save(p.opt.state_dict(), tmp)
    os.replace(tmp, p.out / "optimizer.pt")


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


def _load_optimizer_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{str(path)!r} is corrupted ({e}); delete it to restart the optimizer state.") from None



def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    reporter = Reporter(args.log_format if args.log_format in ("rich", "json", "plain") else "plain")

    def report(e: Exception) -> None:
        reporter.close()
        reporter.event("error", f"error: {e}", error=str(e), kind=type(e).__name__)

    return run_cli(lambda: run(config_from_args(args), reporter) and 0, verbose=args.verbose, report=report)


if __name__ == "__main__":
    sys.exit(main())
