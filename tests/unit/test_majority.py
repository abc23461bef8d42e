"""The one rule peers agree by (final adapter, vouched checkpoint, adapter shapes, kept runs), with numbers."""

from atlas_swarm.majority import majority, ranked, strict_majority


def test_the_most_votes_win_and_ties_go_to_the_smallest():
    assert majority([]) is None and majority({}) is None
    assert majority(["bb", "aa", "bb"]) == "bb"
    assert majority(["cc", "bb", "aa"]) == "aa"  # all different: every peer picks the same one
    assert majority(["bb", "aa", "aa", "bb"]) == "aa"
    assert majority({"b": 2, "a": 2, "c": 1}) == "a"  # a mapping of vote counts works the same


def test_a_strict_majority_needs_more_than_half():
    assert strict_majority(["s1", "s1", "s2"]) == "s1"
    assert strict_majority(["s1", "s2"]) is None  # half is not more than half
    assert strict_majority(["s1", "s2", "s3"]) is None and strict_majority([]) is None


def test_ranked_orders_by_votes_then_value():
    assert ranked({"run-b": 3, "run-a": 3, "run-c": 9, "run-d": 1}) == ["run-c", "run-a", "run-b", "run-d"]
