"""When a peer looks for its averaging groups and how long it makes an epoch's last step: pure functions of numbers
the optimizer reads from hivemind's tracker (no hivemind, no clock of their own). Why each rule is what it is:
swarm/optimizer.py, where they are applied."""

from __future__ import annotations

import math
from typing import Iterable, Optional


def horizon(averaging_timeout: float, matchmaking_time: float) -> float:
    """How far ahead of an epoch's end a peer looks for its group: as early as the round allows."""
    return max(averaging_timeout / 2, matchmaking_time + 1.0)


def seconds_to_epoch_end(eta: float, since_transition: Optional[float], last_epoch_seconds: float, peers: int,
                         rate: float, target: int, swarm_rate: float = 0.0) -> float:  # fmt: skip
    """Seconds until the swarm's epoch ends. ``eta``: the tracker's estimate (inf when it knows nothing, as between
    a transition and its next fetch); then the last epoch's length stands in, and before any (a first transition, a
    newcomer) the time the swarm takes for ``target`` samples at ``swarm_rate`` (the peers' summed samples/s at the
    last fetch; 0: unknown), else at ``peers`` times this peer's ``rate``, both counted from the transition
    ``since_transition`` seconds ago (None: no transition yet, nothing better than ``eta``)."""
    if not math.isinf(eta) or since_transition is None:
        return eta
    length = last_epoch_seconds
    if math.isinf(length):
        total = swarm_rate if swarm_rate > 0 else rate * max(1, peers)
        length = target / total if total > 0 else math.inf
    return length - since_transition


HOLD = 0.5  # seconds a leader holds its group open for a missing peer after its own epoch ended (assemble_now)


def search_ends_in(to_epoch_end: float, matchmaking_time: float, averaging_timeout: float,
                   client: bool = False) -> float:  # fmt: skip
    """Seconds from now that a round's search declares as its end (hivemind's expiration: the searcher with the
    earliest is the leader, and hivemind assembles its group then): the epoch's estimated end plus 2 x HOLD, so that
    a leader's own rule (assemble_now) decides first; at least ``matchmaking_time`` (hivemind's, and what an unknown
    end gets), and a second before the round's timeout. A ``client`` (client mode) never leads and declares nothing,
    but its join requests carry this end, and a leader whose own end is later refuses them (BAD_EXPIRATION_TIME):
    it asks with the latest end the round allows."""
    if client:
        return max(matchmaking_time, averaging_timeout - 1.0)
    if not math.isfinite(to_epoch_end):
        return matchmaking_time
    return max(matchmaking_time, min(to_epoch_end + 2 * HOLD, averaging_timeout - 1.0))


def assemble_now(now: float, looking_since: float, triggered_at: Optional[float], matchmaking_time: float,
                 members: set, expected: set, hold: float = HOLD) -> bool:  # fmt: skip
    """Does a leader with followers assemble its group now? Not before it has looked ``matchmaking_time`` (hivemind's
    window, as before), nor before its own epoch ended (its round was triggered at ``triggered_at``; None: not yet):
    then once ``members`` (its followers and itself) hold every peer it follows (``expected``), else ``hold`` seconds
    later. Until then anyone may still join: a newcomer that began its first epoch seconds before its end, which the
    leader did not follow yet, was left out when everyone followed had joined early (its first epoch alone in 3 of 5
    runs of the late-joiner bench, 2026-12-05/06); all-reduce waits for the last member's end anyway."""
    if now < looking_since + matchmaking_time or triggered_at is None:
        return False
    return expected <= members or now >= triggered_at + hold


def time_to_look(peers: int, to_epoch_end: float, delay: float, horizon_s: float) -> bool:
    """Look for a group now? Never alone; with company once the epoch (plus ``delay``, the rounds before this one)
    ends within the horizon."""
    return peers > 1 and to_epoch_end + delay <= horizon_s


def state_round_epoch(local_epoch: int, swarm_epoch: int, every: int, final: Optional[int] = None) -> Optional[int]:
    """The epoch whose start averages the peers' state, if it is the next one (every ``every`` epochs, and the
    peer's ``final`` epoch); else None."""
    next_epoch = max(local_epoch + 1, swarm_epoch)
    return next_epoch if next_epoch % every == 0 or next_epoch == final else None


def last_step_samples(batch_size: int, peers: int, rate: float, left: float) -> int:
    """Samples in the next step: ``batch_size``, or what fits in the ``left`` seconds of the epoch at ``rate``
    samples/s, never below a quarter batch (a slipping estimate must not degrade into one-sample steps). Alone,
    nobody waits: whole batches."""
    if peers <= 1 or not math.isfinite(left) or rate <= 0:
        return batch_size
    return max(1, batch_size // 4, min(batch_size, math.ceil(left * rate)))


def fine_step(batch_size: int, peers: int, rate: float, left: float) -> bool:
    """Does the next step run in fine micro-batches (train.steps.FINE_MICRO_BATCH), asking after each whether the
    swarm's epoch is over?
    With company, when the epoch's estimated end is less than two whole steps away (estimates err by a step or so
    either way). The rest of the epoch keeps the peer's own micro-batch."""
    return peers > 1 and math.isfinite(left) and rate > 0 and left < 2 * batch_size / rate


def unheld_state_wait(averaging_timeout: float, status_every: float) -> float:
    """How long a peer behind the swarm waits for a state that a strict majority of the others hold before it moves
    to the majority's epoch with its own parameters: two status refreshes (peers publish the states they hold at each
    epoch's end and every ``status_every`` seconds, so a majority that exists is seen by then), at most
    ``averaging_timeout``. Waiting longer only helps if a majority averages its state meanwhile, and while a peer
    waits, a pair of the others does not average (the pair rule counts it): after a partition whose halves were
    pairs, no two peers held the same state, and the peers behind waited averaging_timeout (15 s in the tests) for
    nothing before the groups could span the halves again."""
    return min(averaging_timeout, 2 * status_every)


def highest_epoch(records: Iterable[object]) -> int:
    """The highest int ``epoch`` among progress records (dicts); -1 if none has one."""
    epochs = [r.get("epoch") for r in records if isinstance(r, dict)]
    return max((e for e in epochs if type(e) is int), default=-1)
