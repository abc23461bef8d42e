"""Content addressing: IPFS CIDs computed locally, exactly as `ipfs add` computes them (so a checkpoint's CID is known
before, and without, any IPFS node), and a launcher for a local js-ipfs daemon (tests, demo).

    cid.cid_of_bytes / cid_of_file   UnixFS chunking (256 KiB), balanced DAG (174 links), CIDv0 or CIDv1 raw leaves
"""

from atlas_swarm.storage.cid import cid_of_bytes, cid_of_file

__all__ = ["cid_of_bytes", "cid_of_file"]
