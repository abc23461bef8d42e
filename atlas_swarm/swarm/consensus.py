"""Leaving a run together: peers that stop at the same epoch agree on one final adapter before they exit.

hivemind does not promise that every peer is in the last averaging round: a slow peer can miss it and step on its own
gradients. So every finishing peer publishes the hash of its final adapter; the *canonical* adapter is the hash most
of them hold (ties: the smallest hash, so every peer picks the same one). Only admitted peers vote (Swarm.admits),
and honest peers of one round hold bit-identical adapters (train/aggregate.py), so the vote counts real agreement.
Holders advertise a higher state-sharing priority; the others download the state the holders' statuses name
(verified: swarm.averagers.StateAverager) and check the hash. Bounded by a timeout.

A finishing peer's status is refreshed while it waits, and the hash each peer was last seen finishing with is
remembered: the statuses live STATUS_TTL (60 s), and in a three-way tie that outlived them every peer saw nobody left
and reported "agreed by all 1 finishing peers", each with its own adapter (seen with 3 CLI peers whose early rounds
failed; test_a_tie_is_not_agreement_once_statuses_expire).

A download is the one step that cannot be taken back, so a peer acts on the tally only once it is complete (every
peer it follows at this epoch has published its hash) or half the timeout has passed: acting on a partial tally, a
peer whose pair-mate had not published yet saw a 1-1 tie, downloaded the odd peer's smaller hash, and the swarm left
with two adapters (seen once in a full test run).

When every finisher holds a different adapter (three or more: a pair's tie is broken by the smallest hash), no hash
may be downloaded (see _vouched), and the run used to end with as many adapters as finishers (the NAT test's three-way
split, README "Known limits"). Once the tally is complete the finishers then run one more state round together (the
robust rule of every round: one liar among three or more moves it a bounded amount), publish the hash they hold after
it, and vote again: those that were in its group hold one adapter. Tried again, a poll apart, until a group forms or
the timeout: tried once, in CI the three finishers of the samples-liar test (whose honest pair held two adapters)
formed no group, and the run ended with three adapters (CI keeps no peer's log, so why is not known: each finisher
enters when it sees the tally complete, and they see it up to a poll and a DHT read apart).

A peer left with no connection (the others agreed and left first; it is behind a NAT and held no records itself)
reads only its own copy of their last statuses, which said they were still finishing: it waited for them to expire
(60 s, the NAT client-mode test). After ALONE_FOR without a connection it stops waiting for anyone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from atlas_swarm.admission import trusted_states
from atlas_swarm.errors import SwarmError
from atlas_swarm.majority import majority
from atlas_swarm.swarm import records
from atlas_swarm.swarm.node import Swarm
from atlas_swarm.swarm.records import parse_state

POLL_EVERY = 0.5
ALONE_FOR = 3.0  # s without a connection to any peer, after which the statuses read are not waited on


@dataclass(frozen=True)
class Agreement:
    adapter_hash: str  # this peer's final adapter hash
    agreed: bool  # every finishing peer of this epoch holds it
    peers: int  # finishing peers seen (this one included)
    downloaded: bool  # this peer replaced its adapter with the canonical one
    reaveraged: int = 0  # the group of the extra state round after a split (0: none was run or none formed)


def agree_on_final_adapter(
    swarm: Swarm,
    opt,
    run_id: str,
    epoch: int,
    current_hash: Callable[[], str],
    publish: Callable[[str], None],
    timeout: float,
    should_stop: Callable[[], bool],
) -> Agreement:
    """Wait until every live peer of ``run_id`` has reached ``epoch`` and all who stop there hold one adapter."""
    ours, downloaded = current_hash(), False
    reaveraged = None  # the extra round's group: None while not run, 0 while none formed
    publish(ours)
    published = time.monotonic()
    deadline = time.monotonic() + timeout
    decide_by = time.monotonic() + timeout / 2  # after this, peers that have not published are not waited for
    seen: dict[str, str] = {}  # PeerID -> the final hash it was last seen with (kept when its status expires)
    alone = None  # since when no peer is connected to us
    statuses: dict = {}
    while True:
        try:
            read = {pid: s for pid, s in swarm.peer_statuses(run_id).items() if pid != swarm.peer_id}
            statuses = {pid: s for pid, s in read.items() if not s.leaving}
        except SwarmError:
            read = {}  # this read went unanswered: decide on the last one (the deadline still bounds the wait)
        others = list(statuses.values())  # admitted peers only (Swarm.admits)
        # a finisher that agreed and left says with what (its leaving status repeats its final hash): one whose new
        # hash (after a download or the extra round) was missed was otherwise counted with its old one until the
        # deadline (seen in 3 of 5 runs of the extra round's CLI test)
        seen.update({pid: s.final_hash for pid, s in read.items() if s.epoch == epoch and s.final_hash})
        # a peer at our epoch without a final hash is about to publish one (or trains on: then we time out)
        still_training = any(s.epoch < epoch or (s.epoch == epoch and not s.final_hash) for s in others)
        alone = None if swarm.connected() else (alone or time.monotonic())
        if alone is not None and time.monotonic() - alone >= ALONE_FOR:
            still_training = False  # what we read is our own copy of their last records: nothing will change it
        finals = list(seen.values())
        split = len(set(finals + [ours])) == len(finals) + 1 >= 3  # every finisher holds its own adapter
        if split and not reaveraged and not still_training and alone is None and time.monotonic() < deadline:
            left = max(1.0, min(opt.averaging_timeout, deadline - time.monotonic()))
            reaveraged = len(opt.average_final_state(left, should_stop))  # one more round, together
            now = current_hash()
            if now != ours:
                ours, published = now, time.monotonic()
                publish(ours)
            if reaveraged:
                continue  # (none formed: the tally below changes nothing, and the next poll tries again)
        target = majority(finals + [ours])  # the canonical adapter
        if ours == target:
            if not opt.client_mode:  # client-mode peers cannot serve state (hivemind refuses a priority)
                opt.state_averager.state_sharing_priority = epoch + 1  # downloaders pick the canonical holders
            if not still_training and all(h == target for h in finals):
                return Agreement(ours, True, len(finals) + 1, downloaded, reaveraged or 0)
        elif (not still_training or time.monotonic() > decide_by) and _vouched(finals + [ours], target):
            if not opt.client_mode:
                opt.state_averager.state_sharing_priority = 0
            expect = _holders_states(statuses, target)
            if expect:
                opt.state_averager.load_state_from_peers(expect=expect,
                                                         timeout=max(1.0, min(15.0, deadline - time.monotonic())))
                now = current_hash()
                if now != ours:
                    ours, downloaded = now, True
                    publish(ours)
        if should_stop() or time.monotonic() > deadline:
            return Agreement(ours, False, len(finals) + 1, downloaded, reaveraged or 0)
        if time.monotonic() - published >= records.STATUS_TTL / 4:
            published = time.monotonic()
            try:
                publish(ours)  # keep our hash visible to the others while we wait
            except SwarmError:
                pass  # no node took it this time: the next refresh tries again
        time.sleep(POLL_EVERY)


def _vouched(votes: list, target: str) -> bool:
    """Whether the canonical hash may be downloaded: held by two or more finishing peers, or the tie of a pair. A
    hash only its own holder votes for in a tie of three or more is what a liar would publish (the smallest hash
    there is), so a peer keeps its own adapter then and reports no agreement."""
    return votes.count(target) >= 2 or len(votes) == 2


def _holders_states(statuses: dict, target: str) -> set:
    """The states a download of ``target`` may take: the one most of its holders claim or, when their claims differ
    (equal parameters with Adam moments that drifted apart after a missed round), any holder's own."""
    holders = {pid: [s.states[-1]] for pid, s in statuses.items() if s.final_hash == target and s.states}
    trusted = trusted_states(holders) or {c for claims in holders.values() for c in claims}
    return {parse_state(c) for c in trusted} - {None}
