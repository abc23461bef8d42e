"""Publishing the swarm's adapter: every K epochs one peer of the averaging group (the smallest PeerID, so the
group publishes once) writes the adapter as a stock PEFT folder, puts it in its store, lists its CID in its signed
DHT record of the run, and serves the blocks to anyone who asks. Fetchers verify every block (storage/dag.py).
When that peer is in client mode (behind NAT: only nodes it connected to can ask it), the group's smallest reachable
member publishes the same adapter too, so that every fetcher has a publisher it can dial.

The published folder holds nothing peer-specific (run id, epoch, adapter hash, base model), so equal adapters get
equal CIDs whoever publishes them.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

from atlas_swarm.errors import AtlasError
from atlas_swarm.model.lora import save_adapter
from atlas_swarm.storage.cid import cid_of_folder
from atlas_swarm.storage.store import Store, open_store
from atlas_swarm.swarm.records import PublishedAdapter


class AdapterPublisher:
    def __init__(self, swarm, run_id: str, base_model: str, store_root: Path, ipfs_api: Optional[str], every: int):
        self.swarm, self.run_id, self.base_model, self.every = swarm, run_id, base_model, every
        self.store_root = Path(store_root)
        self.store_root.mkdir(parents=True, exist_ok=True)  # publish() stages folders here, whatever the backend
        self.store: Store = open_store(self.store_root, ipfs_api)
        self.published: list = []
        self.failures = 0  # publications that failed (a full disk, a daemon down): counted, never the training's end
        self.on_checkpoint = None  # (epoch, cid) -> None: the CID this peer holds at a publishing epoch (its vote)
        swarm.serve_blocks(self.store.get_blocks)

    def elected(self, group: tuple[str, ...], clients: tuple[str, ...] = ()) -> bool:
        """The group's smallest PeerID publishes; a peer that averaged alone publishes its own adapter. If the
        smallest is one of the ``clients`` (client-mode members), the smallest other member publishes as well."""
        if not group or self.swarm.peer_id == min(group):
            return True
        reachable = [p for p in group if p not in clients]
        return min(group) in clients and bool(reachable) and self.swarm.peer_id == min(reachable)

    def on_epoch(self, model, report, reporter) -> Optional[str]:
        """The peer's epoch hook (report: proofs.EpochRecord) every K epochs: the elected peer publishes; the other
        members only compute the CID of the adapter they hold, for their checkpoint vote."""
        if report.epoch % self.every:
            return None
        if not self.elected(report.group, report.clients):
            if self.on_checkpoint is not None:
                try:
                    self.on_checkpoint(report.epoch, self.cid_of(model, report.epoch, report.adapter_hash))
                except (AtlasError, OSError, ValueError) as e:
                    reporter.event("vote_failed", f"No checkpoint vote for epoch {report.epoch}: {e}",
                                   epoch=report.epoch)  # fmt: skip
            return None
        return self._publish_reported(model, report.epoch, report.adapter_hash, f"the epoch-{report.epoch}", reporter)

    def cid_of(self, model, epoch: int, adapter_hash: str) -> str:
        """The CID the folder publish() would store has (nothing stored)."""
        tmp = Path(tempfile.mkdtemp(prefix="cid-", dir=self.store_root))
        try:
            return cid_of_folder(save_adapter(model, tmp / "adapter", self._meta(epoch, adapter_hash)))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _meta(self, epoch: int, adapter_hash: str) -> dict:
        return {"run_id": self.run_id, "epoch": epoch, "adapter_hash": adapter_hash, "base_model": self.base_model}

    def finish(self, model, epoch: int, adapter_hash: str, timeout: float, reporter) -> None:
        """A peer stopping at --max-epochs with the agreed adapter: publish it (equal adapters, equal CIDs: every
        finisher serves it), then give a keeper in the run up to ``timeout`` s to copy it before leaving."""
        cid = self._publish_reported(model, epoch, adapter_hash, "the final", reporter)
        if cid is None:
            return
        keeper = self.hand_off(cid, timeout)
        reporter.event("handed_off", f"Keeper {keeper} holds a copy" if keeper else "No keeper in the run copied it",
                       keeper=keeper, cid=cid)  # fmt: skip

    def _publish_reported(self, model, epoch: int, adapter_hash: str, which: str, reporter) -> Optional[str]:
        """publish() with its outcome as an event; a failing store costs this publication, never the training."""
        try:
            cid = self.publish(model, epoch, adapter_hash)
        except (AtlasError, OSError) as e:  # OSError: saving the folder itself (disk full, permissions)
            self.failures += 1
            error = str(e) if isinstance(e, AtlasError) else f"{type(e).__name__}: {e.strerror or e}"
            reporter.event("publish_failed", f"Could not publish {which} adapter: {error}", epoch=epoch, error=error,
                           failures=self.failures)  # fmt: skip
            return None
        reporter.event("published", f"Published {which} adapter as {cid}", epoch=epoch, cid=cid)
        return cid

    def publish(self, model, epoch: int, adapter_hash: str) -> str:
        if self.published and self.published[-1].epoch == epoch and self.published[-1].adapter_hash == adapter_hash:
            return self.published[-1].cid
        tmp = Path(tempfile.mkdtemp(prefix="publish-", dir=self.store_root))
        try:
            cid = self.store.put_folder(save_adapter(model, tmp / "adapter", self._meta(epoch, adapter_hash)))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        # a finisher that downloaded the agreed adapter replaces what it published for this epoch before agreeing
        self.published = [p for p in self.published if p.epoch != epoch]
        self.published.append(PublishedAdapter(epoch=epoch, cid=cid, adapter_hash=adapter_hash, time=time.time()))
        self.swarm.publish_adapters(self.run_id, self.published, wait=False)
        if self.on_checkpoint is not None:
            self.on_checkpoint(epoch, cid)
        return cid

    def hand_off(self, cid: str, timeout: float) -> Optional[str]:
        """Before a finishing peer leaves: if a keeper (a notebook copying the run's adapters) is in the run, wait
        up to ``timeout`` s until one lists ``cid``, so the result outlives this peer. The keeper's PeerID, or None."""
        deadline = time.monotonic() + timeout
        while True:
            keepers = [r for r in self.swarm.adapter_records(self.run_id) if r.keeper and r.peer_id != self.swarm.peer_id]
            if not keepers:
                return None
            for record in keepers:
                if any(a.cid == cid for a in record.adapters):
                    return record.peer_id
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.5)

    def refresh(self) -> None:
        if self.published:
            self.swarm.publish_adapters(self.run_id, self.published, wait=False)
