"""Schemas of the run's DHT records. Each subkey is its writer's public key, so only that peer can write it.

    <run_id>_spec    {owner: canonical run spec JSON}   any peer holding the spec republishes it (self-certifying:
                                                        a reader keeps only bytes whose hash matches the run id)
    <run_id>_peers   {owner: PeerStatus}                each peer's live status, refreshed while it trains
    <run_id>_wallets {owner: WalletBinding}             PeerID -> Ethereum address, signed by both keys (a peer that
                                                        posts proofs; see proofs/binding.py)
    <run_id>_adapters {owner: PublishedAdapters}     the adapters a peer published (epoch → CID), and serves
                                                        over p2p (swarm/blocks.py) from its store
    <run_id>_cosigned {owner: CoSignatures}            a peer's signatures of its last receipts and checkpoint
                                                        votes, read by its groupmates (chain/receipts.py)
    atlas_runs       {owner: RunAnnouncement}           the run each live peer is in: how a monitor finds every run

Every field is bounded (string lengths, list lengths, finite non-negative floats: no NaN or Infinity, which would make
the dashboard's JSON invalid), so a record that validates is small and safe to show. hivemind checks these schemas
in its DHT process on every store and every get, before a record reaches our code.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

from hivemind.dht.schema import BytesWithPublicKey
from pydantic.v1 import BaseModel, ConstrainedFloat, StrictBool, conbytes, conint, conlist, constr

from atlas_swarm.majority import strict_majority

SPEC_TTL = 3600.0  # seconds a published spec lives without a refresh
STATUS_TTL = 60.0  # seconds a peer's status lives without a refresh
STATUS_EVERY = 5.0  # seconds between status refreshes
WALLET_TTL = 600.0  # seconds a wallet binding lives without a refresh
ADAPTERS_TTL = 24 * 3600.0  # seconds a publisher's adapter list lives without a refresh
ADAPTERS_KEPT = 16  # a publisher lists its last 16 adapters
COSIGNED_TTL = 600.0  # seconds a peer's co-signatures live without a refresh
COSIGNED_KEPT = 16  # a peer lists its last 16 signatures (receipts and votes): ~2.5 KB
# Any one record we store. hivemind hands a store to its DHT process over a pipe that process reads without
# blocking; CPython sends a message over 16 KiB in two writes, and a read between them kills the DHT process
# (BlockingIOError, then EOFError; seen with 30 kB and 200 kB records). 8 KiB stays one write with room to spare.
MAX_RECORD_BYTES = 8 * 1024

EPOCH_MAX = 2**40  # far beyond any real run; bounded so that sums and JSON stay exact
ShortStr = constr(strict=True, max_length=128)  # PeerIDs (~52), hashes (64), devices, run ids (57)
CidStr = constr(strict=True, max_length=128)  # CIDv1 base32 of a sha2-256 digest is 59 characters
Count = conint(ge=0, le=2**62, strict=True)


class FiniteFloat(ConstrainedFloat):
    """A finite, non-negative float: NaN and Infinity are refused (json.dumps would emit them, browsers reject them)."""

    strict = True
    ge = 0.0

    @classmethod
    def __get_validators__(cls):
        yield from super().__get_validators__()
        yield cls._finite

    @staticmethod
    def _finite(value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value


class PeerStatus(BaseModel):
    peer_id: ShortStr  # base58 PeerID of the writer
    device: ShortStr  # "cpu", "cuda", "mps"
    precision: ShortStr
    client_mode: StrictBool
    adapter_shapes: ShortStr  # model.hashing.shapes_hash of the peer's adapter
    epoch: conint(ge=0, le=EPOCH_MAX, strict=True)
    samples_total: Count  # samples this peer has trained on in this run (all sessions)
    samples_per_second: FiniteFloat
    loss: Optional[FiniteFloat]  # None while there is none, and when the loss was NaN/inf (then loss_nonfinite)
    time: FiniteFloat
    leaving: StrictBool = False  # set in the last record a peer writes before it exits
    final_hash: Optional[ShortStr] = None  # the adapter a peer stopping at --max-epochs leaves with (see consensus)
    rounds_averaged: Count = 0  # epochs that ended in an all-reduce with at least one other peer
    rounds_failed: Count = 0  # epochs that ended on local gradients while others were in the run
    receipts_posted: Count = 0
    receipts_pending: Count = 0
    rewards_eth: FiniteFloat = 0.0  # earned on chain (claimable + inside the challenge window)
    loss_nonfinite: StrictBool = False  # the last loss was NaN or infinite (an honest peer says so; loss is None)
    states: conlist(ShortStr, max_items=4) = []  # "epoch:digest" of its parameters at its last epochs (averagers.state_digest)
    refused: Count = 0  # requests and records this peer refused or ignored (not admitted, bad updates, bad states)
    outliers: Count = 0  # groupmates' updates clipped or trimmed hard, over all its rounds
    last_outliers: conlist(ShortStr, max_items=8) = []  # those of its last round


def state_claim(epoch: int, digest: str) -> str:
    return f"{epoch}:{digest}"


def parse_state(claim: str) -> Optional[tuple[int, str]]:
    """(epoch, digest) of a status's ``states`` entry, or None if it is not one."""
    epoch, _, digest = claim.partition(":")
    return (int(epoch), digest) if epoch.isdigit() and len(epoch) < 12 and digest else None


def finite(value: Optional[float], default: Optional[float] = 0.0) -> Optional[float]:
    """``value`` if it is a finite non-negative number, else ``default``: what an honest peer publishes."""
    return float(value) if value is not None and math.isfinite(value) and value >= 0 else default


def not_finite(value: Optional[float]) -> bool:
    return value is not None and not math.isfinite(value)


def other_shapes(statuses, ours: str) -> Optional[str]:
    """The adapter-shapes hash that more than half of ``statuses`` report, if it is not ``ours``; else None. One
    forged status (or a minority of them) must not keep a newcomer out of a run."""
    top = strict_majority(s.adapter_shapes for s in statuses)
    return top if top != ours else None


class WalletBinding(BaseModel):
    peer_id: ShortStr
    address: constr(strict=True, max_length=42)  # checksummed Ethereum address
    signature: conbytes(strict=True, max_length=65)  # the address's signature of binding_message(peer_id, address)


class CoSignature(BaseModel):
    kind: constr(strict=True, regex="^(receipt|vote)$")
    epoch: conint(ge=0, le=EPOCH_MAX, strict=True)
    digest: conbytes(strict=True, min_length=32, max_length=32)  # the EIP-712 digest signed
    signature: conbytes(strict=True, min_length=65, max_length=65)
    cid: Optional[CidStr] = None  # a vote's checkpoint CID


class CoSignatures(BaseModel):
    peer_id: ShortStr
    signatures: conlist(CoSignature, max_items=COSIGNED_KEPT)


class PublishedAdapter(BaseModel):
    epoch: conint(ge=0, le=EPOCH_MAX, strict=True)
    cid: CidStr  # CIDv1 (raw leaves) of the adapter folder: adapter_config.json, adapter_model.safetensors, ...
    adapter_hash: ShortStr  # model.hashing.tensors_hash of the weights: equal adapters, equal hashes
    time: FiniteFloat


class PublishedAdapters(BaseModel):
    peer_id: ShortStr  # the publisher, who serves the blocks
    adapters: conlist(PublishedAdapter, max_items=ADAPTERS_KEPT)  # publish_adapters sends the last 16
    keeper: StrictBool = False  # a node that copies every published adapter (a notebook): finishing peers wait for it


class RunAnnouncement(BaseModel):
    run_id: ShortStr
    peer_id: ShortStr
    time: FiniteFloat


class GlobalRecords(BaseModel):
    """Keys under the "atlas" prefix (atlas_runs)."""

    runs: Dict[BytesWithPublicKey, Optional[RunAnnouncement]]


class RunRecords(BaseModel):
    spec: Dict[BytesWithPublicKey, conbytes(strict=True, max_length=8 * 1024)]  # config.MAX_SPEC_BYTES
    peers: Dict[BytesWithPublicKey, Optional[PeerStatus]]
    wallets: Dict[BytesWithPublicKey, Optional[WalletBinding]]
    adapters: Dict[BytesWithPublicKey, Optional[PublishedAdapters]]
    cosigned: Dict[BytesWithPublicKey, Optional[CoSignatures]]
