"""Getting a run's published adapter into the notebook: choose the CID, fetch its blocks from this notebook's store,
the IPFS daemon or the publishing peers (each block verified against its CID before it is kept), then load or
evaluate it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from atlas_swarm.checkpoints.vouch import choose, reachable_first
from atlas_swarm.errors import AtlasError, StorageError
from atlas_swarm.model.lora import load_adapter_weights, load_base, load_model
from atlas_swarm.storage import CorruptBlock, IpfsStore, LocalStore, cid_of_folder
from atlas_swarm.storage.dag import first_good
from atlas_swarm.train.data import Batches, load_examples
from atlas_swarm.train.steps import evaluate

CHAIN_LOOKBACK = 32  # published epochs asked about on chain, newest first


def on_chain(chain, run: bytes, published: list, epoch: Optional[int]) -> Optional[tuple[int, str]]:
    """(epoch, CID) of the newest published epoch (or ``epoch``) with a checkpoint recorded on chain, or None."""
    epochs = sorted({a.epoch for _, a in published if epoch is None or a.epoch == epoch}, reverse=True)
    for e in epochs[:CHAIN_LOOKBACK]:
        recorded = chain.checkpoint_of(run, e)
        if recorded is not None:
            return e, recorded["cid"]
    return None


def fetch_adapter(run, epoch: Optional[int], timeout: float) -> Path:
    """With a chain, the newest checkpoint recorded on chain (a quorum of the peers paid for the epoch before voted
    for it) and nothing else; without one, the newest epoch most of the run's peers vouch for (storage/vouch.py):
    one publisher's claim (an epoch of 10^6, say) decides nothing."""
    run._need_swarm()
    deadline = time.monotonic() + timeout
    while True:
        published = run.swarm.published_adapters(run.run_id)
        statuses = run.swarm.peer_statuses(run.run_id)
        reached = {pid: s.epoch for pid, s in statuses.items()}
        try:
            if run._chain is not None:
                recorded = on_chain(run._chain, run._chain_run(), published, epoch)
                if recorded is None:
                    which = f"epoch {epoch}" if epoch is not None else "any published epoch"
                    raise StorageError(f"No checkpoint of {which} is recorded on chain yet (a quorum of the peers "
                                       f"paid for the epoch before records it); with a chain configured, nothing "
                                       f"else is trusted.")  # fmt: skip
                epoch_, cid = recorded
                publishers = sorted({pid for pid, a in published if a.cid == cid})
            else:
                epoch_, cid, publishers = choose(published, reached, epoch)
            publishers = reachable_first(publishers, statuses)
            break
        except StorageError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.5)
    dest = run.workdir / "adapters" / cid
    if dest.is_dir():
        if cid_of_folder(dest) == cid:
            return dest  # fetched before, and nobody changed it since
        raise StorageError(f"{str(dest)!r} was modified after it was fetched (its CID is no longer {cid}); delete it "
                           f"to fetch it again.")  # fmt: skip
    if run._keeper is not None:
        run._keeper.keep_new()  # usually already kept while the run went on
    local = LocalStore(run.workdir / "store")
    sources = [("this notebook's store", local.get_blocks)]
    if run.ipfs_api:
        sources.append((f"the IPFS daemon at {run.ipfs_api}", IpfsStore(run.ipfs_api).get_blocks))
    sources += [(f"this notebook's peer {c.out}", LocalStore(c.out / "store").get_blocks)
                for c in run._contributions if (c.out / "store").is_dir()]  # fmt: skip
    sources += [(f"peer {pid}", run.swarm.blocks_from(pid)) for pid in publishers]
    try:
        local.pin(first_good(sources), cid)  # every block verified, then kept: the result outlives the swarm
    except CorruptBlock:
        raise
    except StorageError as e:
        raise StorageError(f"Could not fetch the epoch-{epoch_} adapter {cid}: its publishers ({', '.join(publishers)})"
                           f" did not serve it; they may have left the swarm. ({e})") from None  # fmt: skip
    return local.fetch_folder(cid, dest)


def load_peft(spec, folder: Path, base_model: Optional[str] = None):
    """A ready PeftModel (eval mode, CPU) of the base model with the adapter in ``folder``."""
    import warnings

    from peft import PeftModel


    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")  # PEFT's deprecated calls
    base, _ = load_base(spec, base_model)
    try:
        model = PeftModel.from_pretrained(base, str(folder))
    except (OSError, ValueError) as e:
        raise AtlasError(f"Could not load the adapter in {str(folder)!r}: {str(e).splitlines()[0]}") from None
    return model.eval()


def evaluate_adapter(spec, folder: Path, data: str, base_model: Optional[str], batch_size: int) -> dict:
    model, tokenizer = load_model(spec, base_model, "cpu")  # the seeded initial adapter: every peer's epoch 0
    examples = load_examples(data, spec)
    batches = Batches(examples, tokenizer, spec)
    before = evaluate(model, batches, "cpu", spec.model.task, batch_size)
    meta = load_adapter_weights(model, folder)
    after = evaluate(model, batches, "cpu", spec.model.task, batch_size)
    return {"epoch": meta.get("epoch"), "examples": len(batches), "before": before, "after": after}

