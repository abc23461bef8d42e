"""Content addressing: IPFS CIDs computed locally, exactly as `ipfs add` computes them (so a checkpoint's CID is known
before, and without, any IPFS node), and the stores that hold the blocks. Knows nothing of swarms or runs.

    cid.py     cid_of_bytes / cid_of_file / cid_of_folder: UnixFS chunking (256 KiB), balanced DAG (174 links),
               CIDv0 or CIDv1 raw leaves, folders as dag-pb directories
    dag.py     the way back: verify each block against its CID, walk a bounded DAG, write a folder
    store.py   LocalStore (embedded, default) and IpfsStore (/api/v0 RPC): put_folder, get_blocks, fetch_folder
"""

from atlas_swarm.storage.cid import cid_of_bytes, cid_of_file, cid_of_folder
from atlas_swarm.storage.dag import CorruptBlock
from atlas_swarm.storage.store import IpfsStore, LocalStore, Store, open_store

__all__ = ["cid_of_bytes", "cid_of_file", "cid_of_folder", "CorruptBlock", "IpfsStore", "LocalStore", "Store",
           "open_store"]
