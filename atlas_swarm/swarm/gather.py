"""Averaging rounds as an all-gather of signed updates, each member aggregating them itself (train/aggregate.py).

hivemind's all-reduce makes each member the reducer of 1/N of the buffer: a malicious reducer returns what it likes
for its slice, different to each victim, and each sender's weight is whatever its message says. Here a round is:

1. each member signs its update: (protocol, averager prefix, group id, PeerID, weight, size, sha256 of the bytes);
2. every pair of members exchanges updates in one stream (the caller sends its own, the callee answers with its own;
   a client-mode member always calls, since nobody can call it). Two client-mode members (both behind NAT) cannot
   call each other: each asks a reachable groupmate for the other's update, which that groupmate forwards as it got
   it, signed (rpc_gather_relay). A relay can withhold an update, not forge or alter one;
3. each member checks every update it got (swarm/updates.py): sent by the member it names (the libp2p connection
   authenticates it; a relayed one, signed by it), admitted (swarm/gate.py), a member of this group, signed by that
   PeerID's key, finite non-negative weight, the right size and compression, finite values. A bad update drops its
   sender from this round only, and is counted (a bad relayed one: refused_relays, and the next relay is asked);
4. every member aggregates the same updates in the same order (sorted PeerIDs) with the run's rule, on CPU in
   float64 numpy: honest members that received the same updates end with bit-identical tensors.

A member that sends nothing within WAIT seconds is dropped too. Once a quorum's updates are in (more than half, and
at least 3 under a robust rule, 2 under the mean), the rest get GRACE seconds (or twice what the quorum took, if
longer): one late groupmate (a slow uplink, a frozen machine) holds the others about 2 s past the quorum, not up to
WAIT (README, "A straggler"), and a member cut off so is not waited for past the quorum in its next round
(swarm/stragglers.py). Under a robust rule a group of 3 or 2 waits for everyone: what a cut-off would leave is a
pair, which the robust rule does not average; the mean (allowlist runs) averages a pair, so there a group of 3 has a
quorum of 2.

If a member sends different updates to different members, or sends to some only, honest members' results differ
for that round (they no longer hold equal hashes); the next state round and the final agreement reconcile them.
Receipts (the next issue) make such equivocation provable. Cost: each member sends its update to N-1 others,
(N-1)/N x 2 of an all-reduce's bytes for N=2 and about N/2 times an all-reduce's for larger N; for a LoRA adapter
(MiniLM demo: 81k values, 0.33 MB at fp32) that is well under a second on a home uplink for groups up to 8 (README,
"Byzantine-tolerant averaging").
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import hashlib
import logging
import math
import time
from typing import AsyncIterator, Optional, Sequence

import msgpack
import torch
from hivemind.averaging.allreduce import AveragingMode
from hivemind.averaging.matchmaking import MatchmakingException
from hivemind.compression import NoCompression
from hivemind.compression.base import CompressionInfo
from hivemind.p2p import P2PContext
from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import enter_asynchronously
from hivemind.utils.streaming import combine_from_streaming, split_for_streaming

from atlas_swarm.swarm.codec import deserialize
from atlas_swarm.swarm.rounds import (
    HEDGE,
    KEPT,
    PAIR_REFUSED,
    PARTNER_REFUSED,
    PAUSE,
    TRIES,
    UNSEEN,
    WAIT,
    Round,
    RoundReport,
    RoundResult,
    caller,
    forget_ended,
    pair_refused,
    roomy_heap,
    spanned_buffer,
    unseen,
)
from atlas_swarm.swarm.stragglers import Stragglers
from atlas_swarm.swarm.updates import (
    MAX_HEADER,
    check_update,
    parse_refusal,
    parse_relay_request,
    refusal,
    relay_request,
    sign_update,
)
from atlas_swarm.train.aggregate import aggregate

logger = logging.getLogger("hivemind.averaging.averager")  # hivemind's logger: shown with --verbose

STEP: contextvars.ContextVar = contextvars.ContextVar("atlas_gather_step", default=None)  # the round's StepControl
BEGAN: contextvars.ContextVar = contextvars.ContextVar("atlas_gather_began", default=None)  # when it began (time.time)



class GatherAverage:
    """Averager mixin: rounds are an all-gather of signed updates and a robust aggregate (module docstring)."""

    async def _step(self, *, step, **kwargs):
        # hivemind's matchmaking forgets the step once it has a group: the round below learns it from its context
        STEP.set(step)
        BEGAN.set(time.time())
        try:
            return await super()._step(step=step, **kwargs)
        except Exception as e:
            # hivemind's _step hands the step every exception it does not catch itself, then re-raises it from a task
            # nobody awaits, and asyncio printed "Task exception was never retrieved" with a traceback on the peer's
            # terminal for a round the peer already counts as failed (its epoch event: group 0). Seen with a round
            # that outlived its allreduce_timeout (TimeoutError: a 7B-sized adapter's aggregate on a busy CPU), a
            # leader SIGKILLed while a follower waited for its answer (ConnectionResetError), a round that ended just
            # as its owner cancelled it (concurrent.futures' InvalidStateError from set_result on the cancelled
            # step), and an exception raised in the aggregate (tests/faults.py rounds_fail). The step carries the
            # outcome; only a step left unset raises. What the network does is routine (--verbose shows it); anything
            # else is one line, no traceback.
            if not step.done():
                raise
            routine = isinstance(e, (asyncio.TimeoutError, ConnectionError, concurrent.futures.InvalidStateError))
            logger.log(logging.DEBUG if routine else logging.ERROR, f"An averaging round failed: {e!r}")
            return None

    # A transition's gradient round comes first, and a groupmate it cut off for lateness (a slow uplink, a late
    # machine) is late for the state round that follows too: that round waited the grace for it once more (each
    # averager keeps its own record: stragglers.py), 2.4-4.6 s at epoch 4 of the straggler bench with a group of 3
    # under the mean. The optimizer tells the state averager's process whom the last gradient round cut off, and its
    # rounds do not wait for them past the quorum (their updates are used if they came by then) until told again.
    def note_late(self, members) -> None:
        """Members another averager's last round cut off for lateness ("sent nothing in time"): not waited for past
        the quorum in this averager's rounds until the next note."""
        self._outer_pipe.send(("_note_late", [sorted(members)], {}))

    async def _note_late(self, members) -> None:  # in the averager process
        self._late_elsewhere = frozenset(members)

    async def _aggregate_with_group(self, group_info, min_vector_size: int, **kwargs):
        own_id = self.peer_id.to_base58()
        gate = self.gather_settings.gate
        modes, own_gather = {}, None
        members = []
        for peer, blob in zip(group_info.peer_ids, group_info.gathered):
            pid = peer.to_base58()
            try:
                _bandwidth, mode, user = self.serializer.loads(blob)
                mode = AveragingMode(mode)
            except Exception:
                if gate is not None:
                    gate.count("dropped_updates")  # its join request carried no valid metadata
                continue
            if pid == own_id:
                own_gather = self.serializer.loads(user)
            elif gate is not None and not gate.admits(pid):
                gate.count("refused_members")  # a leader put a non-admitted peer in our group
                continue
            if mode == AveragingMode.AUX:
                continue
            modes[pid] = mode
            members.append(pid)
        members = tuple(sorted(members))
        if pair_refused(self.gather_settings, members, since=BEGAN.get()):
            # A pair has no majority: a robust rule gives the mean of two, so an attacker paired with an honest peer
            # (matchmaking left a third peer out) would own that round, and then the final vote (seen in full test
            # runs). While this peer follows a third peer's progress, such a round is not averaged: local gradients.
            # Any third peer counts, whatever its epoch: counting only peers near ours let an attacker pair with one
            # honest peer while the other lagged an epoch behind (seen in the sign-flip test). A newcomer still
            # syncing stops pairs too, for as long as it syncs, but not a round that began before the newcomer
            # arrived: no matchmaking of that round could have grouped it, and a pair refused for it lost the epoch's
            # round to every newcomer that arrived mid-epoch (bench_averaging --late-joiner: once in every run).
            gate.count("refused_pairs")
            if STEP.get() is not None:
                STEP.get()._allow_retries = False  # a retry would wait out the round's deadline
            self._refuse(group_info.group_id, [p for p in members if p != own_id], modes)
            raise MatchmakingException(PAIR_REFUSED)
        async with enter_asynchronously(self.get_tensors()) as tensors:
            report = await self._gather_round(tensors, group_info.group_id, members, modes, kwargs.get("weight", 1.0),
                                              kwargs.get("compression") or NoCompression())  # fmt: skip
        # hivemind's state averager adopts the highest epoch any member gathered: every member of an epoch group
        # gathered the same epoch (averagers.EpochGroups), so ours stands for all, and nobody can push us ahead
        result = RoundResult({PeerID.from_base58(p): own_gather for p in report.group})
        result.report = report
        return result

    async def _gather_round(self, tensors, group_id: bytes, members, modes, weight, compression) -> "RoundReport":
        settings, gate = self.gather_settings, self.gather_settings.gate
        roomy_heap()
        own_id = self.peer_id.to_base58()
        flat = spanned_buffer(tensors)
        local = flat if flat is not None else torch.cat([t.detach().reshape(-1) for t in tensors])
        local = local.detach().cpu().float()
        serialized = compression.compress(local, CompressionInfo.from_tensor(local), allow_inplace=False)
        own_tensor = deserialize(serialized).reshape(-1).float()  # what the others will hold of ours
        blob = sign_update(settings.signer, self.prefix, group_id, own_id, weight, serialized)
        clients = {p for p in members if modes.get(p) == AveragingMode.CLIENT}
        stragglers = self.__dict__.setdefault("_stragglers", Stragglers())  # in the averager's process
        waived = stragglers.waive(m for m in members if m != own_id)
        waived |= getattr(self, "_late_elsewhere", frozenset()) & set(members) - {own_id}  # note_late
        round_ = Round(group_id, members, local.numel(), serialized.compression, [blob, serialized], waived=waived,
                       least=2 if settings.rule == "mean" else 3,
                       forward=frozenset(clients) if own_id not in clients and len(clients) > 1 else frozenset())
        finite = math.isfinite(weight) and weight >= 0 and bool(torch.isfinite(own_tensor).all())
        round_.settle(own_id, (float(weight), own_tensor) if finite else "non-finite values (this peer's own)")
        forget_ended(self._gather_rounds)
        self._gather_rounds[group_id] = round_
        self._running_groups[group_id].set_result(round_)
        began = time.monotonic()
        try:
            calls = [self._exchange(round_, p) for p in members if p != own_id and caller(own_id, p, modes)]
            if own_id in clients:  # the other client-mode members' updates, through the reachable ones
                relays = [p for p in members if p not in clients]
                calls += [self._relayed(round_, p, relays) for p in sorted(clients - {own_id})]
            tasks = [asyncio.create_task(c) for c in calls]
            await round_.wait_for_updates()
            for task in tasks:
                task.cancel()
            for p in members:
                round_.settle(p, "sent nothing in time" + (" (late before: not waited for)" if p in waived else ""))
        finally:
            round_.ended = time.monotonic()  # kept a while: a groupmate whose answer was lost asks again
        stragglers.record((m for m in members if m != own_id), waived, round_.dropped)
        if gate is not None and round_.dropped:
            gate.count("dropped_updates", len(round_.dropped))
        peers, gathered = sorted(round_.updates), time.monotonic()
        silent = any(why.startswith(UNSEEN) for p, why in round_.dropped.items() if p != own_id)
        if own_id in peers and silent and pair_refused(settings, peers):
            # What a drop left of a larger group is a pair too, under the same rule as a pair from matchmaking: a
            # group of 3 whose third member's update did not arrive left one honest peer averaging with the
            # attacker, its x1e6 gradient at 68 % of the weight (the sign-flip test, 1 run in 5). Not when every
            # drop was of an update that arrived and was refused (non-finite, forged, malformed): that member is
            # the faulty one, and refusing the honest pair left each honest peer alone every round (2 honest + a
            # NaN attacker: the peers never averaged and ended with different adapters, 1 full-suite run in 2)
            other = peers[1] if peers[0] == own_id else peers[0]
            round_.dropped[other] = "a pair has no majority (the rest of the group was dropped)"
            del round_.updates[other]
            gate.count("refused_pairs")
            peers = [own_id]
        if not set(peers) - {own_id}:
            if own_id not in round_.updates:
                raise MatchmakingException("no update in this round passed the checks, this peer's own included")
            # Nobody else's update arrived or passed the checks: this round is our own (the tensors are left as they
            # are) and its report says whom it dropped. Not a failed round: hivemind would retry it until the round's
            # deadline with the same groupmates (a NaN sender's partner stalled 15 s per epoch), then step alone.
            return RoundReport((own_id,), settings.rule, (round_.updates[own_id][0],), (1.0,), (), dict(round_.dropped),
                               (gathered - began, 0.0), relayed=dict(round_.via))  # fmt: skip
        updates = [round_.updates[p][1].numpy() for p in peers]
        claims = [round_.updates[p][0] for p in peers]
        result = await asyncio.get_event_loop().run_in_executor(
            None, lambda: aggregate(settings.rule, updates, claims, settings.cap, settings.tau, settings.beta))
        value = torch.from_numpy(result.value)
        if not bool(torch.isfinite(value).all()):
            raise MatchmakingException("the aggregate is not finite")  # not with finite inputs; refused all the same
        with torch.no_grad():
            if flat is not None:
                flat.copy_(value.to(flat.dtype))
            else:
                offset = 0
                for t in tensors:
                    t.copy_(value[offset : offset + t.numel()].view_as(t).to(t.dtype))
                    offset += t.numel()
        self.last_updated = time.time()
        self._state_updated.set()
        result_hash = hashlib.sha256(value.float().numpy().tobytes()).hexdigest()  # equal on every honest member
        return RoundReport(tuple(peers), settings.rule, result.weights, result.kept,
                           tuple(peers[i] for i in result.flagged), dict(round_.dropped),
                           (gathered - began, time.monotonic() - gathered), result_hash,
                           {p: r for p, r in round_.via.items() if p in peers},
                           tuple(sorted(clients & set(peers))))  # fmt: skip

    def _refuse(self, group_id: bytes, others, modes) -> None:
        """Tell the pair's other member that this one refused (its views of the run can differ from ours: it may not
        follow the third peer yet, or holds its record back as an epoch ahead). Without the notice it waited WAIT for
        our update: its round took 6 s instead of 1-2 (test_a_partner_that_refuses_the_pair…, whichever member opens
        the exchange). Its calls to us are answered with the notice (rpc_gather_update); we call it if we open the
        pair's exchange."""
        refused = self.__dict__.setdefault("_refused", {})  # group id -> when (in the averager's process)
        for gid in [g for g, t in refused.items() if time.monotonic() - t > KEPT]:
            del refused[gid]
        refused[group_id] = time.monotonic()
        own, notices = self.peer_id.to_base58(), self.__dict__.setdefault("_notices", set())
        for peer in others:
            if caller(own, peer, modes):
                task = asyncio.create_task(self._notify_refusal(group_id, peer))
                notices.add(task)  # (the loop keeps only a weak reference to a task)
                task.add_done_callback(notices.discard)

    def _refused_group(self, group_id) -> bool:
        return group_id in self.__dict__.get("_refused", {})

    async def _notify_refusal(self, group_id: bytes, peer: str) -> None:
        async def notice():
            yield averaging_pb2.DownloadData(metadata=refusal(group_id))

        async def send():
            stub = self.get_stub(self._p2p, PeerID.from_base58(peer), namespace=self.prefix)
            async for _ in await stub.rpc_gather_update(notice()):
                break  # it answers nothing (or its own notice): nothing to read

        try:
            await asyncio.wait_for(send(), timeout=WAIT)
        except Exception as e:  # it goes on without our update after WAIT, as before
            logger.debug(f"A pair's refusal did not reach {peer}: {e!r}")

    async def _exchange(self, round_: Round, peer: str) -> None:
        """Send our update to ``peer``; its answer is its own."""
        round_.settle(peer, await self._ask(round_, peer, peer, lambda stub: stub.rpc_gather_update(
            _messages(round_.own, round_.group_id))))

    async def _relayed(self, round_: Round, wanted: str, relays: Sequence[str]) -> None:
        """``wanted``'s update (a client-mode groupmate: we cannot call each other) as a reachable groupmate got it,
        checked as if ``wanted`` had sent it. Relays are asked in order, the next one as soon as one answers nothing
        valid or has taken HEDGE s without answering (a relay holding its answer open costs HEDGE, not the update);
        the first valid forward is taken, and the requests still open are dropped."""
        got = "relayed: nobody (no groupmate can reach both of us)"
        request = averaging_pb2.DownloadData(metadata=relay_request(round_.group_id, wanted))
        left, asking, ask_next = list(relays), {}, True
        try:
            while left or asking:
                if left and ask_next:
                    relay = left.pop(0)
                    asking[asyncio.create_task(self._ask(round_, relay, wanted,
                                                         lambda stub: stub.rpc_gather_relay(request)))] = relay
                done, _ = await asyncio.wait(asking, timeout=HEDGE if left else None,
                                             return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                ask_next = True  # an answer that was not valid, or the hedge
                for task in done:
                    relay, answer = asking.pop(task), task.result()
                    if not isinstance(answer, str):
                        round_.via[wanted] = relay
                        round_.settle(wanted, answer)
                        return
                    if not unseen(answer) and self.gather_settings.gate is not None:
                        self.gather_settings.gate.count("refused_relays")  # it forwarded what ``wanted`` did not send
                    got = f"relayed: {answer}"
                if round_.ended:
                    break
        finally:
            for task in asking:
                task.cancel()
        round_.settle(wanted, got)

    async def _ask(self, round_: Round, peer: str, sender: str, call):
        """``sender``'s update from ``peer`` through ``call(stub)``, or why there is none. A call whose answer was lost
        or cut short on the way is made again (TRIES in all)."""
        for attempt in range(TRIES):
            try:
                stub = self.get_stub(self._p2p, PeerID.from_base58(peer), namespace=self.prefix)
                got = await self._read_update(await call(stub), round_, sender)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                got = f"exchange failed: {type(e).__name__}"
            if not (isinstance(got, str) and unseen(got)) or attempt == TRIES - 1 or round_.ended:
                break
            await asyncio.sleep(PAUSE)
        return got

    async def _read_update(self, stream: AsyncIterator, round_: Round, sender: str):
        limit = round_.numel * 4 + 4096  # float32 is the widest compression we accept
        blob, parts, size = None, [], 0
        async for message in stream:
            if blob is None:
                blob = message.metadata
                if parse_refusal(blob) == round_.group_id:
                    return PARTNER_REFUSED
                if not blob or len(blob) > MAX_HEADER:
                    return "malformed header"
            size += len(message.tensor_part.buffer)
            if size > limit or len(parts) > limit // 4096 + 2:
                return "update larger than the adapter"
            parts.append(message.tensor_part)
        if blob is None or not parts:
            return "sent nothing"
        serialized = combine_from_streaming(parts)
        got = check_update(blob, serialized, self.prefix, round_.group_id, sender, round_.numel, round_.compression)
        if sender in round_.forward and not isinstance(got, str):
            round_.raw[sender] = [blob, serialized]  # for the other client-mode members (rpc_gather_relay)
        return got

    async def _round(self, group_id) -> Optional[Round]:
        """The round of ``group_id``, waiting up to WAIT for it: the sender may have learned of the group before us.
        None at once for a group this member refused (_refuse)."""
        deadline = time.monotonic() + WAIT
        round_ = self._gather_rounds.get(group_id) if isinstance(group_id, bytes) else None
        while round_ is None and time.monotonic() < deadline and isinstance(group_id, bytes) \
                and not self._refused_group(group_id):  # fmt: skip
            await asyncio.sleep(0.005)
            round_ = self._gather_rounds.get(group_id)
        return round_

    async def rpc_gather_update(
        self, stream: AsyncIterator[averaging_pb2.DownloadData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        """A groupmate's update in, ours out (the exchange of one pair of members)."""
        sender = context.remote_id.to_base58()
        gate = self.gather_settings.gate
        if gate is not None and not gate.admits(sender):
            gate.count("refused_updates")
            return
        first = await _next(stream)
        if first is None or not first.metadata or len(first.metadata) > MAX_HEADER:
            return
        notice = parse_refusal(first.metadata)
        if notice is not None:  # the sender refused our pair: the round ends without it
            round_ = await self._round(notice)
            if round_ is not None and sender in round_.members:
                round_.settle(sender, PARTNER_REFUSED)
            return
        try:
            group_id = msgpack.unpackb(msgpack.unpackb(first.metadata, raw=True)[0], raw=True)[2]
        except Exception:
            return
        round_ = await self._round(group_id)
        if round_ is None and self._refused_group(group_id):
            yield averaging_pb2.DownloadData(metadata=refusal(group_id))  # we refused it: the caller ends at once
            return
        if round_ is None or sender not in round_.members:
            return
        # both ways at once: our update goes out while theirs comes in (one after the other, each pair's exchange took
        # two transfer times). Theirs is settled only once ours is out: settling it first let this member's round end
        # (and, at the last epoch, the peer stop) while its update was still going out (suspected in a NAT test run)
        reading = asyncio.create_task(self._read_update(_prepend(first, stream), round_, sender))
        try:
            async for message in _messages(round_.own, round_.group_id):
                yield message
            # a caller that never ends its update holds this handler WAIT, no longer
            round_.settle(sender, await asyncio.wait_for(reading, timeout=WAIT))
        except asyncio.TimeoutError:
            round_.settle(sender, "sent nothing in time")
        finally:
            reading.cancel()

    async def rpc_gather_relay(
        self, request: averaging_pb2.DownloadData, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        """A client-mode groupmate's request for another one's update (they cannot call each other): the update as it
        reached us, once it has (up to WAIT), header and signature included. Each asker gets each update TRIES times
        at most; nothing for a peer that is not a client-mode member of the round, or for an update we do not hold."""
        asker = context.remote_id.to_base58()
        gate = self.gather_settings.gate
        if gate is not None and not gate.admits(asker):
            gate.count("refused_updates")
            return
        asked = parse_relay_request(request.metadata)
        round_ = None if asked is None else await self._round(asked[0])
        if round_ is None or asker not in round_.forward or asked[1] not in round_.forward or asker == asked[1]:
            return
        key = (asker, asked[1])
        round_.asked[key] = round_.asked.get(key, 0) + 1
        if round_.asked[key] > TRIES:
            return
        deadline = time.monotonic() + WAIT
        while asked[1] not in round_.raw and asked[1] not in round_.dropped and round_.ended is None \
                and time.monotonic() < deadline:  # fmt: skip
            await asyncio.sleep(0.01)
        if asked[1] in round_.raw:
            async for message in _messages(round_.raw[asked[1]], round_.group_id):
                yield message


async def _messages(own: list, group_id: bytes):
    blob, serialized = own
    for i, part in enumerate(split_for_streaming(serialized)):
        yield averaging_pb2.DownloadData(metadata=blob if i == 0 else b"", tensor_part=part)


async def _next(stream):
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


async def _prepend(first, stream):
    yield first
    async for message in stream:
        yield message

