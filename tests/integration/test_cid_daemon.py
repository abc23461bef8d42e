"""Our CIDs equal a real IPFS daemon's (js-ipfs, `add --only-hash`) at every size that changes the DAG's shape:
empty, one byte, exactly one chunk, one chunk + 1, and past 174 chunks (a second level of links); CIDv0 and v1."""

from __future__ import annotations

import json
import os

import requests
import pytest

from atlas_swarm.storage import cid_of_file
from atlas_swarm.storage.cid import CHUNK, MAX_LINKS
from atlas_swarm.storage.ipfs_daemon import IpfsDaemon

pytestmark = pytest.mark.integration
SIZES = [0, 1, 1000, CHUNK, CHUNK + 1, 3 * CHUNK + 7, MAX_LINKS * CHUNK, MAX_LINKS * CHUNK + 1]


def test_cids_match_a_real_ipfs_daemon(tmp_path):
    daemon = IpfsDaemon.start(tmp_path / "repo")
    try:
        for size in SIZES:
            path = tmp_path / f"f{size}"
            path.write_bytes(os.urandom(size))
            for version in (0, 1):
                with open(path, "rb") as f:
                    params = {"only-hash": "true", "cid-version": version}
                    if version == 1:
                        params["cid-base"] = "base32"  # js-ipfs prints v1 in base58btc unless asked
                    # js-ipfs answers 500 to a multipart part without a Content-Type
                    part = {"file": (path.name, f, "application/octet-stream")}
                    r = requests.post(f"{daemon.api}/api/v0/add", params=params, files=part, timeout=120)
                r.raise_for_status()
                assert cid_of_file(path, version) == json.loads(r.text.splitlines()[-1])["Hash"], (size, version)
    finally:
        daemon.stop()
