"""A training peer's chain side: checked once at start, then one signed proof per epoch through the outbox.

    ChainSession.open   wallet → contract → the run the spec's trainer opened (same spec hash, not closing) → this
                        wallet bound to our PeerID (registers it if unbound) → stake ≥ the run's minimum → wallet
                        binding published in the DHT → outbox + poster
    on_epoch            sign the epoch's proof (samples, adapter hash, data root), queue it, wake the poster
    record_checkpoint   the CID this peer published for an epoch, recorded on chain by the poster once the proof
                        that produced it (epoch - 1) is accepted
    close               last flush (bounded), counts for the final report
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Callable

from atlas_swarm.chain.client import ETHER, StakingClient
from atlas_swarm.chain.outbox import PROOF_TTL, Counts, Outbox, ProofPoster
from atlas_swarm.chain.wallet import load_wallet, read_password
from atlas_swarm.config import ChainConfig, RunSpec
from atlas_swarm.errors import ChainError, ChainUnreachable, TxReverted
from atlas_swarm.proofs.binding import sign_binding
from atlas_swarm.proofs.eip712 import chain_run_id, peer_id_hash
from atlas_swarm.proofs.record import EpochRecord, proof_of

Emit = Callable[..., None]  # (kind, message, **fields): the peer's Reporter.event


@dataclass
class ChainSession:
    client: StakingClient
    outbox: Outbox
    poster: ProofPoster
    run_id: str
    run: bytes  # on-chain id: chain_run_id(run_id, spec.trainer)
    peer_id: str
    emit: Emit
    checkpoints: dict = field(default_factory=dict)  # epoch -> CID, waiting for the producing proof
    recorded: dict = field(default_factory=dict)  # epoch -> CID on chain (by us, or already by another peer)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def open(cls, cfg: ChainConfig, spec: RunSpec, swarm, out: Path, emit: Emit) -> "ChainSession":
        """Check everything a proof needs on chain (each problem is a ChainError naming the fix), then start the
        poster; proofs left pending by an earlier session are posted first."""
        account = load_wallet(cfg.wallet, read_password(cfg.password_file))
        client = StakingClient.connect(StakingClient.web3(cfg.rpc), cfg.contract, account)
        if not spec.trainer:
            raise ChainError(f"Run {spec.run_id}'s spec names no trainer, so no run on chain can be its own: the "
                             f"trainer adds `trainer = \"0x...\"` (its address) to the spec, which makes a new run id.")
        chain_run = chain_run_id(spec.run_id, spec.trainer)  # only the spec's trainer can have opened it: no squatter
        run = client.get_run(chain_run)
        if run is None:
            raise ChainError(f"Run {spec.run_id} is not on the staking contract {client.address}: its trainer "
                             f"{spec.trainer} opens it with `python -m atlas_swarm.chain create-run --run-spec SPEC`.")
        if run["closing"]:
            raise ChainError(f"Run {spec.run_id} is closing on the staking contract (its trainer called close-run); "
                             f"new proofs would not be paid.")  # fmt: skip
        if run["spec_hash"] != spec.spec_hash:
            raise ChainError(f"The staking contract's run {spec.run_id} has another spec hash than this run's spec.")
        peer_id = swarm.peer_id
        bound = client.peer_id_of(account.address)
        if bound is None:
            client.register_peer(peer_id)
            emit("registered", f"Bound PeerID {peer_id} to {account.address} on chain", address=account.address)
        elif bound != peer_id_hash(peer_id):
            raise ChainError(f"Wallet {account.address} is bound to another PeerID (one PeerID per wallet). Use "
                             f"that peer's --identity, or another wallet.")  # fmt: skip
        stake = client.reputation(account.address)["stake"]
        if stake < run["min_stake"]:
            raise ChainError(f"Your stake ({Decimal(stake) / ETHER} ETH) is below the run's minimum "
                             f"({Decimal(run['min_stake']) / ETHER} ETH): `python -m atlas_swarm.chain stake AMOUNT "
                             f"--wallet {cfg.wallet}`.")  # fmt: skip
        swarm.publish_wallet(spec.run_id, account.address, sign_binding(peer_id, account.key))

        outbox = Outbox(out / "proofs", account, client.domain)
        poster = ProofPoster(outbox, StakingClient(client.w3, client.address, account), batch=cfg.proof_batch,
                             max_wait=cfg.proof_max_wait).start()  # fmt: skip
        if outbox.counts().pending:
            poster.outbox.flush(poster.client)  # proofs left pending by an earlier session go first, now
        counts = outbox.counts()
        emit(
            "chain", f"Posting proofs to {client.address} on chain {client.chain_id} as {account.address} "
            f"({counts.pending} pending from before)", contract=client.address, chain_id=client.chain_id,
            address=account.address, pending=counts.pending,
        )  # fmt: skip
        session = cls(client, outbox, poster, spec.run_id, chain_run, peer_id, emit)
        poster.after_flush.append(session._post_checkpoints)
        return session

    def on_epoch(self, record: EpochRecord) -> None:
        """Sign the proof of the epoch this peer just contributed to (the peer's epoch hook)."""
        if record.samples <= 0:
            return
        proof = proof_of(record, self.run, self.outbox.account.address, deadline=int(time.time() + PROOF_TTL))
        if self.outbox.sign(proof) is None:
            self.emit("proof_exists", f"Epoch {record.ended} was signed before (not signing it twice)",
                      epoch=record.ended)  # fmt: skip
            return
        self.emit("proof_signed", "", epoch=record.ended, samples=record.samples)
        self.poster.poke()

    def record_checkpoint(self, epoch: int, cid: str) -> None:
        with self._lock:
            self.checkpoints[epoch] = cid
        self.poster.poke()

    def _post_checkpoints(self) -> None:
        """On the poster's thread, after a flush: record each checkpoint whose producing proof is on chain now."""
        client = self.poster.client
        with self._lock:
            waiting = sorted(self.checkpoints.items())
        for epoch, cid in waiting:
            if epoch == 0 or not client.has_proof(self.run, client.account.address, epoch - 1):
                continue  # the proof is still in the outbox (or this peer contributed nothing to that epoch)
            try:
                client.record_checkpoint(self.run, epoch, cid)
                self.recorded[epoch] = cid
            except TxReverted as e:
                if e.error == "CheckpointExists":  # another publisher of the group was first
                    on_chain = client.checkpoint_of(self.run, epoch)
                    self.recorded[epoch] = on_chain[0] if on_chain else cid
            except ChainUnreachable:
                return  # try again after the next flush
            except (ChainError, ValueError) as e:  # a permanent refusal: say why at exit, don't retry
                self.recorded[epoch] = f"refused: {e}"
            with self._lock:
                self.checkpoints.pop(epoch, None)

    def progress(self) -> dict:
        c, r = self.poster.counts, self.poster.rewards
        return {"proofs_posted": c.posted, "proofs_pending": c.pending, "proofs_rejected": c.rejected,
                "rewards_wei": r["claimable"] + r["pending"], "poster_errors": self.poster.errors}  # fmt: skip

    def close(self, timeout: float = 3.0) -> Counts:
        counts = self.poster.stop(timeout)
        with self._lock:
            for epoch in self.checkpoints:  # still waiting: the producing proof was not accepted (yet)
                self.recorded.setdefault(epoch, "not recorded: this peer's proof of the epoch before is not on chain")
        return counts



def verified_bindings(swarm, client: StakingClient, run_id: str) -> dict[str, str]:
    """PeerID -> address for the run's peers whose binding holds both ways: a DHT record signed by the PeerID's own
    key (and by the address) AND the address's registerPeer. A chain-only binding is ignored: anyone can register
    someone else's PeerID hash (it locks nobody out), nobody else can sign for that PeerID."""
    return {pid: addr for pid, addr in swarm.wallet_bindings(run_id).items() if client.binds(addr, pid)}
