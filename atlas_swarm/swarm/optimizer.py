"""hivemind.Optimizer over the adapter parameters, recording what each epoch contributed.

hivemind averages gradients with weight = samples accumulated, so a peer stepping with batch 16 counts 4x a peer
with batch 4. After every epoch transition an ``EpochDone`` says how many samples this peer put in and with whom it
averaged: the seam where contribution proofs (and checkpoints) hook in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Sequence

import hivemind
import torch
from hivemind.compression import Float16Compression, NoCompression, ScaledFloat16Compression, Uniform8BitQuantization
from hivemind.optim.progress_tracker import ProgressTracker

from atlas_swarm.config import RunSpec
from atlas_swarm.swarm.node import Swarm

COMPRESSION = {
    "none": NoCompression,
    "float16": Float16Compression,
    "scaled-float16": ScaledFloat16Compression,
    "uniform8bit": Uniform8BitQuantization,
}


@dataclass(frozen=True)
class EpochDone:
    epoch: int  # the epoch the swarm moved to
    samples: int  # samples this peer accumulated into the step that ended the previous epoch
    group: tuple[str, ...]  # PeerIDs that averaged gradients together (empty: proceeded with local gradients)
    seconds: float  # wall time of the transition: all-reduce, optimizer step, state averaging when due


class ThrottledTracker(ProgressTracker):
    """hivemind's ProgressTracker stores a DHT record after every local step; this one at most every ``report_every``
    seconds, and at once when the step completes the target batch or starts a new epoch.

    Each report wakes four threads and the DHT process (executor, event loop, fd sharing, the signing store, the
    reply): on 2 cores each wake-up can preempt the training thread. Measured on a lone MiniLM peer, the training
    thread was off-CPU 5.8 % of the time with per-step reports and 4.5 % without (a plain loop: 0 %). Peers
    extrapolate each other's progress from the reported samples/s, so a report up to a second late changes no
    estimate that matters; the report that completes an epoch is never delayed.
    """

    report_every = 1.0

    def __init__(self, *args, **kwargs):
        self._last_report = 0.0
        super().__init__(*args, **kwargs)

    def report_local_progress(self, local_epoch: int, samples_accumulated: int, update_global_samples: bool = True):
        extra = samples_accumulated - self.local_progress.samples_accumulated
        now = time.monotonic()
        due = (
            now - self._last_report >= self.report_every
            or extra <= 0
            or local_epoch != self.local_progress.epoch
            or self.global_progress.samples_accumulated + extra >= self.target_batch_size
        )
        if due:
            self._last_report = now
            return super().report_local_progress(local_epoch, samples_accumulated, update_global_samples)
        # the rest of hivemind 1.1.12's report_local_progress, without waking the reporter
        if update_global_samples and local_epoch == self.local_progress.epoch == self.global_progress.epoch:
            self.global_progress.samples_accumulated += extra
        self.performance_ema.update(task_size=extra)
        self.local_progress = self._get_local_progress(local_epoch, samples_accumulated)


class SwarmOptimizer(hivemind.Optimizer):
    """hivemind.Optimizer that queues an EpochDone per transition (drained by the training loop)."""

    def __init__(self, **kwargs):
        self.completed: list[EpochDone] = []
        self._group: tuple[str, ...] = ()
        super().__init__(**kwargs)
        # hivemind pre-schedules state averaging only once it has timed a pre-scheduled state round, and it times
        # nothing else, so it never does: every state round began matchmaking at the boundary (2.4-4.4 s epochs in
        # bench_averaging). A first guess for the delay (grad all-reduce + optimizer step) starts the cycle; hivemind
        # refines it after each round.
        self.delay_before_state_averaging.update(task_size=1, interval=0.05)

    def _update_global_epoch(self, grad_scaler) -> None:
        samples = self.grad_averager.local_samples_accumulated if self.grad_averager is not None else 0
        self._group = ()
        t0 = time.perf_counter()
        super()._update_global_epoch(grad_scaler)
        self.completed.append(EpochDone(self.local_epoch, samples, self._group, time.perf_counter() - t0))

    def _average_gradients_and_load_into_optimizer(self, maybe_step_control) -> None:
        super()._average_gradients_and_load_into_optimizer(maybe_step_control)
        if maybe_step_control is not None and maybe_step_control.done() and not maybe_step_control.cancelled():
            try:
                self._group = tuple(sorted(p.to_base58() for p in maybe_step_control.result(0)))
            except BaseException:
                self._group = ()

    # hivemind pre-schedules an averaging round (matchmaking in the averager and DHT processes) before every epoch's
    # end, even when the tracker sees no other peer, and cancels it at the boundary. A lone peer pays for that in CPU
    # its training needs. Skip the pre-scheduling while alone: with company, _update_global_epoch averages anyway
    # (it starts an unscheduled round when none was scheduled).
    def _alone(self) -> bool:
        return self.tracker.global_progress.num_peers <= 1

    def _maybe_schedule_gradient_averaging(self) -> None:
        if not self._alone():
            super()._maybe_schedule_gradient_averaging()

    def _maybe_schedule_state_averaging(self) -> None:
        if not self._alone():
            super()._maybe_schedule_state_averaging()

    def _make_progress_tracker(self, target_batch_size: int, **kwargs) -> ProgressTracker:
        return ThrottledTracker(dht=self.dht, prefix=self.run_id, target_batch_size=target_batch_size,
                                client_mode=self.client_mode, status_loglevel=self.status_loglevel, start=True,
                                **kwargs)  # fmt: skip

    def swarm_progress(self) -> dict:
        p = self.tracker.global_progress
        return {
            "epoch": p.epoch,
            "samples": p.samples_accumulated,
            "target": p.target_batch_size,
            "peers": p.num_peers,
        }


def make_optimizer(
    swarm: Swarm, spec: RunSpec, params: Sequence[torch.nn.Parameter], batch_size: int, verbose: bool = False
) -> SwarmOptimizer:
    a, o = spec.averaging, spec.optimizer
    if o.name == "adamw":
        factory = partial(torch.optim.AdamW, lr=o.lr, weight_decay=o.weight_decay)
    else:
        factory = partial(torch.optim.SGD, lr=o.lr, weight_decay=o.weight_decay)
    compression = COMPRESSION[a.compression]()
    # request_timeout must stay below the matchmaking time, or groups fall apart before they form
    request_timeout = max(0.1, min(3.0, a.matchmaking_time / 2))
    return SwarmOptimizer(
        dht=swarm.dht,
        run_id=spec.run_id,
        target_batch_size=a.target_batch_size,
        batch_size_per_step=batch_size,
        optimizer=factory,
        params=list(params),
        matchmaking_time=a.matchmaking_time,
        averaging_timeout=a.averaging_timeout,
        load_state_timeout=max(30.0, a.averaging_timeout),
        average_state_every=a.average_state_every,
        # with the parameters, average Adam's moments too: otherwise peers step differently between syncs
        average_opt_statistics=("exp_avg", "exp_avg_sq") if o.name == "adamw" else (),
        # synchronous state averaging: slower (a matchmaking window inside step() every average_state_every epochs)
        # but the background variant (hivemind's default) once left a peer with another adapter after the final
        # agreement (1 run in 3); see README "Known limits"
        delay_state_averaging=False,
        grad_compression=compression,
        state_averaging_compression=compression,
        averager_opts={"request_timeout": request_timeout},
        # our identity signs the tracker's records too (a DHT keeps one RSASignatureValidator); a lone peer looks for
        # others every second instead of hivemind's 3 s, so newcomers are averaged with from their first epoch
        tracker_opts={"private_key": swarm.identity.private_key, "default_refresh_period": 1.0},
        shutdown_timeout=3.0,
        verbose=verbose,
    )

