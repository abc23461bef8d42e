"""A training peer's chain side: checked once at start, then one co-signed receipt per averaged epoch.

    ChainSession.open   wallet → contract → the run the spec's trainer opened (same spec hash, not closing) → this
                        wallet bound to our PeerID (registers it if unbound) → stake ≥ the run's minimum → wallet
                        binding published in the DHT → receipt box + poster
    on_epoch            queues the round (group, weights, outliers, aggregate hash) for the poster thread, which
                        builds its receipt (members with verified bindings), signs it once, stores it, publishes the
                        signature for the groupmates, gathers theirs and settles: the training thread never waits
                        on the chain or the DHT for it
    on_checkpoint       a vote for the adapter CID this peer holds at a publishing epoch, published; the poster
                        records a checkpoint once most peers paid for the epoch before voted for one CID
    close               last turns (bounded), counts for the final report
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Callable

from atlas_swarm.chain.client import ETHER, StakingClient, cid_digest
from atlas_swarm.chain.receipts import ReceiptBox, ReceiptCounts, ReceiptPoster
from atlas_swarm.chain.wallet import load_wallet, read_password
from atlas_swarm.config import ChainConfig, RunSpec
from atlas_swarm.errors import ChainError, ChainUnreachable, SwarmError, TxReverted
from atlas_swarm.proofs.binding import sign_binding
from atlas_swarm.proofs.eip712 import chain_run_id, peer_id_hash
from atlas_swarm.proofs.receipt import checkpoint_digest, receipt_of, recover
from atlas_swarm.proofs.record import EpochRecord
from atlas_swarm.swarm.records import CoSignature

Emit = Callable[..., None]  # (kind, message, **fields): the peer's Reporter.event
BINDINGS_EVERY = 10.0  # seconds between re-reads of the run's wallet bindings when a groupmate's is missing
VOTES_KEPT = 4  # checkpoint votes this peer keeps publishing
QUIET = 8.0  # seconds a leaving peer waits on receipts without a majority and on votes while nothing changes
# (counted from the last signature a collecting receipt got, or its own, when no vote is pending: a receipt of a split
# round, 2 of 4 signatures for a minute, held each leaving peer of the partition test QUIET s for nothing)


@dataclass
class ChainSession:
    client: StakingClient
    box: ReceiptBox
    poster: ReceiptPoster
    run_id: str
    run: bytes  # on-chain id: chain_run_id(run_id, spec.trainer)
    swarm: object
    emit: Emit
    checkpoints: dict = field(default_factory=dict)  # epoch -> CID this peer voted for, not recorded yet
    recorded: dict = field(default_factory=dict)  # epoch -> CID on chain (by us, or by another voter)
    unpaid_solo: int = 0  # epochs averaged alone (or with no bound groupmate): not paid, by design
    _rounds: list = field(default_factory=list)  # rounds waiting for the poster to sign their receipts
    _votes: list = field(default_factory=list)  # this peer's CoSignature votes
    _bindings: dict = field(default_factory=dict)
    _bindings_at: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def open(cls, cfg: ChainConfig, spec: RunSpec, swarm, out: Path, emit: Emit) -> "ChainSession":
        """Check everything a receipt needs on chain (each problem is a ChainError naming the fix), then start the
        poster; receipts left by an earlier session are gathered and settled first."""
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
                             f"new receipts would not be paid.")  # fmt: skip
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

        box = ReceiptBox(out / "receipts", account, client.domain, batch=cfg.receipt_batch, max_wait=cfg.receipt_max_wait)
        poster_client = StakingClient(client.w3, client.address, account)
        session = cls(client, box, None, spec.run_id, chain_run, swarm, emit)  # type: ignore[arg-type]
        session.poster = ReceiptPoster(box, poster_client, session._groupmates_signatures)
        session.poster.before_turn.append(session._sign_rounds)
        session.poster.start()
        session.poster.after_flush.append(session._post_checkpoints)
        left = box.counts().collecting
        if left:
            session._publish_signatures()  # groupmates of an earlier session may still need ours
        emit("chain", f"Settling co-signed receipts on {client.address} (chain {client.chain_id}) as "
             f"{account.address} ({left} from before)", contract=client.address, chain_id=client.chain_id,
             address=account.address, pending=left)  # fmt: skip
        return session

    # -- receipts ---------------------------------------------------------------------------------------------------
    def on_epoch(self, record: EpochRecord) -> None:
        """Queue the round this peer just averaged in for its receipt (the peer's epoch hook; no network here)."""
        if len(record.group) < 2 or not record.result_hash:
            self.unpaid_solo += 1  # a solo epoch has no witnesses: not paid (README, "Staking, co-signed receipts")
            return
        with self._lock:  # the fields only: the record also holds the adapter's tensors
            self._rounds.append((record.ended, record.result_hash, record.group, record.weights, record.flagged))
        self.poster.poke()

    def _sign_rounds(self) -> None:
        """On the poster's thread: build, sign and publish the receipt of each queued round."""
        with self._lock:
            rounds, self._rounds = self._rounds, []
        signed = False
        for ended, result_hash, group, weights, flagged in rounds:
            receipt = receipt_of(self.run, ended, result_hash, group, weights, flagged, self._wallets(group))
            if receipt is None or receipt.index(self.box.account.address) is None:
                self.unpaid_solo += 1
                self.emit("receipt_skipped", f"Epoch {ended}: fewer than 2 groupmates with a verified wallet "
                          f"binding; not paid", epoch=ended)  # fmt: skip
                continue
            if self.box.sign(receipt) is None:
                self.emit("receipt_exists", f"Epoch {ended} was signed before (not signing it twice)", epoch=ended)
                continue
            signed = True
            self.emit("receipt_signed", "", epoch=ended, members=len(receipt.members),
                      weight=receipt.members[receipt.index(self.box.account.address)].weight)  # fmt: skip
        if signed:
            self._publish_signatures()

    def _wallets(self, group) -> dict[str, str]:
        """PeerID -> address of the run's verified bindings (both ways), re-read when a groupmate is missing."""
        missing = set(group) - set(self._bindings)
        if missing and time.monotonic() - self._bindings_at >= BINDINGS_EVERY or not self._bindings:
            try:
                self._bindings = verified_bindings(self.swarm, self.client, self.run_id)
                self._bindings_at = time.monotonic()
            except (ChainError, SwarmError):
                pass  # the old view; a member without a binding is left out of the receipt
        return self._bindings

    def _publish_signatures(self) -> None:
        own = [CoSignature(kind="receipt", epoch=e, digest=d, signature=s) for e, d, s in self.box.own_signatures(12)]
        with self._lock:
            votes = list(self._votes)
        try:
            self.swarm.publish_cosignatures(self.run_id, own + votes)
        except SwarmError:
            pass  # published again with the next receipt or vote

    def _groupmates_signatures(self) -> list[tuple[int, bytes, bytes]]:
        """(epoch, digest, signature) of every receipt signature the run's peers publish (the box keeps the ones
        over its own receipts' digests, from their members)."""
        return [(s.epoch, s.digest, s.signature) for sigs in self.swarm.cosignatures(self.run_id).values()
                for s in sigs if s.kind == "receipt"]  # fmt: skip

    # -- checkpoints ------------------------------------------------------------------------------------------------
    def on_checkpoint(self, epoch: int, cid: str) -> None:
        """Vote for ``cid`` as the run's adapter at ``epoch`` (once per epoch; the publisher's hook)."""
        with self._lock:
            if epoch in self.checkpoints or epoch in self.recorded or epoch == 0:
                return
            digest = checkpoint_digest(self.run, epoch, cid_digest(cid), self.client.domain)
            signature = self.box.sign_vote(self.run, epoch, cid, digest)
            if signature is None:  # it voted for another CID at this epoch before a restart: never two votes
                self.recorded[epoch] = "not voted: this peer voted for another adapter at this epoch before"
                return
            vote = CoSignature(kind="vote", epoch=epoch, digest=digest, cid=cid, signature=signature)
            self._votes = (self._votes + [vote])[-VOTES_KEPT:]
            self.checkpoints[epoch] = cid
        self._publish_signatures()
        self.poster.poke()

    def _post_checkpoints(self) -> None:
        """On the poster's thread: record each voted checkpoint once more than half of the peers paid for the epoch
        before voted for the same CID (each vote checked here: signer, and paid for that epoch)."""
        with self._lock:
            waiting = sorted(self.checkpoints.items())
        if not waiting:
            return
        client = self.poster.client
        published = [s for sigs in self.swarm.cosignatures(self.run_id).values() for s in sigs if s.kind == "vote"]
        for epoch, cid in waiting:
            if self._recorded_by_another(client, epoch, cid):
                continue
            digest = checkpoint_digest(self.run, epoch, cid_digest(cid), client.domain)
            votes = {}
            for s in published:
                signer = recover(digest, s.signature) if s.epoch == epoch and s.digest == digest else None
                if signer is not None and client.paid_for(self.run, signer, epoch - 1):
                    votes[signer] = s.signature
            payees = client.epoch_tally(self.run, epoch - 1)["payees"]
            if len(votes) < 2 or 2 * len(votes) <= payees:
                continue  # more votes (or more settled receipts) may come
            outcome = cid
            try:
                on_chain = client.checkpoint_of(self.run, epoch)
                if on_chain is None or (on_chain["cid"] != cid and on_chain["votes"] < len(votes)
                                        and not on_chain["final"]):  # fmt: skip
                    client.record_checkpoint(self.run, epoch, cid, votes)
                elif on_chain["cid"] != cid:
                    outcome = f"refused: the chain holds {on_chain['cid']} with {on_chain['votes']} votes"
            except TxReverted as e:  # another voter may have recorded the same CID first (even in the same block)
                try:
                    on_chain = client.checkpoint_of(self.run, epoch)
                except ChainError:
                    on_chain = None
                if on_chain is None or on_chain["cid"] != cid:
                    outcome = f"refused: {e}"
            except ChainUnreachable:
                return  # again after the next flush
            except ChainError as e:
                outcome = f"refused: {e}"
            with self._lock:
                self.recorded[epoch] = outcome
                self.checkpoints.pop(epoch, None)

    def _drop_superseded_votes(self) -> None:
        """At exit, stop waiting for votes older than the newest checkpoint recorded: it is the one a notebook takes.
        Votes that never gathered a quorum (at epochs where the peers held different adapters) held every leaving
        peer of a chain run QUIET s (the chain tests' exit waits of 10-13 s)."""
        with self._lock:
            recorded = [e for e, outcome in self.recorded.items() if not outcome.startswith(("not ", "refused"))]
            newest = max(recorded, default=0)
            for epoch in [e for e in self.checkpoints if e < newest]:
                self.recorded[epoch] = f"not recorded: too few votes from peers paid for the epoch before (epoch " \
                                       f"{newest}'s checkpoint, newer, is recorded)"
                self.checkpoints.pop(epoch)

    def _recorded_by_another(self, client: StakingClient, epoch: int, cid: str) -> bool:
        """Whether the chain holds ``cid`` at ``epoch`` already (then it is this peer's recorded checkpoint too)."""
        try:
            on_chain = client.checkpoint_of(self.run, epoch)
        except ChainError:
            return False
        if on_chain is None or on_chain["cid"] != cid:
            return False
        with self._lock:
            self.recorded[epoch] = cid
            self.checkpoints.pop(epoch, None)
        return True

    # -- reporting ------------------------------------------------------------------------------------------------
    def progress(self) -> dict:
        c, r = self.poster.counts, self.poster.rewards
        return {"receipts_posted": c.posted, "receipts_pending": c.collecting, "receipts_unpaid": c.unpaid,
                "receipts_rejected": c.rejected, "rewards_wei": r["claimable"] + r["pending"],
                "poster_errors": self.poster.errors}  # fmt: skip

    def close(self, timeout: float = 3.0) -> ReceiptCounts:
        """Turns until every receipt with a chance is settled and every vote recorded, at most ``timeout`` s, and no
        longer than QUIET s without any change while no receipt has a majority to post (a groupmate that left with
        its signature unpublished, or a vote with too few voters, would hold every leaving peer for the whole
        timeout); what is left stays on disk for the next start."""
        deadline = time.monotonic() + timeout
        self.poster.hurry = True
        seen, changed = None, time.monotonic()
        while time.monotonic() < deadline:
            with self._lock:
                pending = sorted(self.checkpoints.items())
            for epoch, cid in pending:  # recorded by another voter? (the poster's turn may be held up by the DHT)
                self._recorded_by_another(self.client, epoch, cid)
            self._drop_superseded_votes()
            with self._lock:
                state = (bool(self._rounds), len(self.checkpoints), len(self.recorded))
            records = [r for r in self.box.records() if r["state"] == "collecting"]
            if not state[0] and not records and not self.checkpoints:
                break
            now = time.monotonic()
            state += (len(records), sum(len(r["signatures"]) for r in records), self.box.counts().posted)
            if seen is None and not self.checkpoints:  # quiet since before we began to leave?
                last = max((r.get("gathered_at", r["signed_at"]) for r in records), default=time.time())
                seen, changed = state, now - min(QUIET, max(0.0, time.time() - last))
            elif state != seen:
                seen, changed = state, now
            elif now - changed >= QUIET and not state[0] and not any(r["quorum_at"] for r in records):
                break  # nothing moved, and nothing this peer holds can be posted: a longer wait would not help
            self.poster.poke()
            time.sleep(0.5)
        counts = self.poster.stop(max(0.5, deadline - time.monotonic()))
        with self._lock:
            for epoch in self.checkpoints:  # not enough votes (yet), or the receipts of the epoch before not settled
                self.recorded.setdefault(epoch, "not recorded: too few votes from peers paid for the epoch before")
        return counts


def verified_bindings(swarm, client: StakingClient, run_id: str) -> dict[str, str]:
    """PeerID -> address for the run's peers whose binding holds both ways: a DHT record signed by the PeerID's own
    key (and by the address) AND the address's registerPeer. A chain-only binding is ignored: anyone can register
    someone else's PeerID hash (it locks nobody out), nobody else can sign for that PeerID."""
    return {pid: addr for pid, addr in swarm.wallet_bindings(run_id).items() if client.binds(addr, pid)}
