"""A leader holds its group open for the peers it follows (runs in hivemind's averager process, beside each round).

hivemind's matchmaking: every searcher declares an expiration in the DHT; the one with the earliest leads, the others
ask to join it, and the leader assembles its group at its expiration with whoever has joined by then. A peer that
began looking after that was left out of the round: a 3+1 split of 4 peers. In the receipt test's swarm (4 peers,
epochs of 2.5-5 s; 10 runs with hivemind's debug log, 2026-12-05) 11 of 40 epochs had a peer out of the group (a
3+1 split, or no group at all), in 8 runs, and one run failed; in the 3 runs read, the peer left out had asked to
join 0.03-0.6 s after the leader assembled (its expiration was its look's start plus matchmaking_time, before the
epoch's end).

So a round's search declares the epoch's estimated end plus a margin as its expiration (schedule.search_ends_in) and
the leader assembles by its own rule (schedule.assemble_now): once its own epoch ended (and after matchmaking_time),
when every peer it follows has joined; otherwise it waits for the missing ones until schedule.HOLD seconds after its
own epoch ended. hivemind's assembly at the expiration stays as the fallback. (Until 2026-12-06 it assembled as soon
as everyone it followed had joined, so a newcomer it did not follow yet, looking seconds before the epoch's end,
found the group closed.) With both, the same 10 runs: 1 epoch of 40 split (the
first epoch of one run: two pairs, each leader's group held to the end and never merged), no run failed.

That split (session 34): a searcher fetches the others' declared ends again only while the earliest it holds may be
new to it: hivemind's PotentialLeaders assumes every end more than 3 s before the latest it fetched is known
(max_assured_time), which holds when a later look declares a later end (its look plus matchmaking_time). Estimated
ends differ by seconds (a first epoch, a newcomer), so a peer that looked after the others but expected the epoch to
end first declared the earliest end, and a leader that had fetched before it never looked again: 3+1
(test_group_hold.py). FetchingLeaders fetches each time it picks a leader, as hivemind's search already does while
the ends it holds lie within 3 s of each other. Declaring the look plus a constant instead (the order hivemind
assumes) was tried and dropped: rounds that are cancelled or never triggered then hold their followers until the far
end (the finishers' extra state round failed in 3 of 3 runs of the drifted-moments test).
"""

from __future__ import annotations

import asyncio
import math

from hivemind.averaging.matchmaking import PotentialLeaders
from hivemind.utils import get_dht_time

from atlas_swarm.swarm import schedule

POLL = 0.05  # seconds between looks at the search (asyncio sleeps in the averager's loop)


def _leading(matchmaking, step) -> bool:
    """Is this peer's search for ``step`` leading a group it has not yet assembled?"""
    m = matchmaking
    return (m.is_looking_for_group and m.step_control is step and m.current_leader is None and not m.client_mode
            and len(m.current_followers) + 1 >= m.min_group_size and not m.assembled_group.done())  # fmt: skip


async def hold_open(matchmaking, step, followed=frozenset) -> None:
    """Until ``step`` is done: assemble this peer's group when schedule.assemble_now says so. ``followed()``: the
    PeerIDs (base58) of the peers this peer follows, itself included."""
    own = matchmaking.peer_id.to_base58()
    looking_since = triggered_at = None
    while not step.done():
        await asyncio.sleep(POLL)
        if matchmaking.step_control is not step:
            continue
        now = get_dht_time()
        looking_since = now if looking_since is None else looking_since
        if triggered_at is None and step.triggered:
            triggered_at = now
        if not _leading(matchmaking, step):
            continue
        members = {p.to_base58() for p in matchmaking.current_followers} | {own}
        if schedule.assemble_now(now, looking_since, triggered_at, matchmaking.min_matchmaking_time, members,
                                 set(followed())):  # fmt: skip
            async with matchmaking.lock_request_join_group:
                if _leading(matchmaking, step):
                    await matchmaking.leader_assemble_group()


class FetchingLeaders(PotentialLeaders):
    """hivemind's search for a leader, with nothing assumed known: each time it picks its next leader it has the DHT
    fetched again (hivemind skips that for an end it assumes known), and while no end it holds is earlier than its
    own it waits for that fetch. EpochGroups puts it in place in the averager's process."""

    max_assured_time = property(lambda self: -math.inf, lambda self, value: None)
