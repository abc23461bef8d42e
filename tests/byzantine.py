"""Our own peer with one attack patched in: ``ATLAS_ATTACK=NAME python -m tests.byzantine PEER_ARGS...``.

The attacker is what anyone can run: the project's open-source peer, its own fresh key, the run id and a multiaddr
that the first peer prints. Each attack patches hivemind's classes (which our peer subclasses), so the same attack
runs against the code of any commit. ``ATLAS_ATTACK`` may name several, separated by commas.
"""

from __future__ import annotations

import os
import sys
import typing

import torch
from hivemind.averaging.averager import DecentralizedAverager
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.optim.state_averager import TrainingStateAverager

ATTACKS = {}


def attack(fn):
    ATTACKS[fn.__name__] = fn
    return fn


def _tamper_gradients(transform):
    """What this peer sends as its gradient: ``transform`` of its honest one (in the shared buffer the averager reads)."""
    honest = GradientAverager.load_accumulators_into_averager_

    def load_accumulators_into_averager_(self):
        honest(self)
        with torch.no_grad(), self.get_tensors() as tensors:
            for t in tensors:
                t.copy_(transform(t))

    GradientAverager.load_accumulators_into_averager_ = load_accumulators_into_averager_


@attack
def nan_gradient():
    _tamper_gradients(lambda t: torch.full_like(t, float("nan")))


@attack
def flip_x1e6_gradient():
    """The honest gradient sign-flipped and scaled by 1e6."""
    _tamper_gradients(lambda t: -1e6 * t)


@attack
def lying_weight():
    """Claim a million times the samples this peer accumulated (hivemind takes each sender's weight as sent)."""
    honest = GradientAverager.step

    def step(self, weight=None, **kwargs):
        return honest(self, weight=float(max(1, self.local_samples_accumulated)) * 1e6, **kwargs)

    GradientAverager.step = step


@attack
def poison_state():
    """Serve whoever downloads state, by turns, the honest parameters with every Adam statistic flattened (the digest
    does not cover statistics: a downloader that loads them fails its next optimizer step) and parameters of 100.0
    (what a majority's digest refuses); and declare the highest donor priority."""
    honest = TrainingStateAverager.get_current_state
    served = [0]

    def get_current_state(self):
        metadata, tensors, infos = honest(self)
        count = sum(len(g["params"]) for g in self.optimizer.param_groups)
        served[0] += 1
        if served[0] % 2 == 0:
            return metadata, [torch.full_like(t, 100.0) if i < count else t for i, t in enumerate(tensors)], infos
        return metadata, [t if i < count else t.reshape(-1) for i, t in enumerate(tensors)], infos

    TrainingStateAverager.get_current_state = get_current_state
    prop = DecentralizedAverager.state_sharing_priority
    DecentralizedAverager.state_sharing_priority = property(prop.fget, lambda self, _value: prop.fset(self, 1e9))


@attack
def fake_progress():
    """Progress records a million epochs ahead, with more samples than the whole epoch needs."""
    honest = ProgressTracker._get_local_progress

    def _get_local_progress(self, local_epoch, samples_accumulated):
        return honest(self, local_epoch + 10**6, samples_accumulated + 10**9)

    ProgressTracker._get_local_progress = _get_local_progress


@attack
def one_epoch_ahead():
    """Progress records one epoch ahead of the peer's own, with its true samples and rate, while it trains in step
    with the others: honest peers are one epoch apart for a moment after a transition (admission.EPOCH_SLACK), and a
    reader one epoch behind hivemind's global epoch ends its own at once."""
    from hivemind import DHT

    from atlas_swarm.swarm import tracker

    store = DHT.store

    def published(self, key, value, *args, **kwargs):
        if str(key).endswith("_progress") and isinstance(value, dict) and type(value.get("epoch")) is int:
            value = dict(value, epoch=value["epoch"] + 1)
        return store(self, key, value, *args, **kwargs)

    read = tracker.sane_progress

    def sane_progress(records, own, *args, **kwargs):  # its own record as it is, so that it does not race itself
        records = {p: dict(r, epoch=r["epoch"] - 1) if p == own else r for p, r in records.items()}
        return read(records, own, *args, **kwargs)

    DHT.store, tracker.sane_progress = published, sane_progress


@attack
def tracker_bug():
    """Not an attack: a bug of ours that ends the progress tracker's thread (its parse raises there)."""
    import threading

    from atlas_swarm.swarm import tracker

    honest = tracker.sane_progress

    def sane_progress(*args, **kwargs):
        if isinstance(threading.current_thread(), tracker.ThrottledTracker):
            raise RuntimeError("a bug in the progress rule")
        return honest(*args, **kwargs)

    tracker.sane_progress = sane_progress


@attack
def inflate_progress():
    """Progress records at the peer's own epoch that claim 10^6 samples more than it did, at 10^6 times its rate, and
    written 10^4 s before they were (a reader adds the rate times the record's age): each would end every epoch the
    moment it is read, if counted as written."""
    honest = ProgressTracker._get_local_progress

    def _get_local_progress(self, local_epoch, samples_accumulated):
        real = honest(self, local_epoch, samples_accumulated + 10**6)
        return real.copy(update={"samples_per_second": real.samples_per_second * 10**6 + 10**6,
                                 "time": real.time - 10**4})

    ProgressTracker._get_local_progress = _get_local_progress


@attack
def skip_admission():
    """Leave out the peer's own check that the run admits it (a stranger in a private run)."""
    try:
        from atlas_swarm.gatekeeper import Gatekeeper
    except ImportError:  # code from before admission existed
        return
    Gatekeeper.check_self = lambda self: None


@attack
def steal_state():
    """Train nothing: once started, watch the run's statuses, and whenever its peers claim a state of a newer epoch
    than the last tried (epoch 1 on; at most 3 tries, for at most 120 s), download it from whoever declares it: a
    stripe from each declared donor, then each one's whole state (hivemind's rpc_download_state), as a newcomer does.
    What came back goes to ``<--out>/stolen.jsonl``, a line per try. In a private run, the listed peers' state (the
    trained adapter and Adam's moments) is what a stranger should not get."""
    import json
    import time
    from pathlib import Path

    from hivemind.averaging.averager import DecentralizedAverager

    import atlas_swarm.peer as peer
    from atlas_swarm.peer_state import expected_states

    out = Path(sys.argv[sys.argv.index("--out") + 1]) / "stolen.jsonl"
    honest = peer.announce

    def announce(p):
        honest(p)
        tried, deadline = [0], time.monotonic() + 120
        while len(tried) <= 3 and time.monotonic() < deadline:
            claims = expected_states(p)  # what the run's peers say they hold (read from their statuses)
            top = max((epoch for epoch, _ in claims), default=0)
            if top > tried[-1]:
                tried.append(top)
                averager = p.opt.state_averager
                averager._outer_pipe.send(("_expect_states", [sorted(claims)], {}))
                try:
                    got = DecentralizedAverager.load_state_from_peers(averager, timeout=30)
                except Exception:  # (no answer in time)
                    got = None
                line = {"claimed_epoch": top, "got": got is not None,
                        "state_epoch": got[0].get("epoch") if got is not None else None}
                with out.open("a") as f:
                    f.write(json.dumps(line) + "\n")
            time.sleep(0.5)

    peer.announce = announce


@attack
def freeload():
    """Take the groupmates' updates and give none (the issue's "downloads state without contributing"): each exchange
    of our gather protocol (atlas_swarm/swarm/gather.py, so not for commits before it) carries this peer's signed
    header but no tensor. Its groupmates still send it theirs, both when it calls them and when they call it, and it
    averages them into its own adapter; with a wallet, it signs the receipt of what its round saw (everyone) as any
    peer does."""
    from hivemind.proto import averaging_pb2, runtime_pb2

    from atlas_swarm.swarm import gather

    async def _messages(own: list, group_id: bytes):
        blob, _serialized = own
        yield averaging_pb2.DownloadData(metadata=blob, tensor_part=runtime_pb2.Tensor())

    gather._messages = _messages


@attack
def tamper_relays():
    """As a reachable groupmate, forward the client-mode members' updates to one another (swarm/gather.py's relay)
    with their weight claims multiplied by 1e6, the senders' signatures kept (so not for commits before relays)."""
    import msgpack

    from atlas_swarm.swarm.gather import GatherAverage

    honest = getattr(GatherAverage, "rpc_gather_relay", None)
    if honest is None:  # a commit before relays: nothing to tamper with
        return

    async def rpc_gather_relay(self, request, context):
        async for message in honest(self, request, context):
            if message.metadata:
                header, signature = msgpack.unpackb(message.metadata, raw=True)
                fields = msgpack.unpackb(header, raw=True)
                fields[4] = fields[4] * 1e6
                message.metadata = msgpack.packb([msgpack.packb(fields), signature])
            yield message

    rpc_gather_relay.__annotations__ = typing.get_type_hints(honest)  # hivemind registers handlers by these
    GatherAverage.rpc_gather_relay = rpc_gather_relay


def _drift_moments(factor: float):
    """Not an attack: the state a missed round leaves behind. After the peer's first optimizer step its Adam second
    moments are scaled by ``factor``, as if that step's gradient had been its own rather than the group's: an honest
    peer whose moments differ from its groupmates' for the rest of the run (state rounds average parameters only)."""
    honest = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        result = honest(self, *args, **kwargs)
        moments = [s["exp_avg_sq"] for s in self.state.values() if "exp_avg_sq" in s]
        if not getattr(self, "_drifted", False) and any(bool(m.any()) for m in moments):  # not hivemind's zero step
            self._drifted = True
            with torch.no_grad():
                for m in moments:
                    m.mul_(factor)
        return result

    torch.optim.AdamW.step = step


@attack
def no_final_state_round():
    """Not an attack: the transition into the peer's last epoch does not average the state (as it did before
    2026-12-03, and as when that round forms no group), so peers whose parameters differ finish with them."""
    from atlas_swarm.swarm.optimizer import SwarmOptimizer

    honest = SwarmOptimizer._update_global_epoch

    def _update_global_epoch(self, grad_scaler):
        final, self.final_epoch = self.final_epoch, None
        try:
            return honest(self, grad_scaler)
        finally:
            self.final_epoch = final

    SwarmOptimizer._update_global_epoch = _update_global_epoch


ATTACKS["drifted_moments_x4"] = lambda: _drift_moments(4.0)
ATTACKS["drifted_moments_x9"] = lambda: _drift_moments(9.0)


def main() -> int:
    for name in filter(None, os.environ.get("ATLAS_ATTACK", "").split(",")):
        ATTACKS[name]()
    from atlas_swarm.model.fit import skip_bitsandbytes_unless_quantizing

    skip_bitsandbytes_unless_quantizing(sys.argv[1:])  # as `python -m atlas_swarm.peer` does
    from atlas_swarm.peer import main as peer_main

    return peer_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
