"""hivemind's two averagers (hivemind 1.1.12) whose rounds are an all-gather of signed updates and a robust aggregate
(gather.py) among admitted peers only (``Admitted``, ``EpochKeys``), with groups only among rounds for the same epoch
(``EpochGroups``), and cheaper state declarations (below).

Measured with bench_averaging (4 peers on 2 cores, the demo's MiniLM adapter: 26 tensors, 81k values), the gradient
round took 0.35 s from the last peer's arrival and the state round 0.6-1.2 s; an all-reduce of one 80k-value tensor
between 4 idle processes takes 0.04 s. Two causes, fixed here:

- hivemind's all-reduce splits every tensor separately among the peers, so each peer sends, reduces and receives
  about 30 small parts, each with its own compression task in an executor, message and await. One flat buffer
  makes that one message per pair of peers (``flat_buffer``; gather.py sends the buffer whole);
- after every tensor an all-reduce updates, hivemind wakes the loop that declares this peer as a state donor, and
  each wake-up stores the same DHT record again: a lookup across the swarm and a store on each node found, in every
  DHT process while the group is still averaging (``StateAverager``). Nobody downloads the gradient averager's
  state, so it does not declare itself at all.

With both, the same benchmark measured 0.03-0.07 s per gradient round and 0.06-0.12 s per state round.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import math
import time
from typing import AsyncIterator, Optional, Sequence

import torch
from hivemind.averaging.averager import DecentralizedAverager
from hivemind.averaging.control import AveragingStage, StepControl
from hivemind.averaging.key_manager import GroupKeyManager
from hivemind.averaging.matchmaking import PotentialLeaders
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.p2p import P2PContext, P2PDaemonError
from hivemind.proto import averaging_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.mpfuture import MPFuture

from atlas_swarm.swarm.downloads import StateDownloads
from atlas_swarm.swarm.gather import GatherAverage
from atlas_swarm.swarm.hold import FetchingLeaders, hold_open
from atlas_swarm.swarm.rounds import Settings
from atlas_swarm.swarm.tasks import PinsTasks

logger = logging.getLogger("hivemind.averaging.averager")  # hivemind's logger: shown with --verbose


def _retrieve(future) -> None:
    """A background store's outcome, retrieved (no "exception was never retrieved"); a failed declaration is
    retried when it expires."""
    if not future.cancelled() and future.exception() is not None:
        logger.debug(f"declaring this peer as a state donor failed: {future.exception()!r}")


def flat_buffer(shapes: Sequence[torch.Size], dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """Zero tensors of these shapes, consecutive views of one shared-memory buffer on CPU."""
    flat = torch.zeros(sum(math.prod(s) for s in shapes), dtype=dtype).share_memory_()
    views, offset = [], 0
    for shape in shapes:
        n = math.prod(shape)
        views.append(flat[offset : offset + n].view(shape))
        offset += n
    return tuple(views)


class CancelOnShutdown:
    async def _shutdown(self, timeout: Optional[float]) -> None:
        """hivemind 1.1.12's, working with a round in flight: it calls ``finalize`` on each running group's future
        (``AttributeError: '_asyncio.Future' object has no attribute 'finalize'``, a traceback on the terminal of a
        peer stopped mid-round) and would add finalize's None to a set. Here each group's round is cancelled."""
        if not self.client_mode:
            try:
                await self.remove_p2p_handlers(self._p2p, namespace=self.prefix)
            except (OSError, P2PDaemonError) as e:  # p2pd already gone: Ctrl-C in a terminal signals it too
                logger.debug(f"p2pd gone before our handlers were removed ({type(e).__name__}); nothing to remove")
        for future in list(self._running_groups.values()):
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().finalize(cancel=True)
            else:
                future.cancel()


JOIN_LINGER = 5.0  # seconds a leader keeps a follower's join stream open after the group's message (see Admitted)


class Admitted:
    """Matchmaking only with admitted peers (swarm/gate.py): a join request from anyone else is refused, and no
    non-admitted leader is followed. Non-admitted members a leader puts in a group anyway are left out of the round
    (gather.GatherAverage). As a leader, each follower's join stream stays open after the group's message until the
    follower closes it (JOIN_LINGER, below)."""

    async def rpc_join_group(self, request: averaging_pb2.JoinRequest, context: P2PContext
                             ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:  # fmt: skip
        gate = self.gather_settings.gate
        if gate is not None and not gate.admits(context.remote_id.to_base58()):
            gate.count("refused_joins")
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        last = None
        async for message in super().rpc_join_group(request, context):
            yield message
            last = message.code
        if last == averaging_pb2.BEGIN_ALLREDUCE:
            # Keep our end open until the follower closes its own (it does once it has read this message: hivemind
            # then cancels this handler), for at most JOIN_LINGER. Closing at once lost the message now and then:
            # our p2pd closed the stream and then reset it, and a follower whose p2pd had not yet passed the message
            # on got the reset instead. The leader counted it in the group, the follower went on looking alone: a
            # round with one member "sent nothing in time" and that member in no group (bench_averaging, 4 peers on
            # loopback: 2 of 11 runs; with hivemind's debug log, the follower's stream ended 63 ms after the leader
            # assembled, with no message and "stream reset" on both sides).
            await asyncio.sleep(JOIN_LINGER)


class EpochGroups:
    """Groups form only among rounds for the same epoch: the epoch a round gathers (``gather=``, an int) is part of
    its group key, so rounds for different epochs neither find each other in the DHT nor accept each other.

    hivemind keys every round of an averager alike (``prefix.0b``). A peer whose round failed retries it, already
    triggered, until the round's deadline, and in one run it so joined the group that its groupmate had just formed
    for the next epoch, which was not triggered for seconds: the retried round timed out on the groupmate's part, and
    the groupmate's next round then timed out on a peer that had left it. Each spoiled round spoiled the next one, for
    the whole run (bench_averaging, 2 peers: every round 4 or 8 s, hivemind's part timeouts, 58.8 % of epoch time).
    Rounds without an epoch keep hivemind's key. Beside each round, a leader holds its group open for the peers it
    follows, and a searcher fetches the others' declared ends again whenever it may have missed one (swarm/hold.py;
    ``fetch_leaders = False``: hivemind's search, for the test that shows the difference)."""

    fetch_leaders = True

    async def _step(self, *, step, **kwargs):  # runs in the averager's process, where the matchmaking lives
        matchmaking = self._matchmaking
        if not isinstance(matchmaking.group_key_manager, EpochKeys):
            plain = matchmaking.group_key_manager
            matchmaking.group_key_manager = EpochKeys(plain.dht, plain.prefix, plain.group_bits,
                                                      plain.target_group_size, matchmaking, self.serializer,
                                                      self.gather_settings.gate)  # fmt: skip
        if self.fetch_leaders and type(matchmaking.potential_leaders) is PotentialLeaders:
            matchmaking.potential_leaders.__class__ = FetchingLeaders
        gate = self.gather_settings.gate
        holding = asyncio.create_task(hold_open(matchmaking, step, gate.followed if gate is not None else frozenset))
        try:
            return await super()._step(step=step, **kwargs)
        finally:
            holding.cancel()


class EpochKeys(GroupKeyManager):
    """The group key of the round being looked for (hivemind's matchmaking looks for one group at a time), with its
    epoch in the prefix: hivemind's keys must match ``prefix.0b[01]*``. Only admitted peers are found as leaders."""

    def __init__(self, dht, prefix, initial_group_bits, target_group_size, matchmaking=None, serializer=None,
                 gate=None):  # fmt: skip
        super().__init__(dht, prefix, initial_group_bits, target_group_size)
        self.matchmaking, self.serializer, self.gate = matchmaking, serializer, gate  # EpochGroups passes all
        self._leaving: set[asyncio.Task] = set()

    # hivemind withdraws a finished or cancelled search's DHT declaration (a store of several round trips across the
    # internet) and awaits it while it still holds the matchmaking lock, so the next round, scheduled at once by a
    # peer that gave its round up, waited for that store ("Another look_for_group is already in progress") and looked
    # for its group late. The withdrawal is a courtesy (the declaration expires by itself): it runs on its own here.
    async def declare_averager(self, group_key, peer_id, expiration_time, looking_for_group: bool = True) -> bool:
        if looking_for_group:
            return await super().declare_averager(group_key, peer_id, expiration_time, looking_for_group)
        began = time.monotonic()
        task = asyncio.create_task(super().declare_averager(group_key, peer_id, expiration_time, False))
        self._leaving.add(task)
        task.add_done_callback(lambda t: self._left(t, began))
        return True

    def _left(self, task: asyncio.Task, began: float) -> None:
        self._leaving.discard(task)
        failed = None if task.cancelled() else task.exception()  # retrieved: no "exception never retrieved" noise
        logger.debug(f"withdrew a search's declaration in {time.monotonic() - began:.2f} s"
                     + (f" ({failed!r})" if failed else ""))  # fmt: skip

    async def get_averagers(self, group_key, only_active: bool):
        found = await super().get_averagers(group_key, only_active)
        if self.gate is None:
            return found
        admitted = [(peer, expiry) for peer, expiry in found if self.gate.admits(peer.to_base58())]
        if len(admitted) < len(found):
            self.gate.count("refused_leaders", len(found) - len(admitted))
        return admitted

    @property
    def current_key(self) -> str:
        step = self.matchmaking.step_control
        epoch = None if step is None else round_epoch(step.data_for_gather, self.serializer)
        return super().current_key if epoch is None else f"{self.prefix}_epoch{epoch}.0b{self.group_bits}"


def state_digest(serializer, metadata: dict, tensors: Sequence[torch.Tensor], parameters: int) -> str:
    """sha256 of a state averager's state (32 hex digits): its epoch and optimizer settings (learning rate and the
    rest), then the dtype, shape and bytes of each of its first ``parameters`` tensors (the parameters), in order.

    Not the optimizer's statistics (Adam's moments): peers that averaged the same gradients hold equal parameters,
    but a peer that once missed a round keeps moments that differ in the last bits for the rest of the run (state
    rounds average parameters only: moments would triple their bytes). With moments in the digest, honest peers'
    claims stopped agreeing after one missed round, and a newcomer found no state a majority holds (seen in the
    adversarial test of a late joiner). A downloader checks the moments it takes by their layout and bounds
    (swarm/loaded_state.py)."""
    h = hashlib.sha256(serializer.dumps([metadata.get("epoch"), metadata.get("optimizer_metadata")]))
    for t in tensors[:parameters]:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


def cancel_round(control) -> bool:
    """Cancel a round (a StepControl) from the process that scheduled it: hivemind's ``StepControl.cancel``, with the
    round's cancelled state set before the averager process is told.

    hivemind's sends the averager its cancel message first and marks the round cancelled last. The averager's round
    wakes on the message and reads that state: read too early, the round is not cancelled, and it goes on looking
    for a group until its deadline (averaging_timeout) while holding the matchmaking, so every round after it waited
    ("Another look_for_group is already in progress"), missed its group and was given up in turn. Seen as a late
    joiner in none of the swarm's groups for 3-9 epochs, with the two others refusing to average as a pair beside it
    (bench_averaging --late-joiner --own-core: 7 of 22 runs, 0 of 8 with this; the search of the cancelled round's
    epoch went on for 20 s after the cancel in its averager's log)."""
    control = getattr(control, "_control", control)  # (a GivesUp wraps one)
    if not isinstance(control, StepControl):  # a stand-in (unit tests): its own cancel is all there is
        return control.cancel()
    cancelled = MPFuture.cancel(control)  # the state every process reads (shared memory), first
    StepControl.cancel(control)  # hivemind's: the trigger, the averager's cancel message (the state again: a no-op)
    return cancelled


class CancelsStateFirst:
    """Every round our averagers schedule cancels as ``cancel_round`` does, whoever calls its ``cancel``: hivemind's
    optimizer does too, where this project does not override it (a lone peer's pre-scheduled round at its epoch's
    end, a tag-along that failed, the shutdown of a round still looking). With hivemind's order, a round cancelled
    0.5 s after its trigger still looked for a group, and its averager's next round found none for 25 s, in 2 of 10
    runs (test_a_cancelled_round_stops_looking_at_once..., calling ``cancel`` as hivemind does)."""

    def schedule_step(self, *args, **kwargs):
        control = super().schedule_step(*args, **kwargs)
        if isinstance(control, StepControl):
            control.cancel = functools.partial(cancel_round, control)  # on this object only: not pickled
        return control


def round_epoch(data_for_gather: bytes, serializer) -> Optional[int]:
    """The epoch a round's step gathers (hivemind packs it as [bandwidth, mode, serialized gather]), or None."""
    try:
        epoch = serializer.loads(serializer.loads(data_for_gather)[2])
    except Exception:
        return None
    return epoch if type(epoch) is int else None


def round_group(control) -> tuple[str, ...]:
    """The PeerIDs a finished round aggregated (sorted, this peer's included); () if it failed, was cancelled, had no
    group or has not ended."""
    try:
        report = getattr(control.result(timeout=0), "report", None)
    except Exception:  # why it has none: hivemind's caller logged it
        return ()
    return tuple(report.group) if report is not None else ()


class GivesUp:
    """A state round's StepControl whose ``result`` stops waiting (the round cancelled) once the round has missed its
    group (StateAverager._do) or the peer is asked to stop."""

    CHECK_EVERY = 0.5  # seconds between reads of the followed peers' progress (a DHT get)

    def __init__(self, control, epoch: int, averager: "StateAverager"):
        self._control, self._epoch, self._averager = control, epoch, averager

    def __getattr__(self, name):
        return getattr(self._control, name)

    def result(self, timeout: Optional[float] = None):
        control, averager = self._control, self._averager
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        next_check = 0.0
        while not control.done() and time.monotonic() < deadline:
            if averager.should_stop():
                logger.info("Stopping: leaving the state round in progress")
                cancel_round(control)
                break
            if control.stage == AveragingStage.LOOKING_FOR_GROUP and time.monotonic() >= next_check:
                next_check = time.monotonic() + self.CHECK_EVERY
                if averager.swarm_epoch() >= self._epoch:
                    logger.info(f"The swarm averaged the state of epoch {self._epoch} without us: not averaged")
                    cancel_round(control)
                    break
            try:
                return control.result(timeout=max(0.0, min(0.1, deadline - time.monotonic())))
            except TimeoutError:
                continue
        return control.result(timeout=0)  # the round's result, or why it has none (hivemind's caller logs it)


class GradAverager(PinsTasks, CancelsStateFirst, EpochGroups, Admitted, GatherAverage, CancelOnShutdown,
                   GradientAverager):
    """hivemind's GradientAverager over one buffer, gathering (gather.py), and no state donor (late joiners load the
    state averager's)."""

    def __init__(self, parameters, *, dht, prefix, averaged_grads: Sequence[torch.Tensor] = (),
                 gather_settings: Optional[Settings] = None, **kwargs):  # fmt: skip
        self.gather_settings = gather_settings or Settings()
        self._gather_rounds = {}
        parameters = tuple(parameters)
        if not averaged_grads and len({p.dtype for p in parameters}) == 1:
            averaged_grads = flat_buffer([p.shape for p in parameters], parameters[0].dtype)
        kwargs.setdefault("allow_state_sharing", False)
        super().__init__(parameters, dht=dht, prefix=prefix, averaged_grads=averaged_grads, **kwargs)

    # hivemind's optimizer starts a round with step(reset_accumulators=True), which zeroes the accumulators as the
    # round starts; when the round then fails, its fallback "Proceeding with local gradients" reloads them, zeros,
    # and the peer stepped on a zero gradient (tests/faults.py rounds_fail: norm 0.0). Keep the local mean gradient
    # each load computes until the optimizer's transition ends (SwarmOptimizer clears it), and give the fallback
    # that. The accumulators themselves stay as hivemind leaves them.
    local_mean: Optional[list[torch.Tensor]] = None

    @torch.no_grad()
    def load_accumulators_into_averager_(self):
        if self.local_times_accumulated == 0 and self.local_mean is not None:
            with self.get_tensors() as averaged:
                for buf, mean in zip(averaged, self.local_mean):
                    buf.copy_(mean)
            return
        super().load_accumulators_into_averager_()
        if self.local_times_accumulated:
            with self.get_tensors() as averaged:
                self.local_mean = [buf.clone() for buf in averaged]

    def load_state_from_peers(self, wait: bool = True, timeout: Optional[float] = None):
        """Nothing: nobody serves a gradient averager's state (hivemind's optimizer asks for it after the state
        averager's, and would take it from whoever declared itself a donor under this prefix)."""
        return None


class StateAverager(PinsTasks, CancelsStateFirst, EpochGroups, Admitted, GatherAverage, CancelOnShutdown,
                    StateDownloads, TrainingStateAverager):
    """hivemind's TrainingStateAverager over one buffer, declaring itself as a state donor only when that
    declaration changes: when sharing is switched on or off, when the priority (the epoch) changes, and before the
    record expires, as hivemind's docstring says (it re-stored it after every tensor of every round).

    ``skip_round``: the optimizer sets it when the swarm averaged this epoch without this peer (see
    SwarmOptimizer._give_up_without_a_group), or the peer is stopping. The state round due at that transition is then
    skipped, its pre-scheduled search cancelled: the groupmates it would look for have had that round already, and
    hivemind would look on until averaging_timeout. Not a search that has its group already (the state round was
    pre-scheduled with the gradient round and can find a group the gradient round did not): its groupmates are
    waiting for this peer's state. Skipped, it cost them gather.WAIT (5 s, where a refused member's update kept them
    under the quorum), then the pair rule refused what was left; two peers so began the next epoch 3 s late, and
    nobody found a group in it (a receipt test run, 2026-12-05). So that round runs, and it averages this peer's
    parameters, stepped on local gradients, back with the others'."""

    digest = staticmethod(state_digest)  # what a downloaded state's claim is computed with (StateDownloads)
    skip_round = False
    last_round = None  # (seconds, group) of the state round _do ran last (group () when it had none): the epoch event's
    should_stop = staticmethod(lambda: False)  # the optimizer's: a peer asked to stop skips its state round
    swarm_epoch = staticmethod(lambda: -1)  # the optimizer's: the highest epoch of the peers it follows, read now

    def __init__(self, *, gather_settings: Optional[Settings] = None, **kwargs):
        self.gather_settings = gather_settings or Settings()
        self._gather_rounds = {}
        super().__init__(**kwargs)

    def step(self, *, averaging_round: bool = False, averaging_control=None, **kwargs):
        grouped = getattr(averaging_control, "stage", None) in (AveragingStage.AWAITING_TRIGGER,
                                                                AveragingStage.RUNNING_ALLREDUCE)  # fmt: skip
        if averaging_round and ((self.skip_round and not grouped) or self.should_stop()):
            if averaging_control is not None and not averaging_control.done():
                cancel_round(averaging_control)
            averaging_round, averaging_control = False, None
        return super().step(averaging_round=averaging_round, averaging_control=averaging_control, **kwargs)

    # A state round still looking for its group when a peer this one follows has already finished the transition it
    # belongs to (its progress record shows that epoch: hivemind's optimizer records it after the state round) has
    # missed the group: the others averaged without it. hivemind would look on until averaging_timeout; the peer
    # then fell behind, and its two groupmates-to-be refused to average as a pair while it was behind (the pair rule):
    # 13 epochs of local gradients in a SIGKILL test run with a CPU hog on the 2-core VM. The state round's analogue
    # of SwarmOptimizer._give_up_without_a_group; also left at once when the peer is asked to stop.
    def _do(self, wait_for_trigger, optimizer_step, zero_grad, averaging_round, averaging_control, *args,
            timeout: Optional[float] = None, **kwargs):  # fmt: skip
        if averaging_round:
            if averaging_control is None or averaging_control.triggered or averaging_control.done():
                averaging_control = DecentralizedAverager.step(self, gather=self.local_epoch, require_trigger=True,
                                                               timeout=timeout, wait=False, **kwargs)  # fmt: skip
            averaging_control = GivesUp(averaging_control, self.local_epoch, self)
        began = time.perf_counter()
        try:
            return super()._do(wait_for_trigger, optimizer_step, zero_grad, averaging_round, averaging_control, *args,
                               timeout=timeout, **kwargs)  # fmt: skip
        finally:
            if averaging_round:
                self.last_round = (time.perf_counter() - began, round_group(averaging_control))

    def average_once(self, timeout: float, should_stop=lambda: False) -> tuple[str, ...]:
        """One state round at this peer's epoch outside the schedule, its result applied at once (hivemind applies a
        round's at the next step): the finishers' fallback when each holds a different final adapter
        (swarm/consensus.py). The group's PeerIDs, or () if no group formed (or the peer was asked to stop)."""
        with self.lock_averaging:
            if not self.reuse_tensors:
                self._load_local_tensors_into_averager_()
            control = DecentralizedAverager.step(self, gather=self.local_epoch, timeout=timeout, wait=False)
            while not control.done():
                if should_stop():
                    cancel_round(control)
                    return ()
                time.sleep(0.1)
            try:
                result = control.result(timeout=0)
            except Exception as e:  # hivemind's reasons a round failed (no group, a timeout, a refused pair)
                logger.info(f"The finishers' extra state round failed: {e!r}")
                return ()
        report = getattr(result, "report", None)
        if report is None:
            return ()
        with torch.no_grad():
            if not self.reuse_tensors:
                self._apply_averaging_results_()
            if self.offload_optimizer:
                self._apply_optimizer_parameters_()
        return tuple(report.group)

    def _make_averaged_parameters(self, main_parameters):
        # hivemind copies the parameters to the host (as float32) unless it averages the parameters themselves
        if self.reuse_tensors and not self.offload_optimizer:
            return super()._make_averaged_parameters(main_parameters)
        views = flat_buffer([p.shape for p in main_parameters])
        with torch.no_grad():
            for view, param in zip(views, main_parameters):
                view.copy_(param)
        return tuple(view.requires_grad_(param.requires_grad) for view, param in zip(views, main_parameters))

    async def _declare_for_download_periodically(self):
        download_key = f"{self._matchmaking.group_key_manager.prefix}.all_averagers"
        declared, expiration_time = None, -math.inf  # (sharing allowed, priority) last stored, and its expiry
        while True:
            state = (self.allow_state_sharing, self.state_sharing_priority)
            if state != declared or get_dht_time() >= expiration_time:
                expiration_time = get_dht_time() + self.declare_state_period
                if state[0] or (declared is not None and declared[0]):  # a switch-off overwrites the declaration
                    store = self.dht.store(download_key, subkey=self.peer_id.to_bytes(),
                                           value=state[1] if state[0] else None, expiration_time=expiration_time,
                                           return_future=True)  # fmt: skip
                    # not a task awaiting it: one left pending at shutdown was reported on the peer's stderr ("Task
                    # was destroyed but it is pending!"; README, Known limits)
                    self._declaration = store  # the latest, held until it resolves (hivemind keeps a weak reference)
                    store.add_done_callback(_retrieve)
                declared = state
            self._state_updated.clear()
            try:
                await asyncio.wait_for(self._state_updated.wait(), timeout=max(0.0, expiration_time - get_dht_time()))
            except asyncio.TimeoutError:
                pass
