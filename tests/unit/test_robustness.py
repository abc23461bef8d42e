"""Failures that must cost one action, never the training or a background thread (issue 16, item 12): a full disk
while publishing, an odd error in the receipt poster, a chain that answers slowly while the training loop signs."""

from __future__ import annotations

import errno
import threading
import time

from eth_account import Account

from atlas_swarm.chain.receipts import ReceiptBox, ReceiptPoster
from atlas_swarm.proofs import Domain, Member, Receipt
from tests.doubles import Events, FakeSwarm

DOMAIN = Domain(1, "0x" + "11" * 20)


def pair_receipt(me, epoch: int) -> tuple[Receipt, object]:
    """A receipt of ``me`` and a groupmate with a larger wallet (so ``me`` posts it)."""
    mate = Account.create()
    while int(mate.address, 16) < int(me.address, 16):
        mate = Account.create()
    members = sorted([Member(me.address, b"\x02" * 32, 8), Member(mate.address, b"\x03" * 32, 8)],
                     key=lambda m: int(m.wallet, 16))  # fmt: skip
    receipt = Receipt(b"\x01" * 32, epoch, b"\x04" * 32, tuple(members))
    return receipt, mate


def signed_pair(box: ReceiptBox, epoch: int) -> None:
    from atlas_swarm.proofs import sign_digest

    receipt, mate = pair_receipt(box.account, epoch)
    box.sign(receipt, now=0.0)
    digest = receipt.digest(box.domain)
    box.gather([(epoch, digest, sign_digest(digest, mate.key))], now=0.0)


def test_a_full_disk_costs_one_publication_not_the_training(tmp_path, monkeypatch):
    """L4: an OSError while saving the adapter propagated out of the epoch hook and stopped training."""
    import atlas_swarm.checkpoints.publish as publish

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(publish, "save_adapter", disk_full)
    publisher = publish.AdapterPublisher(FakeSwarm(), "run-0123456789abcdef", "base", tmp_path / "store", None, 1)
    events = Events()
    report = type("R", (), {"epoch": 2, "group": (), "clients": (), "adapter_hash": "ab" * 32})()
    assert publisher.on_epoch(object(), report, events) is None
    assert publisher.on_epoch(object(), type(report)(), events) is None
    (kind, fields), _ = events.seen
    assert kind == "publish_failed" and "No space left" in fields["error"] and publisher.failures == 2


class OddClient:
    """A chain client whose every call fails with something that is not a ChainError (an odd RPC answer)."""

    def __getattr__(self, name):
        def fail(*a, **k):
            raise SyntaxError("unexpected EOF while parsing the node's message")

        return fail


def test_the_receipt_poster_survives_any_error_and_counts_it(tmp_path):
    """M8: any non-chain error killed the poster thread silently; receipts then waited for a restart."""
    box = ReceiptBox(tmp_path / "receipts", Account.create(), DOMAIN, batch=1, max_wait=0)
    signed_pair(box, 1)
    poster = ReceiptPoster(box, OddClient(), lambda: [], every=0.05)
    poster.hurry = True  # post at once, poster or not
    poster.start()
    deadline = time.monotonic() + 10
    while poster.errors < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert poster.errors >= 3 and "SyntaxError" in poster.last_error and poster._thread.is_alive()
    poster.stop(1.0)
    assert box.counts().collecting == 1, "the receipt is still on disk, waiting"


class SlowChain:
    """A chain that takes ``delay`` s per transaction (a congested RPC): the training thread must not wait for it."""

    def __init__(self, delay: float):
        self.delay, self.inside = delay, threading.Event()

    def paid_for(self, run, address, epoch):
        return self.inside.is_set()

    def settle_receipts(self, signed):
        self.inside.set()
        time.sleep(self.delay)
        return type("Tx", (), {"tx_hash": "0xabc", "gas_used": 50_000})()


def test_signing_never_waits_for_a_flush_in_flight(tmp_path):
    """M4: the outbox's flush held the lock that sign() needs across a 60 s receipt wait."""
    box = ReceiptBox(tmp_path / "receipts", Account.create(), DOMAIN, batch=1, max_wait=0)
    signed_pair(box, 1)
    chain = SlowChain(delay=3.0)
    flusher = threading.Thread(target=box.flush, args=(chain,), kwargs={"final": True})
    flusher.start()
    try:
        assert chain.inside.wait(5), "the flush is inside its transaction"
        t0 = time.monotonic()
        receipt, _ = pair_receipt(box.account, 2)
        assert box.sign(receipt) is not None
        assert time.monotonic() - t0 < 0.5, "the epoch's receipt was signed while the transaction was in flight"
    finally:
        flusher.join(10)
    assert box.counts().posted == 1 and box.counts().collecting == 1


def test_run_watch_draws_a_run_whose_history_holds_a_nan_loss():
    """M1: int(nan) in the sparkline crashed Run.watch() (records are finite now; the drawing copes anyway)."""
    from atlas_swarm.notebook.display import line, sparkline

    assert sparkline([1.0, float("nan"), 0.5, float("inf"), 0.25]) != ""
    view = {"epoch": 3, "peers": [1], "samples_per_second": 2.0, "samples": 4, "target": 8, "loss": float("nan"),
            "history": [{"loss": 1.0}, {"loss": float("nan")}, {"loss": 0.5}]}  # fmt: skip
    assert "loss nan" in line(view, 5)
