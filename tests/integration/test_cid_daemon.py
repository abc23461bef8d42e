"""Our CIDs equal a real IPFS daemon's (js-ipfs, `add --only-hash`) at every size that changes the DAG's shape:
empty, one byte, exactly one chunk, one chunk + 1, and past 174 chunks (a second level of links); CIDv0 and v1."""

from __future__ import annotations

import json
import os

import pytest
import requests

from atlas_swarm.devnet.ipfs import IpfsDaemon
from atlas_swarm.storage import cid_of_file
from atlas_swarm.storage.cid import CHUNK, MAX_LINKS

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


def test_folders_get_the_same_cid_from_us_and_from_the_daemon_and_round_trip(tmp_path, tiny_model):
    """`ipfs add -r --cid-version=1 --raw-leaves` of a folder holding every listed size, and of a saved PEFT adapter
    folder, equals our CID; IpfsStore publishes through the daemon and fetches back, verifying every block."""
    from atlas_swarm.config import RunSpec
    from atlas_swarm.model.lora import load_model, save_adapter
    from atlas_swarm.storage import IpfsStore, LocalStore, cid_of_folder

    sizes = tmp_path / "sizes"
    (sizes / "nested").mkdir(parents=True)
    for size in (0, 1, CHUNK, CHUNK + 1, 5_000_000):
        (sizes / f"f{size}").write_bytes(os.urandom(size))
    (sizes / "nested" / "note.txt").write_text("a folder inside a folder")
    spec = RunSpec.from_dict({"name": "cid", "model": {"base": str(tiny_model), "task": "causal-lm"},
                              "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}})  # fmt: skip
    model, _ = load_model(spec)
    adapter = save_adapter(model, tmp_path / "adapter", {"run_id": spec.run_id, "epoch": 0})

    daemon = IpfsDaemon.start(tmp_path / "repo")
    try:
        store = IpfsStore(daemon.api)
        for folder in (sizes, adapter):
            cid = store.put_folder(folder)  # raises unless the daemon's own `add` gives our CID
            assert cid == cid_of_folder(folder) == LocalStore(tmp_path / "local").put_folder(folder)
            out = store.fetch_folder(cid, tmp_path / f"back-{folder.name}")
            assert cid_of_folder(out) == cid
            for f in folder.rglob("*"):
                if f.is_file():
                    assert (out / f.relative_to(folder)).read_bytes() == f.read_bytes()
    finally:
        daemon.stop()


def test_an_unreachable_daemon_is_a_clear_error():
    from atlas_swarm.devnet.anvil import free_port
    from atlas_swarm.errors import StorageError
    from atlas_swarm.storage import IpfsStore

    with pytest.raises(StorageError, match="does not answer.*drop --ipfs-api"):
        IpfsStore(f"http://127.0.0.1:{free_port()}", timeout=5)
