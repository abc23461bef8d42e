"""Schemas of the run's DHT records. Each subkey is its writer's public key, so only that peer can write it.

    <run_id>_spec    {owner: canonical run spec JSON}   any peer holding the spec republishes it (self-certifying:
                                                        a reader keeps only bytes whose hash matches the run id)
    <run_id>_peers   {owner: PeerStatus}                each peer's live status, refreshed while it trains
    <run_id>_wallets {owner: WalletBinding}             PeerID -> Ethereum address, signed by both keys (a peer that
                                                        posts proofs; see proofs/binding.py)
    <run_id>_adapters {owner: PublishedAdapters}     the adapters a peer published (epoch → CID), and serves
                                                        over p2p (swarm/blocks.py) from its store
    atlas_runs       {owner: RunAnnouncement}           the run each live peer is in: how a monitor finds every run
"""

from __future__ import annotations

from typing import Dict, List, Optional

from hivemind.dht.schema import BytesWithPublicKey
from pydantic.v1 import BaseModel, StrictBool, StrictBytes, StrictFloat, StrictStr, conint

SPEC_TTL = 3600.0  # seconds a published spec lives without a refresh
STATUS_TTL = 60.0  # seconds a peer's status lives without a refresh
STATUS_EVERY = 5.0  # seconds between status refreshes
WALLET_TTL = 600.0  # seconds a wallet binding lives without a refresh
ADAPTERS_TTL = 24 * 3600.0  # seconds a publisher's adapter list lives without a refresh
ADAPTERS_KEPT = 16  # a publisher lists its last 16 adapters


class PeerStatus(BaseModel):
    peer_id: StrictStr  # base58 PeerID of the writer
    device: StrictStr  # "cpu", "cuda", "mps"
    precision: StrictStr
    client_mode: StrictBool
    adapter_shapes: StrictStr  # model.hashing.shapes_hash of the peer's adapter
    epoch: conint(ge=0, strict=True)
    samples_total: conint(ge=0, strict=True)  # samples this peer has trained on in this run (all sessions)
    samples_per_second: StrictFloat
    loss: Optional[StrictFloat]
    time: StrictFloat
    leaving: StrictBool = False  # set in the last record a peer writes before it exits
    final_hash: Optional[StrictStr] = None  # the adapter a peer stopping at --max-epochs leaves with (see consensus)
    rounds_averaged: conint(ge=0, strict=True) = 0  # epochs that ended in an all-reduce with at least one other peer
    rounds_failed: conint(ge=0, strict=True) = 0  # epochs that ended on local gradients while others were in the run
    proofs_posted: conint(ge=0, strict=True) = 0
    proofs_pending: conint(ge=0, strict=True) = 0
    rewards_eth: StrictFloat = 0.0  # earned on chain (claimable + inside the challenge window)


class WalletBinding(BaseModel):
    peer_id: StrictStr
    address: StrictStr  # checksummed Ethereum address
    signature: StrictBytes  # the address's signature of proofs.binding.binding_message(peer_id, address)


class PublishedAdapter(BaseModel):
    epoch: conint(ge=0, strict=True)
    cid: StrictStr  # CIDv1 (raw leaves) of the adapter folder: adapter_config.json, adapter_model.safetensors, ...
    adapter_hash: StrictStr  # model.hashing.tensors_hash of the weights: equal adapters, equal hashes
    time: StrictFloat


class PublishedAdapters(BaseModel):
    peer_id: StrictStr  # the publisher, who serves the blocks
    adapters: List[PublishedAdapter]
    keeper: StrictBool = False  # a node that copies every published adapter (a notebook): finishing peers wait for it


class RunAnnouncement(BaseModel):
    run_id: StrictStr
    peer_id: StrictStr
    time: StrictFloat


class GlobalRecords(BaseModel):
    """Keys under the "atlas" prefix (atlas_runs)."""

    runs: Dict[BytesWithPublicKey, Optional[RunAnnouncement]]


class RunRecords(BaseModel):
    spec: Dict[BytesWithPublicKey, StrictBytes]
    peers: Dict[BytesWithPublicKey, Optional[PeerStatus]]
    wallets: Dict[BytesWithPublicKey, Optional[WalletBinding]]
    adapters: Dict[BytesWithPublicKey, Optional[PublishedAdapters]]
