"""Groupmates whose updates came too late: the next rounds with them do not wait the grace for them.

A member cut off for sending nothing in time (rounds.Round.wait_for_updates: not in by the grace after a quorum's
updates, or by WAIT) is, when the cause is its uplink or its machine, late again in the next round, and each such
round cost the on-time members the grace (2 s or more: README, "A straggler"). So a member cut off is *waived* in the
next round with it: once a quorum's updates are in, the round ends without waiting for it (its update is used if it
came by then). The round after that waits for it again (a probe); cut off again, it is waived for twice as many
rounds as before, up to MAX_WAIVED. Its update arriving in time (waived or not) clears it.

Waiving changes nothing a member could abuse: the quorum still counts only updates that passed the checks, under a
robust rule a group of 3 or 2 has no grace to waive (the quorum needs everyone; under the mean, a pair's does), and
what a member can make another member record is its own lateness. Each averager process keeps its own record; the
state averager's is also told whom the transition's gradient round cut off (gather.GatherAverage.note_late).

Tried first on 2026-12-04 and reverted: the on-time peers, ending their rounds seconds before the straggler, began
the next matchmaking out of step with it, and hivemind's leader assembled without one of them (20 of 216 on-time
peer-epochs in no group). Back on 2026-12-05 with the leader's hold (swarm/hold.py): bench_averaging, 4 peers on the
emulated WAN, one with a 2 Mbit/s uplink, 3 runs each way interleaved: the on-time peers' share of epoch time 26.8,
26.9, 30.0 % against 36.6, 38.1, 38.2 %; each of them in a group of 3 in all 63 of its epochs; one adapter at the end.
"""

from __future__ import annotations

from typing import Iterable

MAX_WAIVED = 8  # rounds waived in a row at most
REMEMBERED = 256  # members remembered at most, the least recently late forgotten first
CUT_OFF = "sent nothing in time"  # the drop (gather.py) that makes a member a straggler


class Stragglers:
    def __init__(self) -> None:
        self._late: dict[str, list[int]] = {}  # PeerID -> [rounds still waived, rounds waived at its next cut-off]

    def waive(self, members: Iterable[str]) -> frozenset:
        """The members a round with ``members`` does not wait the grace for (this counts the round for them)."""
        waived = set()
        for member in members:
            entry = self._late.get(member)
            if entry is not None and entry[0] > 0:
                entry[0] -= 1
                waived.add(member)
        return frozenset(waived)

    def record(self, members: Iterable[str], waived: frozenset, dropped: dict) -> None:
        """After a round: ``dropped`` is PeerID -> why its update was not used (rounds.Round.dropped)."""
        for member in members:
            if not dropped.get(member, "").startswith(CUT_OFF):
                self._late.pop(member, None)  # in time (or refused for what it sent: not lateness)
            elif member not in waived:
                left, next_time = self._late.pop(member, (0, 1))
                self._late[member] = [next_time, min(2 * next_time, MAX_WAIVED)]
        while len(self._late) > REMEMBERED:
            del self._late[next(iter(self._late))]

    def __len__(self) -> int:
        return len(self._late)
