"""The receipt outbox: each receipt this peer co-signs is on disk before its signature leaves the peer, its
groupmates' signatures are gathered from their DHT records, and the group settles it on chain once.

    OUT/receipts/<run-hash>-<epoch>.json   {receipt, digest, signatures: {wallet: sig}, state, signed_at, quorum_at,
                                            attempts, next_try, tx, error, gathered_at (last signature added)}
    OUT/receipts/votes/<run-hash>-<epoch>.json   {epoch, cid, digest, signature}: this peer's checkpoint vote

    state   collecting   signed; waiting for signatures, or for its turn to post
            posted       settled on chain with this peer's signature (paid, or flagged / over the epoch's budget)
            unpaid       given up: no majority of the group signed within GIVE_UP seconds
            rejected     the contract refused it for good (the decoded reason is kept)

Guarantees, also across a crash (SIGKILL) at any point:
- never two signatures for one (run, epoch): an epoch that has a file is never signed again, so a restarted peer
  cannot sign two receipts for one epoch (which anyone could report, and slash); nor two checkpoint votes;
- never lost: the file is written (fsync + rename) before the signature is published or posted;
- never paid twice: the contract pays each member once per epoch, and before posting, the contract is asked whether
  this peer was paid for the epoch already.

Who posts: once more than half of the members signed, and all of them did or FULL_WAIT seconds passed, the signer
with the smallest wallet among those it pays (unflagged, weight > 0; the others rank after them) settles it for the
whole group (one transaction per group, up to ``batch`` receipts per
transaction, none waiting more than ``max_wait``). The k-th smallest signer waits ``max_wait`` + k x BACKUP_DELAY
more and then posts it itself if the chain still has not paid it (the poster may be gone).
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from atlas_swarm.errors import ChainError, TxReverted
from atlas_swarm.proofs.eip712 import Domain
from atlas_swarm.proofs.receipt import Receipt, recover, sign_digest

FULL_WAIT = 10.0  # seconds to wait for the last signatures once a majority signed
BACKUP_DELAY = 30.0  # seconds after its turn a non-poster member posts the receipt itself if still unpaid
FINAL_BACKUP = 5.0  # the same, for a peer that is leaving
FINAL_CHECK = 1.0  # seconds between a leaving peer's checks whether a receipt it does not post yet was settled
GIVE_UP = 600.0  # seconds without a majority of signatures (signature records live as long)
MAX_BATCH = 8  # receipts per transaction (settleReceipts)
MAX_BACKOFF = 60.0
# Reverts that can pass later: the clock, money, stakes and late signatures (NoQuorum: a signer's stake dropped, or
# more signatures are on their way) change. NoQuorum gives up with the rest after GIVE_UP.
RETRYABLE = {"EpochAhead", "BudgetExhausted", "UnknownRun", "InsufficientStake", "PeerNotRegistered", "NoQuorum",
             "Unknown"}


@dataclass
class ReceiptCounts:
    collecting: int = 0
    posted: int = 0
    unpaid: int = 0
    rejected: int = 0


class ReceiptBox:
    def __init__(self, folder: Path | str, account, domain: Domain, batch: int = 4, max_wait: float = 120.0):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.account, self.domain = account, domain
        self.batch, self.max_wait = batch, max_wait
        self.bad_signatures = 0  # signatures gathered that did not recover to the member they name
        self._final_since: Optional[float] = None  # when the peer began leaving (flush(final=True))
        self._checked: dict[str, float] = {}  # receipt file -> when a leaving peer may next ask the chain about it
        self._lock = threading.Lock()  # the cache and the files, never held across the network
        self._flushing = threading.Lock()
        self._cache = self._load()

    # -- signing ------------------------------------------------------------------------------------------------
    def sign(self, receipt: Receipt, now: Optional[float] = None) -> Optional[bytes]:
        """Sign and store ``receipt``; None if this (run, epoch) was signed before (never two signatures)."""
        if receipt.index(self.account.address) is None:
            raise ValueError(f"{self.account.address} is not a member of the receipt of epoch {receipt.epoch}")
        now = time.time() if now is None else now
        digest = receipt.digest(self.domain)
        with self._lock:
            path = self._path(receipt.run_id, receipt.epoch)
            if path.exists():
                return None
            signature = sign_digest(digest, self.account.key)
            record = {"receipt": receipt.to_json(), "digest": "0x" + digest.hex(),
                      "signatures": {self.account.address: "0x" + signature.hex()}, "state": "collecting",
                      "signed_at": now, "quorum_at": None, "attempts": 0, "next_try": 0.0, "tx": None, "error": None,
                      "_file": path.name}  # fmt: skip
            _write_atomic(path, record)
            self._cache[path.name] = record
            return signature

    def sign_vote(self, run: bytes, epoch: int, cid: str, digest: bytes) -> Optional[bytes]:
        """This peer's checkpoint vote for ``cid`` at ``epoch`` (``digest``: its checkpointDigest), on disk before it
        is returned; None if this peer voted for another CID at that epoch before (also before a restart): two
        votes for one epoch are slashable, and recordCheckpoint slashes them itself when one replaces the other."""
        path = self.folder / "votes" / f"{run.hex()[:16]}-{epoch:010d}.json"
        with self._lock:
            try:
                earlier = json.loads(path.read_text())
                return _b(earlier["signature"]) if earlier["cid"] == cid else None
            except FileNotFoundError:
                pass
            except (OSError, ValueError, KeyError, TypeError):
                return None  # unreadable: it may hold a vote, so never sign another
            signature = sign_digest(digest, self.account.key)
            path.parent.mkdir(exist_ok=True)
            _write_atomic(path, {"epoch": epoch, "cid": cid, "digest": "0x" + digest.hex(),
                                 "signature": "0x" + signature.hex()})  # fmt: skip
            return signature

    def own_signatures(self, last: int = 16) -> list[tuple[int, bytes, bytes]]:
        """(epoch, digest, signature) of this peer's last ``last`` receipts still collecting or just posted: what it
        publishes for its groupmates."""
        with self._lock:
            rows = sorted(self._cache.values(), key=_order)[-last:]
            return [(r["receipt"]["epoch"], _b(r["digest"]), _b(r["signatures"][self.account.address])) for r in rows
                    if r["state"] in ("collecting", "posted")]  # fmt: skip

    # -- gathering ------------------------------------------------------------------------------------------------
    def gather(self, published: Iterable[tuple[int, bytes, bytes]], now: Optional[float] = None) -> int:
        """Add groupmates' signatures: ``published`` are (epoch, digest, signature) triples from their records.
        A signature counts only over this receipt's digest and from the wallet of a member. Returns how many new."""
        now = time.time() if now is None else now
        added = 0
        with self._lock:
            by_digest = {r["digest"]: r for r in self._cache.values() if r["state"] == "collecting"}
            for _epoch, digest, signature in published:
                r = by_digest.get("0x" + bytes(digest).hex())
                if r is None:
                    continue  # another epoch, another group, or a receipt that differs from ours
                signer = recover(bytes(digest), bytes(signature))
                members = {m["wallet"] for m in r["receipt"]["members"]}
                if signer is None or signer not in members:
                    self.bad_signatures += 1
                    continue
                if signer in r["signatures"]:
                    continue
                r["signatures"][signer] = "0x" + bytes(signature).hex()
                r["gathered_at"] = now
                if r["quorum_at"] is None and 2 * len(r["signatures"]) > len(members):
                    r["quorum_at"] = now
                _write_atomic(self.folder / r["_file"], r)
                added += 1
        return added

    # -- posting ------------------------------------------------------------------------------------------------
    def flush(self, client, now: Optional[float] = None, final: bool = False) -> ReceiptCounts:
        """Settle the receipts whose turn has come (see the module docstring). Never raises ChainError: failures
        wait for their next try. ``final``: the peer is leaving, post what has a majority now."""
        now = time.time() if now is None else now
        if final and self._final_since is None:
            self._final_since = now
        with self._flushing:
            with self._lock:
                collecting = sorted((r for r in self._cache.values() if r["state"] == "collecting"), key=_order)
            due = []
            for r in collecting:
                if now - r["signed_at"] > GIVE_UP and (r["quorum_at"] is None or "NoQuorum" in (r["error"] or "")):
                    self._mark(r, "unpaid", error=f"no majority of the {len(r['receipt']['members'])} members signed "
                               f"(and staked) within {GIVE_UP:.0f} s: {len(r['signatures'])} signatures")  # fmt: skip
                elif r["next_try"] <= now and self._turn(r, now, final):
                    due.append(r)
                elif final and r["quorum_at"] is not None and now >= self._checked.get(r["_file"], 0.0):
                    # leaving, not our turn yet: the poster may have settled it already (a backup used to learn
                    # that only at its turn, rank x FINAL_BACKUP later: 7-18 s of the partition test's exit wait)
                    self._checked[r["_file"]] = now + FINAL_CHECK
                    try:
                        if self._on_chain(client, r):
                            self._mark(r, "posted", tx=r.get("tx") or "settled by a groupmate")
                    except ChainError:
                        pass  # its turn will come
            oldest = min((r["signed_at"] for r in due), default=now)
            if not due or (len(due) < self.batch and now - oldest < self.max_wait and not final):
                return self.counts()
            try:
                self._post(client, due, now)
            except ChainError as e:
                for r in due:
                    if r["state"] == "collecting":
                        self._backoff(r, now, str(e))
            return self.counts()

    def _turn(self, r: dict, now: float, final: bool) -> bool:
        """A majority signed, and either everyone did or FULL_WAIT passed; then the smallest signing wallet posts
        at once, the others one after another later."""
        members = r["receipt"]["members"]
        if r["quorum_at"] is None:
            return False
        everyone = len(r["signatures"]) == len(members)
        ready_at = r["quorum_at"] if everyone else r["quorum_at"] + FULL_WAIT
        # the smallest signing wallet posts; the k-th smallest waits k x the backup delay (after the poster's batching
        # window), so the group's receipt costs one transaction unless the poster is gone
        # (members that the receipt pays nothing, flagged or weight 0, come last: they would post only as a backup)
        payable = _payable(r)
        rank = sorted(r["signatures"], key=lambda w: (w not in payable, int(w, 16))).index(self.account.address)
        if final:  # leaving: post what has a majority now; a non-poster gives the (leaving too) poster a moment first
            return rank == 0 or now >= max(r["quorum_at"], self._final_since) + rank * FINAL_BACKUP
        return now >= ready_at + (rank and self.max_wait + rank * BACKUP_DELAY)

    def _post(self, client, due: list[dict], now: float) -> None:
        queue = []
        for r in due:
            if not _payable(r) & set(r["signatures"]):
                self._mark(r, "posted", tx=r.get("tx") or "pays none of its signers")
            elif self._on_chain(client, r):
                self._mark(r, "posted", tx=r.get("tx") or "settled by a groupmate")
            else:
                queue.append(r)
        max_batch = MAX_BATCH
        while queue:
            batch, queue = queue[:max_batch], queue[max_batch:]
            try:
                tx = client.settle_receipts([(Receipt.from_json(r["receipt"]), _signatures(r)) for r in batch])
            except TxReverted as err:
                if len(batch) > 1:  # all or nothing: find the offender one by one
                    queue, max_batch = batch + queue, 1
                    continue
                if err.error in RETRYABLE:
                    self._backoff(batch[0], now, str(err))
                    return  # later receipts would meet it too
                self._mark(batch[0], "rejected", error=str(err))
                continue
            for r in batch:
                self._settled(client, r, tx, now)

    def _on_chain(self, client, r: dict) -> bool:
        """Settled already: the chain paid us for the epoch or, when the receipt pays us nothing (flagged, weight 0),
        one of its signers that it pays."""
        run, epoch, payable = _b(r["receipt"]["run_id"]), r["receipt"]["epoch"], _payable(r)
        wallets = [self.account.address] if self.account.address in payable else payable & set(r["signatures"])
        return any(client.paid_for(run, w, epoch) for w in wallets)

    def _settled(self, client, r: dict, tx, now: float) -> None:
        """Our transaction settled ``r``: posted, unless the chain did not pay us for a reason time can fix."""
        receipt = Receipt.from_json(r["receipt"])
        me = receipt.members[receipt.index(self.account.address)]
        if me.flagged or me.weight == 0 or client.paid_for(receipt.run_id, me.wallet, receipt.epoch):
            self._mark(r, "posted", tx=tx.tx_hash, gas=tx.gas_used)
            return
        run, stake = client.get_run(receipt.run_id), client.reputation(me.wallet)["stake"]
        if run is not None and stake < run["min_stake"]:  # our signature did not count: posted again once staked
            self._backoff(r, now, f"InsufficientStake: not paid, stake {stake} wei is below the run's minimum")
        else:
            self._mark(r, "posted", tx=tx.tx_hash, gas=tx.gas_used,
                       error="paid nothing: the epoch's samplesPerEpoch were used up by other receipts")  # fmt: skip

    def _backoff(self, r: dict, now: float, error: str) -> None:
        with self._lock:
            r["attempts"] += 1
            r["next_try"] = now + min(MAX_BACKOFF, 2.0 ** r["attempts"])
            r["error"] = error
            _write_atomic(self.folder / r["_file"], r)

    def _mark(self, r: dict, state: str, **fields) -> None:
        with self._lock:
            if state == "posted":
                r["error"] = None
            r.update(state=state, **fields)
            _write_atomic(self.folder / r["_file"], r)

    # -- reading ------------------------------------------------------------------------------------------------
    def counts(self) -> ReceiptCounts:
        c = ReceiptCounts()
        with self._lock:
            for r in self._cache.values():
                setattr(c, r["state"], getattr(c, r["state"]) + 1)
        return c

    def records(self) -> list[dict]:
        with self._lock:
            return sorted(self._cache.values(), key=_order)

    def _load(self) -> dict[str, dict]:
        out = {}
        for path in sorted(self.folder.glob("*.json")):
            try:
                r = json.loads(path.read_text())
                Receipt.from_json(r["receipt"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ChainError(f"Receipt outbox file {str(path)!r} is unreadable ({e}); move it away to continue "
                                 f"(the receipt in it will not be settled).") from None  # fmt: skip
            r["_file"] = path.name
            out[path.name] = r
        return out

    def _path(self, run: bytes, epoch: int) -> Path:
        return self.folder / f"{run.hex()[:16]}-{epoch:010d}.json"


class ReceiptPoster:
    """On a daemon thread every ``every`` seconds (or when poked): gather groupmates' signatures (``gather``), then
    flush the box; ``stop`` makes one last flush of whatever has a majority."""

    def __init__(self, box: ReceiptBox, client, gather: Callable[[], Iterable], every: float = 2.0):
        self.box, self.client, self.gather, self.every = box, client, gather, every
        self.counts = box.counts()
        self.rewards = {"claimable": 0, "pending": 0}
        self.errors = 0  # turns that failed with something other than a chain error (a full disk, a DHT error)
        self.last_error: Optional[str] = None
        self.before_turn: list[Callable[[], None]] = []  # run on this thread before each turn (signing rounds)
        self.after_flush: list[Callable[[], None]] = []  # ... and after each flush (checkpoint votes)
        self._wake = threading.Event()
        self._stopping = False
        self.hurry = False  # the peer is leaving: every turn posts what has a majority (see ReceiptBox._turn)
        self._thread = threading.Thread(target=self._loop, name="atlas-receipt-poster", daemon=True)

    def start(self) -> "ReceiptPoster":
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
                self.turn(final=stopping or self.hurry)
            except Exception as e:  # this turn fails, the thread goes on; the receipts stay on disk
                self.errors += 1
                self.last_error = f"{type(e).__name__}: {e}"
            if stopping:
                return

    def turn(self, final: bool = False) -> None:
        for hook in self.before_turn:
            hook()
        self.box.gather(self.gather())
        self.counts = self.box.flush(self.client, final=final)
        try:
            rep = self.client.reputation(self.box.account.address)
            self.rewards = {"claimable": rep["claimable"], "pending": rep["pending"]}
            for hook in self.after_flush:
                hook()
        except ChainError:
            pass

    def stop(self, timeout: float = 3.0) -> ReceiptCounts:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        return self.counts if self._thread.is_alive() else self.box.counts()


def _order(r: dict) -> tuple:
    return r.get("signed_at", 0.0), r["receipt"]["epoch"]


def _b(hex_str: str) -> bytes:
    return bytes.fromhex(hex_str[2:])


def _payable(r: dict) -> set[str]:
    """The members the receipt pays for their work (unflagged, weight > 0)."""
    return {m["wallet"] for m in r["receipt"]["members"] if not m["flagged"] and m["weight"] > 0}


def _signatures(r: dict) -> list[bytes]:
    return [_b(r["signatures"][m["wallet"]]) if m["wallet"] in r["signatures"] else b""
            for m in r["receipt"]["members"]]  # fmt: skip


def _write_atomic(path: Path, record: dict) -> None:
    """The record on disk for good before this returns: a temporary file, fsync, rename, fsync of the folder."""
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
