from atlas_swarm.swarm.consensus import canonical_hash


def test_majority_wins_and_ties_pick_the_smallest_hash():
    assert canonical_hash([]) is None
    assert canonical_hash(["bb", "aa", "bb"]) == "bb"
    assert canonical_hash(["cc", "bb", "aa"]) == "aa"  # all different: every peer picks the same one
    assert canonical_hash(["bb", "aa", "aa", "bb"]) == "aa"
