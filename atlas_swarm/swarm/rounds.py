"""One gathering round's bookkeeping (swarm/gather.py runs the rounds): its settings, the report a round gives the
optimizer (receipt material), the updates it waits for and when it stops waiting (WAIT, GRACE, the quorum), and the
rules the exchange follows (who calls whom, which drops say nothing about fault, when a pair is refused)."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import math
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from hivemind.averaging.allreduce import AveragingMode

from atlas_swarm.swarm.updates import TRUNCATED

WAIT = 5.0  # seconds to wait for a groupmate's update before going on without it
# ... and once a quorum's updates are in, for the rest (at least; see wait_for_updates). Not less: peers' training
# processes reach an epoch's end up to ~1 s apart on a loaded 2-core machine. With 1 s, and in groups of 3, an honest
# peer that late was cut off at a run's last epoch, the pair left refused to average, and the run ended with three
# different adapters (a full-suite run of the NAT test): hence also the quorum of at least 3
GRACE = 2.0  # a member cut off is then not waited for past the quorum in its next round(s): swarm/stragglers.py
PAIR_REFUSED = "a pair has no majority: not averaged while a third peer is in the run"
PARTNER_REFUSED = "refused the pair"  # a partner's notice (updates.refusal): not lateness (stragglers.py)
UNSEEN = ("sent nothing", "exchange failed", "relayed")  # drops that say nothing about whose fault they were
# A call whose answer was lost is made again (at most TRIES in all, PAUSE apart), and a member keeps each round it
# ended for KEPT seconds to answer such calls: a groupmate's stream now and then ended empty 12 ms after the call
# although the callee had sent its update (its round had ended just then; 1 run in 5 of the 4-peer chain test). In a
# 3-peer state round that left two members each with a pair (refused), and three adapters left the run.
TRIES, PAUSE, KEPT = 3, 0.05, WAIT
HEDGE = 0.3  # seconds a relay may take before the next one is asked too (it may wait for the update, or hold it)
# The same loss can take only the tail of an answer (updates.TRUNCATED): that call is made again too. A groupmate that
# sends a bad digest on purpose costs the caller TRIES calls, no more.


@dataclass
class Settings:
    """What a gathering averager needs, set before its process starts."""

    rule: str = "mean"
    tau: Optional[float] = None
    beta: float = 0.4
    cap: float = math.inf
    signer: object = None  # hivemind's RSAPrivateKey of this peer (the DHT's identity)
    gate: object = None  # swarm.gate.Gate: who is admitted; what was refused, counted
    own_peer_id: str = ""


@dataclass(frozen=True)
class RoundReport:
    """What one round did: the receipt's material (issue 19) and the outliers the peer reports."""

    group: tuple[str, ...]  # the members whose updates were aggregated, sorted (this peer included)
    rule: str
    weights: tuple[float, ...]  # each member's weight after bounding, in ``group`` order
    kept: tuple[float, ...]  # the share of each member's update the rule kept (aggregate.Aggregate.kept)
    flagged: tuple[str, ...]  # members clipped or trimmed hard
    dropped: dict  # PeerID -> why its update was not used
    seconds: tuple[float, float] = (0.0, 0.0)  # waiting for the groupmates' updates, then aggregating them
    result_hash: str = ""  # hex sha256 of the aggregate (float32): what the group's receipt names (proofs/receipt.py)
    relayed: dict = field(default_factory=dict)  # PeerID -> the groupmate that relayed its update (client-mode pairs)
    clients: tuple[str, ...] = ()  # the members in client mode (nobody can dial them), sorted


class RoundResult(dict):
    """hivemind's step result (PeerID -> what the member gathered) with our ``report`` attached."""

    report: Optional[RoundReport] = None


@dataclass
class Round:
    group_id: bytes
    members: tuple[str, ...]  # admitted members, sorted
    numel: int
    compression: int
    own: list  # [header+signature bytes, serialized tensor]: what we send
    updates: dict = field(default_factory=dict)  # PeerID -> (weight, float32 tensor)
    dropped: dict = field(default_factory=dict)  # PeerID -> why
    waived: frozenset = frozenset()  # members not waited for past the quorum (swarm/stragglers.py)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # every member's update not waived is settled
    quorum: asyncio.Event = field(default_factory=asyncio.Event)  # updates of more than half, and of ``least``, are in
    least: int = 3  # updates a quorum needs at least: 3 under a robust rule (a cut-off must not leave a pair), 2 mean
    ended: Optional[float] = None  # time.monotonic() when this member's round ended (then kept KEPT s)
    forward: frozenset = frozenset()  # the client-mode members whose updates this member relays to one another
    raw: dict = field(default_factory=dict)  # PeerID in forward -> [header+signature, serialized]: as it came
    asked: dict = field(default_factory=dict)  # (asker, wanted) -> relay requests served: at most TRIES
    via: dict = field(default_factory=dict)  # PeerID -> the groupmate that relayed its update to us

    def settle(self, peer: str, result) -> None:
        if peer in self.updates or peer in self.dropped:
            return
        if isinstance(result, str):
            self.dropped[peer] = result
        else:
            self.updates[peer] = result
        if len(self.updates) >= self.least and 2 * len(self.updates) > len(self.members):
            self.quorum.set()
        if len(self.updates) + len(self.dropped) >= len(self.members):
            self.quorum.set()  # nothing left to wait for (a pair has no quorum: it must not wait out WAIT for it)
        if all(m in self.updates or m in self.dropped for m in self.members if m not in self.waived):
            self.arrived.set()

    def finalize(self, cancel: bool = False, exception=None) -> None:  # what hivemind's _shutdown calls on a round
        self.quorum.set()
        self.arrived.set()

    async def wait_for_updates(self, wait: float = WAIT, grace: float = GRACE) -> None:
        """Until every member's update is settled, or ``wait`` s pass, or a quorum's updates are in (module
        docstring) and then ``max(grace, 2 x the time that took)`` s pass. A straggler gets at least twice what the
        quorum needed (a slow link's round is slow for everyone), never more than ``wait`` in all; a waived one
        (``waived``) nothing past the quorum."""
        began = time.monotonic()
        deadline = began + wait
        try:
            await asyncio.wait_for(self.quorum.wait(), timeout=wait)
            rest = min(max(grace, 2 * (time.monotonic() - began)), deadline - time.monotonic())
            await asyncio.wait_for(self.arrived.wait(), timeout=max(rest, 0.0))
        except asyncio.TimeoutError:
            pass


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


def unseen(why: str) -> bool:
    """A drop that says nothing about whose fault it was: nothing came, or what came was cut short on the way."""
    return why.startswith(UNSEEN) or why == TRUNCATED


def forget_ended(rounds: dict) -> None:
    """Drop the rounds that ended more than KEPT seconds ago."""
    now = time.monotonic()
    for group_id in [g for g, r in rounds.items() if r.ended is not None and now - r.ended > KEPT]:
        del rounds[group_id]


def pair_refused(settings: Settings, members, since: Optional[float] = None) -> bool:
    """A robust rule's group of two while this peer follows a third peer (gather._aggregate_with_group says why); with
    ``since`` (when the round began), not counting a newcomer that arrived after it (Gate.followed)."""
    gate = settings.gate
    return settings.rule != "mean" and len(members) == 2 and gate is not None \
        and bool(gate.followed(since) - set(members))


@functools.cache
def roomy_heap() -> bool:
    """Let this process's glibc keep freed memory up to 128 MB instead of returning it to the OS, and serve blocks up
    to 64 MB from the heap instead of fresh mappings (mallopt M_TRIM_THRESHOLD, M_MMAP_THRESHOLD). The aggregate's
    temporaries (a few MB each) were otherwise mapped and page-faulted anew each time: centered_clip of 4 x 81k
    values took 18-20 ms by default and 7 ms so (aggregate's timing on this VM). Called in the averager's process,
    where aggregates run; False where the C library has no mallopt (not glibc)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(-1, 128 << 20)) and bool(mallopt(-3, 64 << 20))  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD


def caller(own: str, other: str, modes: dict) -> bool:
    """Which of a pair opens the exchange: a client-mode member (nobody can reach it), else the smaller PeerID."""
    own_client, other_client = modes.get(own) == AveragingMode.CLIENT, modes.get(other) == AveragingMode.CLIENT
    if own_client != other_client:
        return own_client
    return own < other and not own_client  # two client-mode members cannot reach each other
