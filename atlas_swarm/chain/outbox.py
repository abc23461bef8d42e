"""The persistent proof outbox: every signed proof is on disk before it is posted, and is posted exactly once.

    OUT/proofs/<run-hash>-<epoch>.json   {proof, signature, state: pending|posted|rejected, attempts, next_try, tx, error}

Guarantees, also across a crash (SIGKILL) at any point:
- never two different signatures for one (run, epoch): an epoch that already has a file is never signed again, so a
  restarted peer cannot equivocate (and be slashed) by accident;
- never lost: the file is written (fsync + rename) before any transaction, and stays pending until the chain has it;
- never posted twice: before posting, and after any revert, the contract is asked whether it already holds the proof
  (a crash between "mined" and "marked posted" is resolved by that check; the contract also rejects duplicates);
- retried with exponential backoff while the chain is unreachable, or while the revert is one that time can fix
  (stake, budget, registration); rejected for good otherwise, with the decoded reason kept in the file.

``ProofPoster`` runs ``flush`` on a background thread so the training loop never waits on the chain: ``sign`` (on
the training thread) takes only a short lock around the cache and the file, never one held across a transaction, and
the poster survives any error (counted in ``errors``, retried on its next turn; the proofs stay on disk).
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from atlas_swarm.errors import ChainError, TxReverted
from atlas_swarm.proofs.eip712 import ContributionProof, Domain, sign_proof

MAX_BATCH = 8  # proofs per transaction (submitProofs)
MAX_BACKOFF = 60.0
PROOF_TTL = 24 * 3600  # seconds a signed proof stays postable (its deadline)
# Reverts that can succeed later without a new signature: keep the proof pending and retry.
RETRYABLE = {"InsufficientStake", "BudgetExhausted", "UnknownRun", "PeerNotRegistered", "Unknown"}
# Reverts that mean the chain already holds this proof (a relay may post a signed proof before we do).
ALREADY_THERE = {"ProofAlreadySubmitted"}


@dataclass
class Counts:
    posted: int = 0
    pending: int = 0
    rejected: int = 0


class Outbox:
    def __init__(self, folder: Path | str, account, domain: Domain):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.account = account
        self.domain = domain
        self._lock = threading.Lock()  # the cache and the files: held for microseconds, never across the network
        self._flushing = threading.Lock()  # one flush at a time (the poster's, or a session's first)
        self._cache = self._load()  # one process owns an --out (its identity lock): disk is read once

    # -- signing ------------------------------------------------------------------------------------------------
    def sign(self, proof: ContributionProof, now: Optional[float] = None) -> Optional[ContributionProof]:
        """Sign and store ``proof`` (built by proofs.proof_of); None if its epoch was signed before (never sign
        twice)."""
        if proof.peer != self.account.address:
            raise ValueError(f"a proof for {proof.peer} cannot be signed by {self.account.address}")
        with self._lock:
            path = self._path(proof.run_id, proof.epoch)
            if path.exists():
                return None
            signature = sign_proof(proof, self.domain, self.account.key)
            record = {"proof": proof.to_json(), "signature": "0x" + signature.hex(), "state": "pending",
                      "signed_at": now or time.time(), "attempts": 0, "next_try": 0.0, "tx": None, "error": None}  # fmt: skip
            record["_file"] = path.name
            _write_atomic(path, record)
            self._cache[path.name] = record
            return proof

    # -- posting ------------------------------------------------------------------------------------------------
    def flush(self, client, now: Optional[float] = None, max_batch: int = MAX_BATCH, min_batch: int = 1,
              max_wait: float = 0.0) -> Counts:  # fmt: skip
        """Post due pending proofs in signing order, up to ``max_batch`` per transaction. To save gas, wait until
        ``min_batch`` are due, unless the oldest has waited ``max_wait`` seconds. Returns the counts afterwards.
        Never raises ChainError: failures stay pending with a backoff (or are rejected, see RETRYABLE)."""
        now = time.time() if now is None else now
        with self._flushing:
            with self._lock:
                pending = sorted((r for r in self._records() if r["state"] == "pending"), key=_order)
            due = list(itertools.takewhile(lambda r: r["next_try"] <= now, pending))  # signing order, no overtaking
            oldest = min((r.get("signed_at", 0.0) for r in due), default=now)
            if len(due) < min_batch and now - oldest < max_wait:
                return self.counts()
            try:
                self._post(client, due, now, max_batch)
            except ChainError as e:  # unreachable or refused: every due record waits for its next try
                for r in due:
                    if r["state"] == "pending":
                        self._backoff(r, now, str(e))
            return self.counts()

    def _post(self, client, due: list[dict], now: float, max_batch: int) -> None:
        queue = []
        for r in due:
            if client.proof_submitted(_proof(r)):  # posted before a crash, or by a relay
                self._mark(r, "posted", tx=r.get("tx") or "already on chain")
            else:
                queue.append(r)
        while queue:
            batch, queue = queue[:max_batch], queue[max_batch:]
            try:
                receipt = client.submit_proofs([(_proof(r), bytes.fromhex(r["signature"][2:])) for r in batch])
            except TxReverted as err:
                if len(batch) > 1:  # all or nothing: find the offender one by one
                    queue, max_batch = batch + queue, 1
                    continue
                if not self._settle_revert(client, batch[0], err, now):
                    return  # a retryable revert (stake, budget): later proofs would meet it too
                continue
            for r in batch:  # a proof someone relayed first was skipped by the contract: on chain all the same
                self._mark(r, "posted", tx=receipt.tx_hash, gas=receipt.gas_used // len(batch))

    def _settle_revert(self, client, r: dict, err: TxReverted, now: float) -> bool:
        """After a single proof reverted: decide posted / rejected / retry. True if the queue may go on."""
        proof = _proof(r)
        if err.error in ALREADY_THERE and client.proof_submitted(proof):
            self._mark(r, "posted", tx=r.get("tx") or "already on chain")
            return True
        if err.error in RETRYABLE and proof.deadline > now:
            self._backoff(r, now, str(err))
            return False
        self._mark(r, "rejected", error=str(err))
        return True

    def _backoff(self, r: dict, now: float, error: str) -> None:
        with self._lock:
            r["attempts"] += 1
            r["next_try"] = now + min(MAX_BACKOFF, 2.0 ** r["attempts"])
            r["error"] = error
            _write_atomic(self.folder / r["_file"], r)

    def _mark(self, r: dict, state: str, **fields) -> None:
        with self._lock:
            r.update(state=state, **fields)
            if state == "posted":
                r["error"] = None
            _write_atomic(self.folder / r["_file"], r)

    # -- reading ------------------------------------------------------------------------------------------------
    def counts(self) -> Counts:
        with self._lock:
            return self._counts()

    def records(self) -> list[dict]:
        with self._lock:
            return sorted(self._records(), key=_order)

    def _counts(self) -> Counts:
        c = Counts()
        for r in self._records():
            setattr(c, r["state"], getattr(c, r["state"]) + 1)
        return c

    def _records(self) -> list[dict]:
        return list(self._cache.values())

    def _load(self) -> dict[str, dict]:
        out = {}
        for path in sorted(self.folder.glob("*.json")):
            try:
                r = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise ChainError(f"Proof outbox file {str(path)!r} is unreadable ({e}); move it away to continue "
                                 f"(the proof in it will not be posted).") from None  # fmt: skip
            r["_file"] = path.name
            out[path.name] = r
        return out

    def _path(self, run_hash: bytes, epoch: int) -> Path:
        return self.folder / f"{run_hash.hex()[:16]}-{epoch:010d}.json"


def _order(r: dict) -> tuple:
    return r.get("signed_at", 0.0), r["proof"]["epoch"]


def _proof(r: dict) -> ContributionProof:
    return ContributionProof.from_json(r["proof"])


def _write_atomic(path: Path, record: dict) -> None:
    data = {k: v for k, v in record.items() if not k.startswith("_")}
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ProofPoster:
    """Flushes the outbox every ``every`` seconds (or when poked) on a daemon thread, ``batch`` proofs per
    transaction (a proof waits at most ``max_wait`` s for others); ``stop`` posts whatever is left."""

    def __init__(self, outbox: Outbox, client, every: float = 2.0, batch: int = 4, max_wait: float = 120.0):
        self.outbox, self.client, self.every = outbox, client, every
        self.batch, self.max_wait = batch, max_wait
        self.counts = outbox.counts()
        self.rewards = {"claimable": 0, "pending": 0}
        self.errors = 0  # turns that failed with something other than a chain error (e.g. a full disk)
        self.last_error: Optional[str] = None
        self._wake = threading.Event()
        self._stopping = False
        self.after_flush: list[Callable[[], None]] = []  # run on this thread after each flush (checkpoints)
        self._thread = threading.Thread(target=self._loop, name="atlas-proof-poster", daemon=True)

    def start(self) -> "ProofPoster":
        self._thread.start()
        return self

    def poke(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while True:
            self._wake.wait(self.every)
            self._wake.clear()
            stopping = self._stopping
            try:
                self._flush_once(final=stopping)  # after stop() too: one last flush, whatever the batch size
            except Exception as e:  # a disk error, an odd RPC answer: this turn fails, the thread goes on
                self.errors += 1
                self.last_error = f"{type(e).__name__}: {e}"
            if stopping:
                return

    def _flush_once(self, final: bool = False) -> None:
        if final:
            self.counts = self.outbox.flush(self.client)
        else:
            self.counts = self.outbox.flush(self.client, min_batch=self.batch, max_wait=self.max_wait)
        try:
            rep = self.client.reputation(self.outbox.account.address)
            self.rewards = {"claimable": rep["claimable"], "pending": rep["pending"]}
            for hook in self.after_flush:
                hook()
        except ChainError:
            pass

    def stop(self, timeout: float = 3.0) -> Counts:
        """Ask for a last flush and wait for it at most ``timeout`` s (the thread is a daemon: exit never hangs)."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        return self.counts if self._thread.is_alive() else self.outbox.counts()
