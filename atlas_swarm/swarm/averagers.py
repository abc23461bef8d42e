"""hivemind's two averagers (hivemind 1.1.12) with cheaper rounds (below), all-or-nothing rounds
(``OneBufferAllReduce``), and groups only among rounds for the same epoch (``EpochGroups``).

Measured with bench_averaging (4 peers on 2 cores, the demo's MiniLM adapter: 26 tensors, 81k values), the gradient
round took 0.35 s from the last peer's arrival and the state round 0.6-1.2 s; an all-reduce of one 80k-value tensor
between 4 idle processes takes 0.04 s. Two causes, fixed here:

- hivemind's all-reduce splits every tensor separately among the peers, so each peer sends, reduces and receives
  about 30 small parts, each with its own compression task in an executor, message and await. One flat buffer
  makes that one part per peer (``OneBufferAllReduce``);
- after every tensor an all-reduce updates, hivemind wakes the loop that declares this peer as a state donor, and
  each wake-up stores the same DHT record again: a lookup across the swarm and a store on each node found, in every
  DHT process while the group is still averaging (``StateAverager``). Nobody downloads the gradient averager's
  state, so it does not declare itself at all.

With both, the same benchmark measured 0.03-0.07 s per gradient round and 0.06-0.12 s per state round.
"""

from __future__ import annotations

import asyncio
import math
from typing import Optional, Sequence

import torch
from hivemind.averaging.key_manager import GroupKeyManager
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.utils import get_dht_time


def flat_buffer(shapes: Sequence[torch.Size], dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """Zero tensors of these shapes, consecutive views of one shared-memory buffer on CPU."""
    flat = torch.zeros(sum(math.prod(s) for s in shapes), dtype=dtype).share_memory_()
    views, offset = [], 0
    for shape in shapes:
        n = math.prod(shape)
        views.append(flat[offset : offset + n].view(shape))
        offset += n
    return tuple(views)


def spanned_buffer(tensors: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """The 1-D tensor the given tensors tile, in order, when they are consecutive views of one storage; else None."""
    if not tensors:
        return None
    first = tensors[0]
    storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for t in tensors:
        if (t.dtype != first.dtype or t.device != first.device or not t.is_contiguous()
                or t.untyped_storage().data_ptr() != storage or t.storage_offset() != offset):  # fmt: skip
            return None
        offset += t.numel()
    return torch.empty(0, dtype=first.dtype, device=first.device).set_(
        first.untyped_storage(), first.storage_offset(), (offset - first.storage_offset(),)
    )


class PartialRound(BaseException):
    """An all-reduce that lost a groupmate's part: the averaged tensors were put back as they were.

    A BaseException, not an Exception, because hivemind logs a traceback for every Exception an all-reduce raises
    (at ERROR, which a peer shows without --verbose) and this is an expected outcome; hivemind turns it into a
    MatchmakingException either way, so the round is retried while its deadline allows, and fails after."""


class OneBufferAllReduce:
    """All-reduce the averaged tensors as the one buffer they tile (when they do), not tensor by tensor; and all or
    nothing.

    Peers split the buffer the same way as long as they all do this (the same code); the averaged values are the
    same either way. Compression applies to the buffer as a whole (one tensor info instead of one per tensor).

    hivemind counts a round as done when a groupmate's part never arrived: a groupmate that did not send its input
    within sender_timeout is left out of the part this peer reduces, and a part whose reducer did not answer within
    reducer_timeout keeps this peer's own values, with only a warning ("received 50.0% of input tensors"). The
    step still reports the whole group, and the peers go on with different tensors. This happens whenever a
    groupmate is triggered seconds after the others: its averager joined the group early (a pre-scheduled round)
    but its training process was late (measured by stopping one of two peers' training process for 10 s in
    bench_averaging: both logged "Averaged gradients with 2 peers", one had received 0 % of the other's results).
    Here such a round puts the tensors back and raises ``PartialRound``: hivemind looks for a new group (the late
    peer is triggered by then) until the round's deadline, then fails the step, and the peer reports no group."""

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
        flat = spanned_buffer(tensors)
        if flat is not None:
            tensors, kwargs = [flat], dict(kwargs, tensor_infos=None)
        group_id = group_info.group_id if group_id is None else group_id
        before = [t.clone() for t in tensors]
        try:
            await super()._run_allreduce_inplace_(tensors, group_info, group_id, **kwargs)
            missing = _missing_parts(self._running_groups[group_id].result())
            if missing:
                size = len(group_info.peer_ids)
                raise PartialRound(f"all-reduce in a group of {size} lost {missing}; tensors restored")
        except BaseException:
            with torch.no_grad():
                for tensor, old in zip(tensors, before):
                    tensor.copy_(old)
            raise


    async def _shutdown(self, timeout: Optional[float]) -> None:
        """hivemind 1.1.12's, working with a round in flight: it calls ``finalize`` on each running group's future
        (``AttributeError: '_asyncio.Future' object has no attribute 'finalize'``, a traceback on the terminal of a
        peer stopped mid-round) and would add finalize's None to a set. Here each group's all-reduce is cancelled."""
        if not self.client_mode:
            await self.remove_p2p_handlers(self._p2p, namespace=self.prefix)
        for future in list(self._running_groups.values()):
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().finalize(cancel=True)
            else:
                future.cancel()


def _missing_parts(runner) -> Optional[str]:
    """What a finished AllReduceRunner did without, or None when it averaged every part with every sender."""
    lost = []
    container = runner.tensor_part_container
    if container.failed_size:
        lost.append(f"{container.failed_size / container.total_size:.0%} of the results")
    if runner.banned_senders:
        lost.append(f"the input of {len(runner.banned_senders)} of {len(runner.sender_peer_ids)} senders")
    return " and ".join(lost) or None


class EpochGroups:
    """Groups form only among rounds for the same epoch: the epoch a round gathers (``gather=``, an int) is part of
    its group key, so rounds for different epochs neither find each other in the DHT nor accept each other.

    hivemind keys every round of an averager alike (``prefix.0b``). A peer whose round failed retries it, already
    triggered, until the round's deadline, and in one run it so joined the group that its groupmate had just formed
    for the next epoch, which was not triggered for seconds: the retried round timed out on the groupmate's part, and
    the groupmate's next round then timed out on a peer that had left it. Each spoiled round spoiled the next one, for
    the whole run (bench_averaging, 2 peers: every round 4 or 8 s, hivemind's part timeouts, 58.8 % of epoch time).
    Rounds without an epoch keep hivemind's key."""

    async def _step(self, *, step, **kwargs):  # runs in the averager's process, where the matchmaking lives
        matchmaking = self._matchmaking
        if not isinstance(matchmaking.group_key_manager, EpochKeys):
            plain = matchmaking.group_key_manager
            matchmaking.group_key_manager = EpochKeys(plain.dht, plain.prefix, plain.group_bits,
                                                      plain.target_group_size, matchmaking, self.serializer)  # fmt: skip
        return await super()._step(step=step, **kwargs)


class EpochKeys(GroupKeyManager):
    """The group key of the round being looked for (hivemind's matchmaking looks for one group at a time), with its
    epoch in the prefix: hivemind's keys must match ``prefix.0b[01]*``."""

    def __init__(self, dht, prefix, initial_group_bits, target_group_size, matchmaking=None, serializer=None):
        super().__init__(dht, prefix, initial_group_bits, target_group_size)
        self.matchmaking, self.serializer = matchmaking, serializer  # EpochGroups always passes both

    @property
    def current_key(self) -> str:
        step = self.matchmaking.step_control
        epoch = None if step is None else round_epoch(step.data_for_gather, self.serializer)
        return super().current_key if epoch is None else f"{self.prefix}_epoch{epoch}.0b{self.group_bits}"


def round_epoch(data_for_gather: bytes, serializer) -> Optional[int]:
    """The epoch a round's step gathers (hivemind packs it as [bandwidth, mode, serialized gather]), or None."""
    try:
        epoch = serializer.loads(serializer.loads(data_for_gather)[2])
    except Exception:
        return None
    return epoch if type(epoch) is int else None


class GradAverager(EpochGroups, OneBufferAllReduce, GradientAverager):
    """hivemind's GradientAverager over one buffer, and no state donor (late joiners load the state averager's)."""

    def __init__(self, parameters, *, dht, prefix, averaged_grads: Sequence[torch.Tensor] = (), **kwargs):
        parameters = tuple(parameters)
        if not averaged_grads and len({p.dtype for p in parameters}) == 1:
            averaged_grads = flat_buffer([p.shape for p in parameters], parameters[0].dtype)
        kwargs.setdefault("allow_state_sharing", False)
        super().__init__(parameters, dht=dht, prefix=prefix, averaged_grads=averaged_grads, **kwargs)


class StateAverager(EpochGroups, OneBufferAllReduce, TrainingStateAverager):
    """hivemind's TrainingStateAverager over one buffer, declaring itself as a state donor only when that
    declaration changes: when sharing is switched on or off, when the priority (the epoch) changes, and before the
    record expires, as hivemind's docstring says (it re-stored it after every tensor of every round).

    ``skip_round``: the optimizer sets it when the swarm averaged this epoch without this peer (see
    SwarmOptimizer._give_up_without_a_group), or the peer is stopping. The state round due at that transition is then skipped, its
    pre-scheduled search cancelled: the groupmates it would look for have had that round already, and hivemind
    would look on until averaging_timeout."""

    skip_round = False
    should_stop = staticmethod(lambda: False)  # the optimizer's: a peer asked to stop skips its state round

    def step(self, *, averaging_round: bool = False, averaging_control=None, **kwargs):
        if averaging_round and (self.skip_round or self.should_stop()):
            if averaging_control is not None and not averaging_control.done():
                averaging_control.cancel()
            averaging_round, averaging_control = False, None
        return super().step(averaging_round=averaging_round, averaging_control=averaging_control, **kwargs)

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
                    asyncio.create_task(asyncio.wait_for(store, timeout=expiration_time - get_dht_time()))
                declared = state
            self._state_updated.clear()
            try:
                await asyncio.wait_for(self._state_updated.wait(), timeout=max(0.0, expiration_time - get_dht_time()))
            except asyncio.TimeoutError:
                pass
