"""hivemind.Optimizer over the adapter parameters, recording what each epoch contributed.

hivemind averages gradients with weight = samples accumulated, so a peer stepping with batch 16 counts 4x a peer
with batch 4. After every epoch transition an ``EpochDone`` says how many samples this peer put in and with whom it
averaged: the seam where receipts (and checkpoints) hook in.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional, Sequence

import hivemind
import torch
from hivemind.averaging.control import AveragingStage
from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.utils import get_dht_time

from atlas_swarm.admission import epoch_ceiling
from atlas_swarm.config import RunSpec
from atlas_swarm.swarm import schedule
from atlas_swarm.swarm.averagers import GradAverager, StateAverager, cancel_round
from atlas_swarm.swarm.codec import COMPRESSION
from atlas_swarm.swarm.gate import Gate
from atlas_swarm.swarm.node import Swarm
from atlas_swarm.swarm.records import STATUS_EVERY
from atlas_swarm.swarm.rounds import RoundReport, Settings
from atlas_swarm.swarm.stragglers import CUT_OFF
from atlas_swarm.swarm.tracker import ThrottledTracker

log = logging.getLogger("hivemind.optim.optimizer")  # our status lines beside hivemind's (--verbose)

@dataclass(frozen=True)
class EpochDone:
    ended: int  # the epoch this peer's samples went into (its receipt's epoch)
    epoch: int  # the epoch the swarm moved to
    samples: int  # samples this peer accumulated into the step that ended the epoch
    group: tuple[str, ...]  # PeerIDs whose gradients were aggregated, this peer's too (empty: local gradients)
    seconds: float  # wall time of the transition: the round, optimizer step, state averaging when due
    round: Optional[RoundReport] = None  # the gradient round: weights, what was kept, outliers, dropped members
    state: Optional[tuple[float, tuple[str, ...]]] = None  # the state round: its seconds and group (() if none formed)


class InlineExecutor:
    """The part of concurrent.futures.Executor that hivemind's state averager uses, running each task in the caller's
    thread. hivemind runs the optimizer step (and the state round) in a helper thread even when nothing is delayed, and
    the caller just waits for it. On CPU that cost far more than the step: torch's ops in a second thread start a
    second OpenMP thread pool, and once libgomp manages more threads than there are cores it stops spin-waiting in
    every pool (``do_spin`` uses the throttled spin count). From then on each parallel region of the training thread
    waits for its worker to be woken through a futex. Measured on a lone MiniLM peer (2 cores): the OpenMP worker was
    on-CPU 63-75 % of the time instead of 99 % (a plain loop), the training thread 93 % instead of 100 %."""

    def submit(self, fn, *args, **kwargs) -> Future:
        future: Future = Future()
        # KeyboardInterrupt (the stop watchdog) propagates, as it did from the waiting caller; hivemind's _do
        # swallows it while it waits for a state round, which is then abandoned
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as e:
            future.set_exception(e)
        return future

    def shutdown(self, wait: bool = True, **kwargs) -> None:
        pass


class SwarmOptimizer(hivemind.Optimizer):
    """hivemind.Optimizer that queues an EpochDone per transition (drained by the training loop)."""

    def __init__(self, *, gather_settings: Optional[Settings] = None, **kwargs):
        self.gather_settings = gather_settings or Settings()
        self.completed: list[EpochDone] = []
        self.should_stop: Callable[[], bool] = lambda: False  # the peer was asked to stop: abandon rounds at once
        self._group: tuple[str, ...] = ()
        self._round: Optional[RoundReport] = None
        self._epoch_began: Optional[float] = None  # time.monotonic() of the last transition
        self._epoch_seconds = math.inf  # how long the last whole epoch took
        self.final_epoch: Optional[int] = None  # the peer stops at this epoch (--max-epochs): see _update_global_epoch
        self.caught_up: list[int] = []  # epochs this peer moved to without a state (_catch_up_without_state)
        self._behind_since: Optional[float] = None
        super().__init__(**kwargs)
        self.state_averager.should_stop = lambda: self.should_stop()
        self.state_averager.swarm_epoch = self._swarm_epoch
        if not (self.delay_optimizer_step or self.delay_state_averaging):  # the caller would wait anyway: see above
            self.state_averager.step_executor.shutdown()
            self.state_averager.step_executor = InlineExecutor()

    def _update_global_epoch(self, grad_scaler) -> None:
        samples = self.grad_averager.local_samples_accumulated if self.grad_averager is not None else 0
        ended = self.local_epoch
        self._group, self._round = (), None
        self.state_averager.skip_round, self.state_averager.last_round = False, None
        t0 = time.perf_counter()
        # The transition into a peer's final epoch averages the state too, whatever average_state_every says: the
        # peers stopping there then hold bit-identical parameters, so their final vote counts real agreement. After
        # gradient rounds alone, peers whose Adam moments drifted apart (one missed a round and stepped on its own
        # gradients) step the same averaged gradient to different parameters, and three such peers left the run
        # with three adapters (test_consensus, drifted moments). hivemind decides on next_epoch % every == 0.
        every, next_epoch = self.average_state_every, max(self.local_epoch + 1, self.tracker.global_epoch)
        self._drop_stale_state_round(next_epoch)
        if next_epoch == self.final_epoch:
            self.average_state_every = next_epoch
        if not (self.tracker.global_progress.num_peers > 1 and next_epoch % self.average_state_every == 0
                and not self.state_averager.averaging_in_progress):  # fmt: skip
            self._drop_stale_state_round(None)  # this transition averages no state (hivemind's test, just below)
        try:
            super()._update_global_epoch(grad_scaler)
        finally:
            self.average_state_every = every
            if self.grad_averager is not None:
                self.grad_averager.local_mean = None  # the fallback's gradient, for this transition only
        self.tracker.began = (self.local_epoch, get_dht_time())  # the others' records at this epoch count from here
        self.completed.append(EpochDone(ended, self.local_epoch, samples, self._group, time.perf_counter() - t0,
                                        self._round, self.state_averager.last_round))  # fmt: skip
        now = time.monotonic()
        if self._epoch_began is not None:
            self._epoch_seconds = now - self._epoch_began
        self._epoch_began = now
        # every peer is at this boundary now: look for the next epoch's groups together (see _time_to_look)
        self._maybe_schedule_gradient_averaging()
        self._maybe_schedule_state_averaging()

    def _average_gradients_and_load_into_optimizer(self, maybe_step_control) -> None:
        if maybe_step_control is not None:
            self._give_up_without_a_group(maybe_step_control)
            self._abandon_if_stopping(maybe_step_control)
        super()._average_gradients_and_load_into_optimizer(maybe_step_control)
        if maybe_step_control is not None and maybe_step_control.done() and not maybe_step_control.cancelled():
            try:
                result = maybe_step_control.result(0)
                self._group = tuple(sorted(p.to_base58() for p in result))
                self._round = getattr(result, "report", None)
            except BaseException:
                self._group, self._round = (), None
        dropped = getattr(self._round, "dropped", None) or {}
        self.state_averager.note_late(p for p, why in dropped.items() if why.startswith(CUT_OFF))

    # hivemind pre-schedules an averaging round (matchmaking in the averager and DHT processes) before every epoch's
    # end, even when the tracker sees no other peer, and cancels it at the boundary. A lone peer pays for that in CPU
    # its training needs. Skip the pre-scheduling while alone: with company, _update_global_epoch averages anyway
    # (it starts an unscheduled round when none was scheduled).
    def _alone(self) -> bool:
        return self.tracker.global_progress.num_peers <= 1

    def _peers(self) -> int:
        return self.tracker.global_progress.num_peers

    # hivemind pre-schedules a round once the epoch's estimated end is within matchmaking_time, and the group forms
    # matchmaking_time later. Estimates err by seconds and differ between peers (each sees the others' progress
    # through the DHT, late, and nothing at all between a transition and its next fetch), so in bench_averaging
    # groups formed after the epoch had ended (everyone waited for them), or without a peer that started looking a
    # second or more after the others (4 peers: groups of 3+1 and 2+2; the odd ones out timed out or averaged part
    # of the tensors). Instead, look for the group as early as the round allows: at the transition itself when the
    # next epoch should end within schedule.horizon(). Peers leave an epoch within a step of each other, so they all
    # look at once and form one group, which then waits for its members' triggers. Later joiners miss that round
    # (hivemind's window was matchmaking_time) and average from the next one.
    # The state override also drops hivemind's wait for a first timing of a pre-scheduled state round: it only
    # timed pre-scheduled rounds, so it never pre-scheduled one.
    # Right after a transition the tracker knows nothing until its next fetch: the last epoch's length stands in,
    # and at this peer's first transition (a newcomer's too) the time the swarm takes at the peers' summed rate as
    # last fetched. Without that, a newcomer looked for its first group mid-epoch, after the others' group had
    # assembled at the transition, and missed it (late-joiner test: in no group at all); estimated from this peer's
    # own rate times the peers (as it was until 2026-12-05), a peer still slow from its start-up (28.6-31.7
    # samples/s against the others' 150-460) expected a 15-s epoch at its first transition, past the horizon, and
    # began looking 2.7 s after the others (receipt test, 1 run: left out of their group).
    # A round's search declares the epoch's estimated end (plus a margin) as its end, not the look plus
    # matchmaking_time: hivemind's leader assembles its group then, and a peer that looked later was left out
    # (swarm/hold.py: the leader's own rule assembles it earlier). The maths: swarm/schedule.py.
    def _to_epoch_end(self) -> float:
        since = None if self._epoch_began is None else time.monotonic() - self._epoch_began
        return schedule.seconds_to_epoch_end(
            self.tracker.estimated_next_update_time - get_dht_time(), since, self._epoch_seconds, self._peers(),
            self.tracker.performance_ema.samples_per_second, self.tracker.target_batch_size,
            self.tracker.swarm_rate)  # fmt: skip

    def _time_to_look(self, delay: float = 0.0) -> bool:
        return schedule.time_to_look(self._peers(), self._to_epoch_end(), delay,
                                     schedule.horizon(self.averaging_timeout, self.matchmaking_time))  # fmt: skip

    def _search_end(self, delay: float = 0.0) -> float:
        """The DHT time a round's search declares as its end (schedule.search_ends_in; see swarm/hold.py)."""
        return get_dht_time() + schedule.search_ends_in(self._to_epoch_end() + delay, self.matchmaking_time,
                                                        self.averaging_timeout, self.client_mode)  # fmt: skip

    @staticmethod
    def _free(control) -> bool:  # no pending pre-scheduled round
        return control is None or control.triggered or control.done()

    # Every gradient round gathers the epoch it ends, so groups form only among rounds for the same epoch (see
    # averagers.EpochGroups); the state rounds gather it already (hivemind's and ours below).
    def _maybe_schedule_gradient_averaging(self) -> None:
        if self._time_to_look() and self._free(self.scheduled_grads):
            log.log(self.status_loglevel, "Pre-scheduling gradient averaging round")
            self.scheduled_grads = self._schedule_gradient_round()

    def _begin_averaging_gradients(self, grad_scaler) -> bool:
        if self.scheduled_grads is None and not self._alone():  # hivemind's own round here would gather nothing
            self.scheduled_grads = self._schedule_gradient_round()
        return super()._begin_averaging_gradients(grad_scaler)

    def _schedule_gradient_round(self):
        return self.grad_averager.schedule_step(self._search_end(), timeout=self.averaging_timeout,
                                                gather=self.local_epoch + 1)  # fmt: skip

    # A round that has no group when its epoch ends may still get one (hivemind assembles a group some time after
    # its leader's declared time), but once the swarm has moved to the next epoch it cannot: its groupmates-to-be
    # averaged without it. hivemind would look on until the round's deadline (averaging_timeout) while the swarm
    # moves on; the peer would then be behind, download state mid-epoch and miss the next group too. Give up then,
    # step on local gradients (and skip a state round due now), and look for the next groups with the others. The
    # tracker's view of the swarm is frozen during a transition (hivemind holds its lock), so this reads the peers'
    # progress records itself. IDLE counts as looking: hivemind's step() returns a moment before the averager process
    # sets LOOKING_FOR_GROUP, and a round scheduled at the transition was read then and waited for until
    # averaging_timeout (a WAN late joiner that synced as the swarm's round began: 20.0 s alone, 1 of 2 runs).
    def _give_up_without_a_group(self, control) -> None:
        next_check = 0.0
        while control.stage in (AveragingStage.IDLE, AveragingStage.LOOKING_FOR_GROUP) and not control.done() \
                and get_dht_time() < control.deadline:  # (an averager that never takes the round: until its deadline)
            if self.should_stop():
                return  # _abandon_if_stopping cancels it
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + 0.5
                if self._swarm_epoch() > self.local_epoch:
                    log.log(self.status_loglevel, "The swarm averaged this epoch without us: local gradients")
                    cancel_round(control)
                    self.state_averager.skip_round = True  # and its state round too, if one is due
                    return
            time.sleep(0.02)

    # A peer asked to stop leaves a round in flight at once: hivemind waits for it up to averaging_timeout (a frozen
    # groupmate made that 30 s), and catches every exception around that wait, KeyboardInterrupt included, so the
    # stop watchdog cannot cut it short. The peer steps on its local gradients and skips the state round due now.
    def _abandon_if_stopping(self, control) -> None:
        deadline = time.monotonic() + self.averaging_timeout
        while not control.done() and time.monotonic() < deadline:
            if self.should_stop():
                log.log(self.status_loglevel, "Stopping: leaving the averaging round in progress")
                cancel_round(control)
                self.state_averager.skip_round = True
                return
            try:
                control.result(timeout=0.1)
            except BaseException:
                pass  # a failed round is hivemind's to report, a timeout is the next check

    # A peer out of sync (the swarm moved past the epoch its round was for) downloads state, and hivemind first has its
    # pre-scheduled gradient round "tag along with zero weight", waiting up to averaging_timeout for it. A round still
    # looking for its group then has nobody to find: its groupmates-to-be averaged that epoch already. The peer stood
    # still for the whole timeout (15 s in the tests) and fell further behind: a full suite's samples-liar and receipt
    # tests (2 of 4 full runs, CI stop 43). Such a round is cancelled; one whose group formed still tags along.
    def _tag_along_with_zero_weight(self, control) -> None:
        if control.stage in (AveragingStage.IDLE, AveragingStage.LOOKING_FOR_GROUP):
            log.log(self.status_loglevel, "Not tagging along: the round is still looking for a group, cancelled")
            cancel_round(control)
            return
        super()._tag_along_with_zero_weight(control)

    def load_state_from_peers(self, catch_up: bool = True, **kwargs):
        super().load_state_from_peers(**kwargs)
        if catch_up:  # the peer's startup sync waits --join-timeout for a verified state instead
            self._catch_up_without_state()

    # A peer behind the swarm takes only a state that a strict majority of the run's peers hold (verified downloads).
    # After rounds that failed, honest peers' states can differ with no majority: a peer that fell two epochs behind
    # (hivemind catches up one epoch by itself) then found nothing to download and stayed behind for good, trying
    # again at every step, while the pair rule kept its two groupmates-to-be from averaging as a pair (3 CLI peers,
    # test_consensus: 60 s at epoch 0, 1,200 one-sample steps). After schedule.unheld_state_wait (10 s, or
    # averaging_timeout if shorter) without a verified state, it moves to the epoch a strict majority of the other
    # peers it follows have reached (one liar cannot raise that) with its own parameters; the next state round
    # averages them with the others'.
    def _catch_up_without_state(self) -> None:
        if self._majority_epoch() is None:
            self._behind_since = None
            return
        now = time.monotonic()
        if self._behind_since is None:
            self._behind_since = now
        elif now - self._behind_since >= schedule.unheld_state_wait(self.averaging_timeout, STATUS_EVERY):
            self.move_to_majority_epoch()
            self._behind_since = None

    def _majority_epoch(self) -> Optional[int]:
        """The epoch a strict majority of the other followed peers has reached, if above ours."""
        epochs = [r["epoch"] for pid, r in self._followed().items() if pid != self.tracker.own_peer_id]
        target = epoch_ceiling(epochs, slack=0)
        return target if target is not None and target > self.local_epoch else None

    def move_to_majority_epoch(self) -> Optional[int]:
        """Move to the majority's epoch with this peer's own parameters (no state to download); the epoch, or None
        if no majority is ahead."""
        target = self._majority_epoch()
        if target is not None:
            log.log(self.status_loglevel, f"No verified state to download: moving to epoch {target} as we are")
            self.state_averager.local_epoch = target
            self.tracker.report_local_progress(local_epoch=target, samples_accumulated=0)
            self.caught_up.append(target)
        return target

    def _followed(self) -> dict[str, dict]:
        """The progress records this peer follows, read now (the tracker's view is frozen during a transition)."""
        found = self.dht.get(self.tracker.training_progress_key, latest=True)
        return self.tracker.followed_records(found.value if found is not None else None)

    def _swarm_epoch(self) -> int:
        """The highest epoch in the progress records this peer follows (-1 if none can be read)."""
        return schedule.highest_epoch(self._followed().values())

    def average_final_state(self, timeout: float, should_stop: Callable[[], bool]) -> tuple[str, ...]:
        """The finishers' extra state round (swarm/consensus.py); its group's PeerIDs. A state round pre-scheduled
        for the epoch after this one is cancelled first: an averager looks for one group at a time."""
        if self.scheduled_state is not None and not self.scheduled_state.done():
            cancel_round(self.scheduled_state)
        self.scheduled_state = None
        return self.state_averager.average_once(timeout, should_stop)

    _state_epoch: Optional[int] = None  # the epoch the pre-scheduled state round (scheduled_state) gathers

    def _drop_stale_state_round(self, epoch: Optional[int]) -> None:
        """Cancel a pre-scheduled state round that gathers another epoch than ``epoch``, the one this peer's next
        transition enters. It gathers the epoch it was scheduled for; a peer that moved on outside a transition (a
        download: hivemind drops its gradient round then, not its state round) took it into a later transition,
        where it looked for its group under a key nobody else used until its timeout: 28-30 s of the Ctrl-C test's
        pair, in 3 of 6 runs with the debug log and in 2 full-suite runs. ``epoch`` None: any pre-scheduled state
        round, which a transition that averages no state would otherwise cancel hivemind's way (cancel_round says
        why not: its averager could go on looking for that group and hold the finishers' extra round after it)."""
        if self.scheduled_state is not None and (epoch is None or self._state_epoch != epoch):
            if not self.scheduled_state.done():
                cancel_round(self.scheduled_state)
            self.scheduled_state = None

    def _maybe_schedule_state_averaging(self) -> None:
        if self.final_epoch is not None and self.local_epoch >= self.final_epoch:
            return  # no epoch follows the last (the finishers' extra round, if any, is average_final_state)
        next_epoch = schedule.state_round_epoch(self.local_epoch, self.tracker.global_epoch, self.average_state_every,
                                                self.final_epoch)  # fmt: skip
        self._drop_stale_state_round(next_epoch)
        if next_epoch is None or self.state_averager.averaging_in_progress:
            return
        delay = self.delay_before_state_averaging.ema_seconds_per_sample  # the gradient round before it
        if self._time_to_look(delay) and self._free(self.scheduled_state):
            log.log(self.status_loglevel, "Pre-scheduling state averaging round")
            self.scheduled_state = self.state_averager.schedule_step(self._search_end(delay), gather=next_epoch,
                                                                     timeout=self.averaging_timeout)  # fmt: skip
            self._state_epoch = next_epoch

    def next_step(self, batch_size: int) -> tuple[int, bool]:
        """The next step's samples, and whether it runs in fine micro-batches that end it as soon as the swarm's
        epoch is over (``epoch_over``): ``batch_size``, or fewer when the swarm's epoch should end before a whole
        batch would.

        A peer notices the end of an epoch only between its micro-batches, so the group waits for the peer whose
        last micro-batch ends last. Sized to the estimated time left (the swarm's samples/s against the target,
        from the tracker), the last step ends near the boundary for everyone. Never below a quarter batch, so a
        slipping estimate cannot degrade into one-sample steps. hivemind weights each step by its samples, so a
        short step counts for what it holds. bench_averaging, 4 CPU peers sharing 2 cores (batch 8, about 1 s per
        step), two runs each way: the wait for the last peer was 0.10-0.16 s on average (at most 0.49 s) against
        0.20-0.21 s (at most 0.85 s) with whole batches; the averaging share 3.1-3.5 % against 4.1-4.2 %. Steps
        near the end then run in micro-batches of 2 (schedule.fine_step) and stop once the epoch is over.
        """
        left = self.tracker.estimated_next_update_time - get_dht_time()  # 0 once the epoch is over
        rate = self.tracker.performance_ema.samples_per_second
        return (schedule.last_step_samples(batch_size, self._peers(), rate, left),
                schedule.fine_step(batch_size, self._peers(), rate, left))  # fmt: skip

    def epoch_over(self) -> bool:
        """With company: has the swarm's epoch ended (the step in progress should end now)?"""
        return self._peers() > 1 and self.tracker.ready_to_update_epoch

    def _make_state_averager(self, **kwargs) -> StateAverager:  # hivemind 1.1.12's, with our StateAverager
        return StateAverager(dht=self.dht, prefix=f"{self.run_id}_state_averager",
                             min_matchmaking_time=self.matchmaking_time, allreduce_timeout=self.allreduce_timeout,
                             shutdown_timeout=self.shutdown_timeout, offload_optimizer=self.offload_optimizer,
                             custom_gradients=self.offload_optimizer, status_loglevel=self.status_loglevel,
                             next_chunk_timeout=self.next_chunk_timeout, client_mode=self.client_mode,
                             auxiliary=self.auxiliary, start=True, gather_settings=self.gather_settings,
                             **kwargs)  # fmt: skip

    def _make_gradient_averager(self, factory, **kwargs) -> GradAverager:
        factory = factory or partial(GradAverager, gather_settings=self.gather_settings)
        return super()._make_gradient_averager(factory, **kwargs)

    def _make_progress_tracker(self, target_batch_size: int, **kwargs) -> ProgressTracker:
        s = self.gather_settings
        return ThrottledTracker(dht=self.dht, prefix=self.run_id, target_batch_size=target_batch_size,
                                client_mode=self.client_mode, status_loglevel=self.status_loglevel, start=True,
                                gate=s.gate, own_peer_id=s.own_peer_id, sample_cap=s.cap, **kwargs)  # fmt: skip

    # -- the public surface peer.py uses (plain values; hivemind's objects stay in here) ---------------------------
    def take_completed(self) -> list[EpochDone]:
        """The epoch transitions since the last call, oldest first."""
        done = list(self.completed)
        del self.completed[: len(done)]
        return done

    def resume(self, epoch: int) -> None:
        """Continue from a local checkpoint of ``epoch`` (before any step)."""
        self.state_averager.local_epoch = epoch

    def swarm_epoch(self) -> int:
        """The swarm's epoch: the highest in the progress records this peer follows, read now (the tracker's view
        can be a fetch old, from before the statuses that bound it were known)."""
        return max(self._swarm_epoch(), self.local_epoch)

    def behind(self) -> bool:
        return self.swarm_epoch() > self.local_epoch

    def samples_per_second(self) -> float:
        """This peer's training rate (hivemind's moving average), 0 before the first steps."""
        return float(self.tracker.performance_ema.samples_per_second)

    def restart_rate_clock(self) -> None:
        """Count the rate from now. The tracker counts from its creation: a first peer that waited 12 s for company
        reported half its rate for its first epoch (the estimate weights its first step heavily), and the others
        planned the epoch's end from it."""
        self.tracker.performance_ema.reset_timer()

    def shutdown(self, timeout: Optional[float] = None) -> None:
        """hivemind's shutdown; with ``timeout`` (a peer asked to stop), no part waits longer than that: a round in
        flight is cancelled, not finished with zero weight (hivemind waits up to averaging_timeout for it), and the
        tracker and averager processes get ``timeout`` each before they are terminated."""
        if timeout is None:
            return super().shutdown()
        self.tracker.shutdown(timeout)
        for control in (self.scheduled_grads, self.scheduled_state):
            if control is not None and not control.done():
                cancel_round(control)
        for averager in (self.state_averager, self.grad_averager if self.use_gradient_averaging else None):
            if averager is not None and averager.is_alive():
                averager.shutdown_timeout = timeout
                averager.shutdown()

    def note_statuses(self, epochs: dict) -> None:
        """The admitted peers' status epochs (PeerID -> epoch): peers that have not stepped yet count in the
        electorate that bounds which progress epochs are followed (admission.sane_progress)."""
        self.tracker.note_statuses(epochs)

    def trust_counts(self) -> dict[str, int]:
        """What this peer refused or dropped so far (swarm/gate.py's counts), and the progress writers it ignored."""
        counts = self.gather_settings.gate.counts() if self.gather_settings.gate is not None else {}
        return dict(counts, ignored_progress_writers=len(self.tracker.ignored_writers))

    def swarm_progress(self) -> dict:
        p = self.tracker.global_progress
        return {
            "epoch": p.epoch,
            "samples": p.samples_accumulated,
            "target": p.target_batch_size,
            "peers": p.num_peers,
        }


def make_optimizer(
    swarm: Swarm, spec: RunSpec, params: Sequence[torch.nn.Parameter], batch_size: int, verbose: bool = False,
    gate: Optional[Gate] = None,
) -> SwarmOptimizer:
    a, o, t = spec.averaging, spec.optimizer, spec.trust
    cap = t.max_samples_per_peer or a.target_batch_size
    settings = Settings(rule=t.rule, tau=t.clip_tau or None, beta=t.trim, cap=float(cap), signer=swarm.private_key,
                        gate=gate, own_peer_id=swarm.peer_id)  # fmt: skip
    if o.name == "adamw":
        factory = partial(torch.optim.AdamW, lr=o.lr, weight_decay=o.weight_decay)
    else:
        factory = partial(torch.optim.SGD, lr=o.lr, weight_decay=o.weight_decay)
    compression = COMPRESSION[a.compression]()
    # request_timeout must stay below the matchmaking time, or groups fall apart before they form
    request_timeout = max(0.1, min(3.0, a.matchmaking_time / 2))
    return SwarmOptimizer(
        dht=swarm.dht,
        # hivemind 1.1.12 inverts its default (`client_mode if client_mode is None else dht.client_mode`): left None,
        # the optimizer thinks itself reachable while its averagers (which read the DHT's flag) are in client mode,
        # and its first epoch crashed setting a state-sharing priority (ValueError; a --client-mode peer behind NAT)
        client_mode=swarm.dht.client_mode,
        run_id=spec.run_id,
        target_batch_size=a.target_batch_size,
        batch_size_per_step=batch_size,
        optimizer=factory,
        params=list(params),
        matchmaking_time=a.matchmaking_time,
        averaging_timeout=a.averaging_timeout,
        load_state_timeout=max(30.0, a.averaging_timeout),
        average_state_every=a.average_state_every,
        # parameters only, not Adam's moments: peers that average gradients together update their moments with the
        # same averaged gradient, so the moments only drift after a missed round (by (1 - beta) of one gradient,
        # then decaying), and the parameter averaging below bounds what that drift does. Moments would triple the
        # state round's bytes: with them, state rounds took 0.35-0.8 s instead of 0.19-0.36 s (bench_averaging, 2
        # peers). A peer that downloads state (late joiner, out of sync) still gets the moments.
        average_opt_statistics=(),
        # synchronous state averaging: the all-reduce runs inside step() every average_state_every epochs (its group
        # formed during the epoch, see schedule.horizon). The background variant (hivemind's default) once left a
        # peer with another adapter after the final agreement (1 run in 3); see README "Known limits". Synchronous
        # also lets the optimizer step run in the training thread (InlineExecutor).
        delay_state_averaging=False,
        grad_compression=compression,
        state_averaging_compression=compression,
        averager_opts={"request_timeout": request_timeout},
        # our identity signs the tracker's records too (a DHT keeps one RSASignatureValidator). A lone peer looks for
        # others every second instead of hivemind's 3 s, so newcomers are averaged with from their first epoch. The
        # swarm's progress is fetched at least every 2 s (hivemind: 10 s; a newcomer that saw a slow start trained
        # 10 s on a stale view, ended the epoch alone and cost the next round its group) and every 0.2 s in an
        # epoch's last moments (hivemind: 0.5 s), so peers see the epoch end closer together.
        tracker_opts={"private_key": swarm.private_key, "default_refresh_period": 1.0,
                      "max_refresh_period": 2.0, "min_refresh_period": 0.2},
        shutdown_timeout=3.0,
        verbose=verbose,
        gather_settings=settings,
    )

