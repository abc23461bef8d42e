"""How a group's updates become one: the weighted mean and two robust rules, as pure functions (no network, no torch).

Every member of an averaging group computes the aggregate itself from the same signed updates (swarm/gather.py), so
honest members must end with bit-identical results. Hence numpy in float64 and only operations whose result does
not depend on the CPU or thread count: element-wise arithmetic (IEEE-exact on every SIMD width), sorts, and
``np.add.reduce``, whose pairwise summation order is fixed by numpy's code (not by BLAS, not by threads; torch's
reductions split by thread count). Members come in the caller's order (sorted PeerIDs); the result is float32.

    mean            sum(w_i x_i) / sum(w_i): what hivemind does; one member can move it anywhere
    centered_clip   Karimireddy et al. 2021, as BTARD (Gorbunov et al., ICML 2022) uses it: from a robust start,
                    v <- v + sum(w_i min(1, tau/|x_i - v|) (x_i - v)) / sum(w_i); a member moves v by at most its
                    weight's share of tau, whatever it sends; members clipped hard are then left out
    trimmed_mean    coordinate-wise: drop the k largest and k smallest values of every coordinate, average the rest

``bounded_weights`` is the weight rule every rule applies first: a claim is capped by the spec's per-peer cap, and
for the robust rules by the group's median claim, so no member outweighs the median member.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

RULES = ("mean", "centered_clip", "trimmed_mean")
CLIP_ITERATIONS = 50  # CenteredClip converges in a few iterations from the median start; this bounds the work
HARD_CLIP = 0.5  # a member is flagged when the final clip keeps less than half of its deviation from the result


@dataclass(frozen=True)
class Aggregate:
    value: np.ndarray  # float32, the aggregated update
    weights: tuple[float, ...]  # each member's weight after bounding (the receipt's weight)
    kept: tuple[float, ...]  # centered_clip: the share of its deviation each member kept (1.0 = not clipped);
    #                          trimmed_mean: the share of its coordinates that were not trimmed; mean: all 1.0
    flagged: tuple[int, ...]  # members (indices) clipped or trimmed hard: the round's outliers


def bounded_weights(claims: Sequence[float], cap: float, robust: bool) -> np.ndarray:
    """Each claimed weight capped at ``cap``, and for robust rules at the median claim; claims must be finite and
    >= 0 (the caller refuses a member whose claim is not: it is dropped from the round)."""
    w = np.minimum(np.asarray(claims, dtype=np.float64), float(cap))
    if robust and len(w) > 2:
        w = np.minimum(w, np.median(w))
    if not np.any(w > 0):
        w = np.ones_like(w)  # nobody claims a sample (a state round of newcomers): equal weights
    return w


def _stack(updates: Sequence) -> np.ndarray:
    """The updates as the rows of one float64 array, allocated once (np.stack of float64 copies allocated n + 1
    arrays of a few MB, each mapped and page-faulted anew unless the process keeps its heap: rounds.roomy_heap)."""
    rows = [np.asarray(u).reshape(-1) for u in updates]
    if not rows:
        raise ValueError("nothing to aggregate")
    if len({r.size for r in rows}) != 1:
        raise ValueError(f"updates of different sizes: {sorted({r.size for r in rows})}")
    x = np.empty((len(rows), rows[0].size), dtype=np.float64)
    for i, r in enumerate(rows):
        x[i] = r
    return x


def _median(x: np.ndarray) -> np.ndarray:
    """np.median(x, axis=0), bit for bit, from one sort of each column (np.median partitions: 1.6x slower here)."""
    s, n = np.sort(x, axis=0), x.shape[0]
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def mean(updates: Sequence, weights: Sequence[float], cap: float = math.inf) -> Aggregate:
    x, w = _stack(updates), bounded_weights(weights, cap, robust=False)
    value = np.add.reduce(x * w[:, None], axis=0) / np.add.reduce(w)
    n = len(w)
    return Aggregate(value.astype(np.float32), tuple(map(float, w)), (1.0,) * n, ())


def _clip_iterations(g: np.ndarray, w: np.ndarray, c: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """CenteredClip's iterations on coefficients: v = m + sum_i c_i d_i, where d_i = x_i - m are the members'
    deviations from the median m and ``g`` their Gram matrix (g_ij = d_i . d_j). Every iterate stays in that span
    (v <- v + sum_i a_i (x_i - v)), so |x_i - v|^2 = g_ii - 2 (g c)_i + c.g.c: each iteration costs O(n^2), not
    passes over the updates (a 7B-sized adapter's 4 x 16.8M values: 13 iterations of 4 passes took 4-6 s here and
    2 GB of temporaries; the averager was the process the out-of-memory killer took). Small sums in np.add.reduce,
    never BLAS: the same bits on every member. Returns the final coefficients and each member's kept share."""
    total = np.add.reduce(w)

    def distances(c: np.ndarray) -> np.ndarray:
        gc = np.add.reduce(g * c[None, :], axis=1)
        return np.sqrt(np.maximum(np.diagonal(g) - 2 * gc + np.add.reduce(c * gc), 0.0))

    for _ in range(CLIP_ITERATIONS):
        keep = np.minimum(1.0, tau / np.maximum(distances(c), 1e-300))
        a = w * keep / total
        delta = a - np.add.reduce(a) * c  # v' - v = sum_i a_i (d_i - sum_j c_j d_j)
        c = c + delta
        step = float(np.sqrt(max(np.add.reduce(delta * np.add.reduce(g * delta[None, :], axis=1)), 0.0)))
        if step <= 1e-7 * tau:
            break
    return c, np.minimum(1.0, tau / np.maximum(distances(c), 1e-300))


def centered_clip(updates: Sequence, weights: Sequence[float], tau: Optional[float] = None,
                  cap: float = math.inf) -> Aggregate:  # fmt: skip
    """CenteredClip from the coordinate-wise median. ``tau`` None: the median distance of the updates from that
    median (a scale only a majority can set); with 2 members that keeps both whole, i.e. the mean.

    Members it clips hard (more than 2 tau from the result) are then left out and the clipping is run again over
    the others: a clipped outlier still pulls the result by its weight's share of tau every round, which with a
    random x100 update cost 10 % of held-out loss on the demo task (bench_robust, 4 peers, 1 attacker); left out,
    2.x % (README "Measured")."""
    x, w = _stack(updates), bounded_weights(weights, cap, robust=True)
    m = _median(x)
    x -= m  # the deviations d_i, in place (the stack is ours)
    n = len(w)
    g = np.empty((n, n))
    for i in range(n):
        for j in range(i, n):
            g[i, j] = g[j, i] = np.add.reduce(x[i] * x[j])
    if tau is None:
        tau = float(np.median(np.sqrt(np.diagonal(g))))
    keep, c = np.ones(n), np.zeros(n)
    if tau > 0:
        c, keep = _clip_iterations(g, w, c, tau)
        hard = keep < HARD_CLIP
        if hard.any() and not hard.all():
            w = np.where(hard, 0.0, w)
            c, keep = _clip_iterations(g, w, c, tau)
            keep = np.where(hard, 0.0, keep)
    v = m
    for i in range(n):
        if c[i] != 0.0:
            v += c[i] * x[i]
    flagged = tuple(int(i) for i in np.flatnonzero(keep < HARD_CLIP))
    return Aggregate(v.astype(np.float32), tuple(map(float, w)), tuple(map(float, keep)), flagged)


def trim_count(members: int, beta: float) -> int:
    """Values dropped at each end of every coordinate: ceil(beta * n), leaving at least one (the median)."""
    return max(0, min(math.ceil(beta * members - 1e-9), (members - 1) // 2))


def trimmed_mean(updates: Sequence, beta: float = 0.4) -> Aggregate:
    """Coordinate-wise trimmed mean, unweighted (a weight cannot buy a trimmed value back). With beta 0.4 a group of
    4 drops 1 at each end, of 8 drops 3: what a minority of 1 in 4 and 3 in 8 needs."""
    x = _stack(updates)
    n = x.shape[0]
    k = trim_count(n, beta)
    order = np.argsort(x, axis=0, kind="stable")
    kept_rows = order[k : n - k]
    value = np.add.reduce(np.take_along_axis(x, kept_rows, axis=0), axis=0) / (n - 2 * k)
    trimmed = np.zeros(n)
    if k:
        for rows in (order[:k], order[n - k :]):
            trimmed += np.bincount(rows.reshape(-1), minlength=n)
    kept = 1.0 - trimmed / x.shape[1]
    expected = 1.0 - 2 * k / n  # an ordinary member keeps about this share
    flagged = tuple(int(i) for i in np.flatnonzero(kept < expected / 2)) if k else ()
    return Aggregate(value.astype(np.float32), (1.0,) * n, tuple(map(float, kept)), flagged)


def aggregate(rule: str, updates: Sequence, weights: Sequence[float], cap: float = math.inf,
              tau: Optional[float] = None, beta: float = 0.4) -> Aggregate:  # fmt: skip
    if rule == "mean":
        return mean(updates, weights, cap)
    if rule == "centered_clip":
        return centered_clip(updates, weights, tau, cap)
    if rule == "trimmed_mean":
        result = trimmed_mean(updates, beta)
        w = bounded_weights(weights, cap, robust=True)
        return Aggregate(result.value, tuple(map(float, w)), result.kept, result.flagged)
    raise ValueError(f"unknown aggregation rule {rule!r}: one of {', '.join(RULES)}")
