"""A striped state download's pieces (swarm/downloads.py): the part request a donor parses from the network, and the
interleaving of stripes back into a state. (Downloads over real averagers: tests/integration/test_averagers.py.)"""

from __future__ import annotations

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from atlas_swarm.swarm.downloads import MAX_REQUEST, MAX_STRIPES, interleave, parse_part_request, part_request

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
@given(st.integers(0, 40), st.integers(1, MAX_STRIPES))
def test_stripes_interleave_back_into_the_state_and_a_short_or_long_stripe_is_refused(total, n):
    state = list(range(total))
    stripes = [state[i::n] for i in range(n)]
    assert interleave(stripes, total) == state
    if total:
        longest = max(range(n), key=lambda i: len(stripes[i]))
        assert interleave([s[:-1] if i == longest else s for i, s in enumerate(stripes)], total) is None
    assert interleave([s + [0] if i == 0 else s for i, s in enumerate(stripes)], total) is None
    assert interleave([], total) is None
