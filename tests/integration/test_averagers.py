"""Our averagers over real hivemind DHTs and averager processes: one-buffer all-reduce, state-donor declarations.

hivemind's all-reduce split every tensor among the peers separately (about 30 parts per peer for the demo's adapter),
and re-stored the state-donor DHT record after every tensor of every round; see atlas_swarm/swarm/averagers.py.
"""

import functools
import multiprocessing as mp
import time

import hivemind
import hivemind.averaging.averager as hivemind_averager
import pytest
import torch

from atlas_swarm.swarm.averagers import GradAverager, StateAverager, spanned_buffer
from tests.peers import wait_until

SHAPES = [(3, 4), (5,), (2, 2, 2)]
tensors_per_allreduce = mp.Array("i", 8)  # shared with the (forked) averager processes


class RecordingRunner(hivemind_averager.AllReduceRunner):
    def __init__(self, *, tensors, **kwargs):
        slot = next(i for i in range(len(tensors_per_allreduce)) if tensors_per_allreduce[i] == 0)
        tensors_per_allreduce[slot] = len(tensors)
        super().__init__(tensors=tensors, **kwargs)


@pytest.fixture
def two_dhts():
    first = hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    second = None
    try:
        second = hivemind.DHT(initial_peers=[str(a) for a in first.get_visible_maddrs()],
                              host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)  # fmt: skip
        yield first, second
    finally:
        for dht in (second, first):
            if dht is not None:
                dht.shutdown()


def test_gradients_are_averaged_as_one_buffer_weighted_by_samples(two_dhts, monkeypatch):
    # Prepare: two gradient averagers with different gradients, weights 1 and 3
    monkeypatch.setattr(hivemind_averager, "AllReduceRunner", RecordingRunner)  # before the averagers fork
    tensors_per_allreduce[:] = [0] * len(tensors_per_allreduce)
    grads = [[torch.full(s, float(i + 1)) * (k + 1) for k, s in enumerate(SHAPES)] for i in range(2)]
    averagers = []
    try:
        for dht, local, samples in zip(two_dhts, grads, (1, 3)):
            params = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
            averager = GradAverager(params, dht=dht, prefix="grads", target_group_size=2, min_group_size=2,
                                    min_matchmaking_time=2.0, request_timeout=1.0, start=True)  # fmt: skip
            averagers.append(averager)
            with averager.get_tensors() as tensors:
                assert spanned_buffer(tensors) is not None  # the layout the all-reduce relies on
            for param, grad in zip(params, local):
                param.grad = grad.clone()
            averager.accumulate_grads_(batch_size=samples)
        # Execute
        rounds = [a.step(wait=False, timeout=30) for a in averagers]
        groups = [r.result(40) for r in rounds]
        # Assert: both hold the sample-weighted mean; each all-reduce ran on one tensor, not one per parameter
        assert all(len(g) == 2 for g in groups)
        for averager in averagers:
            with averager.get_tensors() as tensors:
                for tensor, g1, g2 in zip(tensors, *grads):
                    assert torch.allclose(tensor, (1 * g1 + 3 * g2) / 4)
        assert sorted(tensors_per_allreduce[:])[-2:] == [1, 1] and sum(tensors_per_allreduce[:]) == 2
        # nobody downloads a gradient averager's state: it does not declare itself as a donor
        assert two_dhts[0].get("grads.all_averagers", latest=True) is None
    finally:
        for averager in averagers:
            averager.shutdown()


def declaration(dht, key: str):
    found = dht.get(key, latest=True)
    if found is None or not isinstance(found.value, dict) or not found.value:
        return None
    (entry,) = found.value.values()
    return entry.value, entry.expiration_time


def test_the_state_donor_record_is_stored_again_only_when_it_changes(two_dhts):
    # Prepare
    dht = two_dhts[0]
    params = [torch.nn.Parameter(torch.ones(s)) for s in SHAPES]
    averager = StateAverager(dht=dht, prefix="state", params=params, start=True, offload_optimizer=True,
                             optimizer=functools.partial(torch.optim.SGD, lr=0.1))  # fmt: skip
    try:
        with averager.get_tensors() as tensors:
            assert spanned_buffer(tensors) is not None
        first = wait_until(lambda: declaration(dht, "state.all_averagers"), 20, "the first declaration")
        # Execute: what an all-reduce does after each tensor it updates (hivemind stored the record again each time)
        for _ in range(5):
            averager._outer_pipe.send(("_trigger_declare_load_state", [], {}))
        time.sleep(1.0)  # a re-store takes milliseconds; asserting that none happens needs a wait
        unchanged = declaration(dht, "state.all_averagers")
        averager.state_sharing_priority = 7.0
        changed = wait_until(lambda: (d := declaration(dht, "state.all_averagers")) and d[0] == 7.0 and d, 20,
                             "the new priority in the DHT")  # fmt: skip
        # Assert
        assert unchanged == first
        assert changed[1] > first[1]
    finally:
        averager.shutdown()


def test_a_round_that_loses_a_groupmates_part_is_redone_not_half_applied(two_dhts):
    # Prepare: a pre-scheduled round between two gradient averagers, with half-second part timeouts
    from hivemind.averaging.control import AveragingStage

    grads = [[torch.full(s, float(i + 1)) for s in SHAPES] for i in range(2)]
    averagers = []
    try:
        for dht, local in zip(two_dhts, grads):
            own = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
            averager = GradAverager(own, dht=dht, prefix="late", target_group_size=2, min_group_size=2,
                                    min_matchmaking_time=1.0, request_timeout=0.5, next_chunk_timeout=0.5,
                                    start=True)  # fmt: skip
            averagers.append(averager)
            for param, grad in zip(own, local):
                param.grad = grad.clone()
            averager.accumulate_grads_(batch_size=1)
        controls = [a.schedule_step(timeout=30) for a in averagers]
        wait_until(lambda: all(c.stage == AveragingStage.AWAITING_TRIGGER for c in controls), 30, "a group")
        # Execute: one peer's training process is late, by more than the other waits for its parts (0.5 s / 1 s)
        first = averagers[0].step(control=controls[0], wait=False)
        time.sleep(2.5)  # the lateness under test
        second = averagers[1].step(control=controls[1], wait=False)
        groups = [first.result(40), second.result(40)]
        # Assert: hivemind would have ended the first round with each peer's own values in the other's half and
        # "averaged with 2 peers"; here the half-done round was put back and redone once both were there
        assert all(len(g) == 2 for g in groups)
        for averager in averagers:
            with averager.get_tensors() as tensors:
                for tensor, g1, g2 in zip(tensors, *grads):
                    assert torch.allclose(tensor, (g1 + g2) / 2)
    finally:
        for averager in averagers:
            averager.shutdown()
