"""A striped state download's pieces (swarm/downloads.py): the part request a donor parses from the network, and the
interleaving of stripes back into a state. (Downloads over real averagers: tests/integration/test_averagers.py.)"""

from __future__ import annotations

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from atlas_swarm.swarm.downloads import (
    MAX_REQUEST,
    MAX_STRIPES,
    interleave,
    parse_part_request,
    part_request,
    stripes_of,
)

SETTINGS = settings(max_examples=300, deadline=None, derandomize=True)


def test_every_part_a_downloader_asks_for_parses_back():
    for of in range(1, MAX_STRIPES + 1):
        for part in range(of):
            assert parse_part_request(part_request(part, of)) == (part, of)


@SETTINGS
@given(st.binary(max_size=2 * MAX_REQUEST)
       | st.builds(msgpack.packb, st.lists(st.integers(-(2**63), 2**64 - 1) | st.booleans() | st.floats()
                                           | st.none() | st.binary(max_size=8), max_size=3)))  # fmt: skip
def test_any_bytes_are_refused_or_a_part_a_donor_can_serve(blob):
    asked = parse_part_request(blob)
    assert asked is None or (type(asked[0]) is int and type(asked[1]) is int
                             and 0 <= asked[0] < asked[1] <= MAX_STRIPES)  # fmt: skip


def test_booleans_and_oversized_requests_are_refused():
    assert parse_part_request(msgpack.packb([True, 2])) is None
    assert parse_part_request(msgpack.packb([0, MAX_STRIPES + 1])) is None
    assert parse_part_request(part_request(0, 2) + b"\0" * MAX_REQUEST) is None
    assert parse_part_request("not bytes") is None


@SETTINGS
@given(st.lists(st.integers(0, 2**20), max_size=70), st.integers(1, MAX_STRIPES))
def test_stripes_split_a_state_in_about_equal_bytes_and_interleave_back(sizes, n):
    stripes = stripes_of(sizes, n)
    # every tensor in exactly one stripe, each stripe in the state's order, and no stripe more than a tensor above
    # its share (the greedy bound)
    assert sorted(i for s in stripes for i in s) == list(range(len(sizes)))
    assert all(s == sorted(s) for s in stripes)
    loads = [sum(sizes[i] for i in s) for s in stripes]
    assert max(loads) <= sum(sizes) / n + max(sizes, default=0)
    state = [f"t{i}" for i in range(len(sizes))]
    parts = [[state[i] for i in s] for s in stripes]
    assert interleave(parts, stripes) == state
    if sizes:
        longest = max(range(n), key=lambda k: len(stripes[k]))
        assert interleave([p[:-1] if k == longest else p for k, p in enumerate(parts)], stripes) is None
    assert interleave([p + ["extra"] if k == 0 else p for k, p in enumerate(parts)], stripes) is None
    assert interleave([], stripes) is None


def test_an_adam_state_splits_in_thirds_not_by_every_third_tensor():
    # 16 parameters, then per parameter exp_avg, exp_avg_sq and a 4-byte step (hivemind's order): every third tensor
    # put every step in one stripe (13 % of the bytes in one, 43 % in each other)
    sizes = [20480] * 16 + [20480, 20480, 4] * 16
    loads = [sum(sizes[i] for i in s) for s in stripes_of(sizes, 3)]
    assert max(loads) - min(loads) <= 20480
    assert [sum(sizes[i::3]) for i in range(3)] == [122944, 430080, 430080]
