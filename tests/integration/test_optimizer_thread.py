"""A real hivemind DHT and SwarmOptimizer, alone: the optimizer step runs in the training thread (see InlineExecutor),
and a peer out of sync does not wait for a round nobody will join.

hivemind runs it in a helper thread; on CPU, torch ops there start a second OpenMP pool, and libgomp then stops
spin-waiting in every pool, which cost a lone peer about 10 % of its samples/s (scripts/bench_peer.py).
"""

import threading
import time

import torch
from hivemind.averaging.control import AveragingStage

from atlas_swarm.swarm.node import PinnedDHT
from atlas_swarm.swarm.optimizer import SwarmOptimizer


class RecordingSGD(torch.optim.SGD):
    threads: list[int] = []

    def step(self, closure=None):
        RecordingSGD.threads.append(threading.get_ident())
        return super().step(closure)


def test_the_optimizer_step_runs_in_the_callers_thread():
    RecordingSGD.threads = []
    param = torch.nn.Parameter(torch.ones(4))
    dht = PinnedDHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)  # the peer's DHT class
    opt = None
    try:
        opt = SwarmOptimizer(dht=dht, run_id="inline-step", target_batch_size=4, batch_size_per_step=2,
                             optimizer=lambda params: RecordingSGD(params, lr=0.5), params=[param],
                             matchmaking_time=1.0, averaging_timeout=5.0, shutdown_timeout=2.0,
                             delay_state_averaging=False)  # as make_optimizer; fmt: skip
        for _ in range(6):  # 3 epochs of 2 steps
            param.grad = torch.ones(4)
            opt.step(batch_size=2)
            opt.zero_grad(set_to_none=True)
        assert opt.local_epoch == 3
        assert RecordingSGD.threads and set(RecordingSGD.threads) == {threading.get_ident()}
        assert torch.allclose(param.detach(), torch.full((4,), 1 - 3 * 0.5))  # three real steps of the mean gradient
    finally:
        if opt is not None:
            opt.shutdown()
        dht.shutdown()


def test_a_peer_out_of_sync_does_not_wait_for_a_round_still_looking_for_its_group():
    """A peer that finds the swarm ahead downloads state; hivemind first had its pre-scheduled gradient round "tag
    along" for up to averaging_timeout, though a round still looking for a group has nobody left to find (the others
    averaged that epoch): the peer stood still 15 s and fell further behind (a full suite's liar and receipt tests)."""
    param = torch.nn.Parameter(torch.ones(4))
    dht = PinnedDHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)  # the peer's DHT class
    opt = None
    try:
        opt = SwarmOptimizer(dht=dht, run_id="out-of-sync", target_batch_size=4, batch_size_per_step=2,
                             optimizer=lambda params: torch.optim.SGD(params, lr=0.5), params=[param],
                             matchmaking_time=1.0, averaging_timeout=15.0, shutdown_timeout=2.0,
                             delay_state_averaging=False)  # fmt: skip
        opt.scheduled_grads = control = opt._schedule_gradient_round()
        deadline = time.monotonic() + 10
        while control.stage != AveragingStage.LOOKING_FOR_GROUP and time.monotonic() < deadline:
            time.sleep(0.05)
        assert control.stage == AveragingStage.LOOKING_FOR_GROUP
        began = time.monotonic()
        opt.load_state_from_peers()
        assert time.monotonic() - began < 5.0  # hivemind's tag-along: the round's 15 s
        assert control.cancelled() and opt.scheduled_grads is None
    finally:
        if opt is not None:
            opt.shutdown()
        dht.shutdown()
