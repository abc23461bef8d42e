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
from hivemind.averaging.control import AveragingStage

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
        assert_all_hold_the_mean(averagers, grads)
    finally:
        for averager in averagers:
            averager.shutdown()


def test_a_retried_round_does_not_join_a_group_formed_for_the_next_epoch(two_dhts):
    # Prepare: peer A retries its round for epoch 5 (triggered: it all-reduces as soon as it has a group) while peer B
    # has pre-scheduled its round for epoch 6 (not triggered for seconds). hivemind keys both rounds alike.
    grads = [[torch.full(s, float(i + 1)) for s in SHAPES] for i in range(2)]
    averagers, params = [], []
    try:
        for dht in two_dhts:
            own = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
            averagers.append(GradAverager(own, dht=dht, prefix="epochs", target_group_size=2, min_group_size=2,
                                          min_matchmaking_time=1.0, request_timeout=0.5, next_chunk_timeout=0.5,
                                          start=True))  # fmt: skip
            params.append(own)

        def accumulate(i):
            for param, grad in zip(params[i], grads[i]):
                param.grad = grad.clone()
            averagers[i].accumulate_grads_(batch_size=1)

        accumulate(0), accumulate(1)
        next_epoch = averagers[1].schedule_step(gather=6, timeout=60)
        retried = averagers[0].step(gather=5, timeout=4, wait=False)
        # Execute: watch B's round while A's runs to its deadline
        stages = set()
        while not retried.done():
            stages.add(next_epoch.stage)
            time.sleep(0.05)
        # Assert: A found no group and kept its own gradients; B kept looking for a group of its own epoch (joined
        # by A's retry, hivemind's B would await its trigger in a group that A leaves)
        with pytest.raises(Exception, match="could not find a group"):
            retried.result(0)
        assert AveragingStage.AWAITING_TRIGGER not in stages and not next_epoch.done()
        with averagers[0].get_tensors() as tensors:
            assert all(torch.equal(t, g) for t, g in zip(tensors, grads[0]))
        # and the epoch-6 rounds of both still make one group and average (A's step used up its accumulators)
        accumulate(0)
        mine = averagers[0].schedule_step(gather=6, timeout=60)
        wait_until(lambda: all(c.stage == AveragingStage.AWAITING_TRIGGER for c in (mine, next_epoch)), 30, "a group")
        rounds = [a.step(control=c, wait=False) for a, c in zip(averagers, (mine, next_epoch))]
        gathered = [r.result(40) for r in rounds]
        assert all(sorted(g.values()) == [6, 6] for g in gathered)
        assert_all_hold_the_mean(averagers, grads)
    finally:
        for averager in averagers:
            averager.shutdown()


def assert_all_hold_the_mean(averagers, grads):
    for averager in averagers:
        with averager.get_tensors() as tensors:
            for tensor, g1, g2 in zip(tensors, *grads):
                assert torch.allclose(tensor, (g1 + g2) / 2)
