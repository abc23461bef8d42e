"""One peer's run as the phases of `peer.py` share it (`Progress`), and what the peer tells the run about itself
(its signed status record, its progress line) and reads of the others' statuses: their epochs for the progress
rule, and the states a state download must match."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import psutil
import torch

from atlas_swarm.admission import trusted_states
from atlas_swarm.checkpoints.publish import AdapterPublisher
from atlas_swarm.config import PeerConfig, RunSpec
from atlas_swarm.gatekeeper import Gatekeeper
from atlas_swarm.proofs import EpochRecord
from atlas_swarm.stopping import GracefulStop
from atlas_swarm.swarm import PeerStatus, Swarm
from atlas_swarm.swarm.records import finite, not_finite, parse_state, state_claim
from atlas_swarm.train.data import Batches
from atlas_swarm.ui import Reporter

if TYPE_CHECKING:  # web3 takes a second to import: a peer without a chain never does
    from atlas_swarm.chain.session import ChainSession

EpochHook = Callable[[EpochRecord], None]


@dataclass
class RunResult:
    run_id: Optional[str]  # None: stopped before the run spec was known
    peer_id: Optional[str]
    epoch: int
    samples_total: int
    steps: int
    last_loss: Optional[float]
    adapter_dir: Optional[str]
    refused: int = 0  # requests and records refused or ignored (refused, below)
    outliers: int = 0  # groupmates' updates clipped or trimmed hard
    refusals: dict = field(default_factory=dict)  # ``refused`` by kind (swarm/gate.py's counts), the nonzero ones


@dataclass
class Progress:
    """One peer's run: its settings, the services each phase opens (None until opened) and what it has done."""

    cfg: PeerConfig
    reporter: Reporter
    stop: GracefulStop
    out: Path
    spec: Optional[RunSpec] = None
    swarm: Optional[Swarm] = None
    chain: Optional[ChainSession] = None
    gatekeeper: Optional[Gatekeeper] = None
    publisher: Optional[AdapterPublisher] = None
    model: Any = None
    params: list = field(default_factory=list)  # the adapter's trainable tensors
    opt: Any = None  # swarm.SwarmOptimizer
    device: str = "cpu"
    precision: Any = None
    checkpointing: bool = False  # gradient checkpointing on (--gradient-checkpointing, or auto)
    shapes: str = ""
    batches: Optional[Batches] = None
    batch_size: int = 0
    micro: int = 0
    hooks: list[EpochHook] = field(default_factory=list)
    epoch: int = 0
    samples_total: int = 0
    steps: int = 0
    loss: Optional[float] = None
    rounds_averaged: int = 0
    rounds_failed: int = 0
    outliers: int = 0  # groupmates' updates our aggregation clipped or trimmed hard
    last_outliers: tuple[str, ...] = ()
    states: list = field(default_factory=list)  # "epoch:digest" of our parameters at our last 4 epochs (statuses)
    final_hash: Optional[str] = None  # the final adapter's hash we published (our leaving status repeats it)
    saved: Optional[Path] = None
    startup: dict = field(default_factory=dict)  # phase -> seconds it took, from the process's start to "started"
    _mark: float = field(default_factory=lambda: psutil.Process().create_time())

    def phase(self, name: str) -> None:
        """The phase ``name`` of the start-up ended now (the "started" event reports them)."""
        now = time.time()
        self.startup[name] = round(now - self._mark, 2)
        self._mark = now

    def result(self) -> RunResult:
        return RunResult(self.spec.run_id if self.spec else None, self.swarm.peer_id if self.swarm else None,
                         self.epoch, self.samples_total, self.steps, self.loss, str(self.saved) if self.saved else None,
                         refused(self) if self.opt is not None else 0, self.outliers,
                         {k: n for k, n in self.opt.trust_counts().items() if n} if self.opt is not None else {})

    def next_batch(self, n: int) -> dict:
        return self.batches.next(n)


def report_progress(p: Progress) -> None:
    swarm = p.opt.swarm_progress()
    p.reporter.progress(epoch=p.opt.local_epoch, swarm_samples=swarm["samples"], target=swarm["target"],
                        peers=swarm["peers"], loss=round(p.loss, 5), samples_per_second=round(p.opt.samples_per_second(), 2),
                        local_samples=p.samples_total, **(p.chain.progress() if p.chain else {}),
                        **({"gpu_peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
                           if p.device.startswith("cuda") else {}))  # fmt: skip


def publish_status(p: Progress, leaving: bool = False, final: Optional[str] = None) -> None:
    """Our signed status record in the run (what monitors and finishing peers read). A finisher's leaving status
    repeats its final hash: the others' final vote counts it (swarm/consensus.py)."""
    p.final_hash = final or p.final_hash
    final = p.final_hash if final is None and leaving else final
    proofs = p.chain.progress() if p.chain is not None else {}
    sps = 0.0 if leaving else p.opt.samples_per_second()
    p.swarm.publish_status(p.spec.run_id, PeerStatus(
        peer_id=p.swarm.peer_id, device=p.device, precision=str(p.precision) + (f"+{p.cfg.quantize}" if p.cfg.quantize != "none" else ""), client_mode=p.cfg.client_mode,
        adapter_shapes=p.shapes, epoch=p.opt.local_epoch, samples_total=p.samples_total,
        samples_per_second=finite(sps), loss=finite(p.loss, None), loss_nonfinite=not_finite(p.loss),
        time=time.time(), leaving=leaving, final_hash=final,
        rounds_averaged=p.rounds_averaged, rounds_failed=p.rounds_failed,
        states=p.states, refused=refused(p), outliers=p.outliers,
        last_outliers=list(p.last_outliers[:8]),
        receipts_posted=proofs.get("receipts_posted", 0), receipts_pending=proofs.get("receipts_pending", 0),
        rewards_eth=proofs.get("rewards_wei", 0) / 1e18),
        wait=leaving or final is not None, timeout=p.stop.budget(1.0) if p.stop.requested else 5.0)  # fmt: skip
    if not leaving:
        p.swarm.announce_run(p.spec.run_id)
        note_statuses(p)


def note_statuses(p: Progress) -> int:
    """The peers' status epochs, for the progress rule's electorate (SwarmOptimizer.note_statuses); returns how
    many peers (this one included) have a status and are not leaving."""
    epochs = {pid: s.epoch for pid, s in p.swarm.peer_statuses(p.spec.run_id).items() if not s.leaving}
    p.opt.note_statuses(epochs)
    return len(epochs)


def refused(p: Progress) -> int:
    """Everything this peer refused or ignored so far (swarm/gate.py's counts, records of non-admitted peers)."""
    return sum(p.opt.trust_counts().values()) + p.swarm.not_admitted


def expected_states(p: Progress) -> set:
    """The (epoch, parameters digest) a state download must match: what a strict majority of the run's admitted
    peers (this one aside) say they hold; empty (take none) when they do not agree."""
    claims = {pid: [parse_state(c) for c in states] for pid, states in state_claims(p).items()}
    return trusted_states(claims) - {None}


def state_claims(p: Progress) -> dict[str, list[str]]:
    """PeerID -> the states (epoch:digest) its status says it holds, for every other peer of the run not leaving."""
    return {pid: list(s.states) for pid, s in p.swarm.peer_statuses(p.spec.run_id).items()
            if pid != p.swarm.peer_id and s.states and not s.leaving}  # fmt: skip


def note_state(p: Progress) -> None:
    """Remember our parameters' digest at this epoch (statuses carry the last 4; a downloader checks against them)."""
    claim = state_claim(p.opt.local_epoch, p.opt.state_averager.parameters_digest())
    p.states = [c for c in p.states if c != claim][-3:] + [claim]


def until_new_states(p: Progress, tried: set, timeout: float) -> None:
    """Wait up to ``timeout`` s, returning as soon as the others' statuses show a held state newer than ``tried``.
    A donor serves its state from the moment it enters an epoch; the others' statuses say they hold it a moment later
    (after the epoch's report), and that state can be taken only until the donors leave the epoch, 2-3 s in the
    tests. A download tried at a fixed 1 s pace often came in that gap and was refused: donors at epoch 13, the
    statuses at 12 (a late joiner's log, test_a_poisoned_state...). Trying again once the statuses move lands early in
    the window."""
    newest = max((e for e, _ in tried), default=-1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not p.stop.requested:
        time.sleep(0.2)
        if any(e > newest for e, _ in expected_states(p)):
            return
