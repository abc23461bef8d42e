"""The aggregation rules on tensors with planted outliers: what one liar can do to each rule, and determinism."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from atlas_swarm.train.aggregate import aggregate, bounded_weights, centered_clip, mean, trim_count, trimmed_mean


def honest(n, d=200, seed=0, spread=0.1):
    """n updates around one true gradient (all ones), as torch tensors like the averager holds."""
    g = torch.Generator().manual_seed(seed)
    return [torch.ones(d) + spread * torch.randn(d, generator=g) for _ in range(n)]


def distance_from_truth(value) -> float:
    return float(np.linalg.norm(value - 1.0) / np.sqrt(value.size))


@pytest.mark.parametrize("attack", ["x1e6", "sign_flip_x1e6", "random_x100", "constant_1e3"])
def test_one_liar_in_four_moves_the_robust_rules_little_and_the_mean_a_lot(attack):
    # Prepare: 3 honest updates, 1 attacker claiming the cap as its weight
    updates = honest(3)
    liar = {"x1e6": updates[0] * 1e6, "sign_flip_x1e6": -updates[0] * 1e6,
            "random_x100": 100 * torch.randn(200, generator=torch.Generator().manual_seed(9)),
            "constant_1e3": torch.full((200,), 1e3)}[attack]  # fmt: skip
    updates, weights = updates + [liar], [8, 8, 8, 1e9]
    clean = mean(updates[:3], weights[:3]).value

    # Execute
    plain = mean(updates, weights, cap=64)
    clipped = centered_clip(updates, weights, cap=64)
    trimmed = trimmed_mean(updates)

    # Assert: the mean is taken over; the robust rules stay near the honest mean and flag the liar (member 3)
    assert distance_from_truth(plain.value) > 10
    for result in (clipped, trimmed):
        assert distance_from_truth(result.value) < 2 * distance_from_truth(clean) + 0.05
        assert result.flagged == (3,)
    assert clipped.weights[3] == 0.0 and clipped.kept[3] == 0.0  # clipped hard, then left out


def test_honest_groups_are_not_flagged_and_centered_clip_is_close_to_the_mean():
    updates = honest(4, seed=3)
    weights = [8, 8, 8, 8]
    assert centered_clip(updates, weights).flagged == ()
    assert trimmed_mean(updates).flagged == ()
    gap = np.abs(centered_clip(updates, weights).value - mean(updates, weights).value).max()
    assert gap < 0.05  # clipping at the median distance trims honest spread only slightly


def test_two_members_average_plainly_under_every_rule():
    a, b = torch.zeros(10), torch.ones(10)
    for rule in ("mean", "centered_clip", "trimmed_mean"):
        assert np.allclose(aggregate(rule, [a, b], [1, 1]).value, 0.5)


def test_three_of_eight_liars_are_trimmed_by_trimmed_mean_and_clipped_by_centered_clip():
    updates = honest(5) + [torch.full((200,), -1e6)] * 3
    weights = [8] * 8
    assert trim_count(8, 0.4) == 3
    for result in (trimmed_mean(updates), centered_clip(updates, weights)):
        assert distance_from_truth(result.value) < 0.2
        assert set(result.flagged) == {5, 6, 7}


def test_weights_are_capped_by_the_spec_and_the_median():
    assert list(bounded_weights([4, 8, 1e30, 8], cap=64, robust=False)) == [4, 8, 64, 8]
    assert list(bounded_weights([4, 8, 1e30, 8], cap=64, robust=True)) == [4, 8, 8, 8]
    assert list(bounded_weights([0, 0], cap=64, robust=True)) == [1, 1]  # nobody claims: equal weights


def test_different_sizes_are_refused():
    with pytest.raises(ValueError, match="different sizes"):
        mean([torch.zeros(3), torch.zeros(4)], [1, 1])


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 8), st.integers(1, 300), st.integers(0, 2**31 - 1),
       st.sampled_from(["mean", "centered_clip", "trimmed_mean"]))  # fmt: skip
def test_the_result_is_bit_identical_whatever_the_thread_count(n, d, seed, rule):
    # every honest member computes the aggregate itself; the final vote needs equal bits, not close values
    rng = np.random.default_rng(seed)
    updates = [rng.standard_normal(d).astype(np.float32) * rng.uniform(0.01, 100) for _ in range(n)]
    weights = list(rng.integers(1, 64, n))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = aggregate(rule, updates, weights).value.tobytes()
        torch.set_num_threads(2)
        two = aggregate(rule, [u.copy() for u in updates], weights).value.tobytes()
    finally:
        torch.set_num_threads(before)
    assert one == two
    assert np.isfinite(np.frombuffer(one, dtype=np.float32)).all()


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9), st.integers(1, 50), st.integers(0, 2**31 - 1), st.booleans())
def test_the_sorted_median_is_numpys_bit_for_bit(n, d, seed, ties):
    # centered_clip starts from _median (one sort) instead of np.median (partitions): the same bits, faster
    from atlas_swarm.train.aggregate import _median

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) * rng.uniform(1e-6, 1e6)
    if ties:
        x = np.round(x, 0)
    assert _median(x).tobytes() == np.median(x, axis=0).tobytes()


def iterated_centered_clip(updates, weights, tau=None):
    """CenteredClip as the module docstring writes it, on the vectors themselves (the implementation before the Gram
    matrix): the reference the coefficient form must agree with."""
    from atlas_swarm.train.aggregate import CLIP_ITERATIONS, HARD_CLIP, _median

    x = np.stack([np.asarray(u, dtype=np.float64) for u in updates])
    w = bounded_weights(weights, np.inf, robust=True)
    v = _median(x)
    tau = float(np.median(np.linalg.norm(x - v, axis=1))) if tau is None else tau

    def run(w, v):
        for _ in range(CLIP_ITERATIONS):
            keep = np.minimum(1.0, tau / np.maximum(np.linalg.norm(x - v, axis=1), 1e-300))
            step = ((x - v) * (w * keep)[:, None]).sum(axis=0) / w.sum()
            v = v + step
            if np.linalg.norm(step) <= 1e-7 * tau:
                break
        return v, np.minimum(1.0, tau / np.maximum(np.linalg.norm(x - v, axis=1), 1e-300))

    keep = np.ones(len(w))
    if tau > 0:
        v, keep = run(w, v)
        hard = keep < HARD_CLIP
        if hard.any() and not hard.all():
            v, keep = run(np.where(hard, 0.0, w), v)
            keep = np.where(hard, 0.0, keep)
    return v, keep


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.integers(2, 8), st.integers(1, 300), st.integers(0, 2**31 - 1), st.sampled_from([0, 1, 2]))
def test_centered_clip_on_coefficients_is_the_iteration_on_vectors(n, d, seed, liars):
    # Prepare: honest updates around a common direction, and up to 2 outliers (x100, sign-flipped x1e4)
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(d)
    updates = [(base + rng.uniform(0.1, 1.0) * rng.standard_normal(d)).astype(np.float32) for _ in range(n)]
    for i in range(min(liars, n - 1)):
        updates[i] = updates[i] * (100 if i == 0 else -1e4)
    weights = list(rng.integers(1, 64, n).astype(float))
    # Execute
    ours = centered_clip(updates, weights)
    value, keep = iterated_centered_clip(updates, weights)
    # Assert: equal up to float32 rounding of the result, the same members clipped and flagged
    assert np.abs(ours.value - value).max() <= 1e-6 * max(np.abs(value).max(), 1e-30)
    assert np.allclose(ours.kept, keep, atol=1e-6)
    assert ours.flagged == tuple(int(i) for i in np.flatnonzero(keep < 0.5))
