"""Two content-addressed stores with one interface: ``put_folder(folder) -> CID``, ``get_blocks(cids)``,
``fetch_folder(cid, dest)`` (every block verified, see dag.py).

    LocalStore(root)   embedded, the default: blocks as files under ROOT/blocks/, no daemon
    IpfsStore(api)     a kubo-compatible daemon's /api/v0 RPC (kubo, js-ipfs); `add` must return our own CID

Both give a folder the CID `ipfs add -r --cid-version=1 --raw-leaves` gives it. ``ipfshttpclient`` is not used: its
``connect()`` refuses every daemon newer than 0.7 and the project is unmaintained; the RPC needs five calls.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Mapping, Optional
from urllib.parse import quote

import requests

from atlas_swarm.errors import StorageError
from atlas_swarm.storage.cid import cid_of_folder, encode
from atlas_swarm.storage.dag import MAX_ADAPTER_BYTES, MAX_BLOCK, fetch_blocks, fetch_folder, parse_cid


class Store:
    """What both backends share: fetching is a verified DAG walk over ``get_blocks``."""

    def put_folder(self, folder: str | Path) -> str:
        raise NotImplementedError

    def get_blocks(self, cids: list[bytes]) -> Mapping[bytes, bytes]:
        raise NotImplementedError

    def fetch_folder(self, cid: str, dest: str | Path, max_bytes: int = MAX_ADAPTER_BYTES) -> Path:
        return fetch_folder(self.get_blocks, cid, dest, max_bytes)


class LocalStore(Store):
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.blocks = self.root / "blocks"
        try:
            self.blocks.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"Cannot create the block store in {str(self.root)!r}: {e.strerror}.") from None

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def put_block(self, cid: bytes, block: bytes) -> None:
        path = self.blocks / encode(cid)
        if path.exists():
            return  # content-addressed: same name, same bytes
        fd, tmp = tempfile.mkstemp(dir=self.blocks, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(block)
        os.replace(tmp, path)

    def put_folder(self, folder: str | Path) -> str:
        if not Path(folder).is_dir():
            raise StorageError(f"{str(folder)!r} is not a folder.")
        try:
            return cid_of_folder(folder, 1, emit=self.put_block)
        except (OSError, ValueError) as e:
            raise StorageError(f"Cannot store {str(folder)!r}: {e}.") from None

    def get_blocks(self, cids: list[bytes]) -> dict[bytes, bytes]:
        out = {}
        for cid in cids:
            try:
                out[cid] = (self.blocks / encode(cid)).read_bytes()
            except FileNotFoundError:
                pass
        return out

    def pin(self, get_blocks, cid: str, max_bytes: int = MAX_ADAPTER_BYTES) -> int:
        """Copy the whole DAG of ``cid`` (at most ``max_bytes`` of blocks) from another source into this store,
        verifying every block. Returns the bytes of its blocks."""
        blocks = fetch_blocks(get_blocks, parse_cid(cid), max_bytes)
        try:
            for c, block in blocks.items():
                self.put_block(c, block)
        except OSError as e:
            raise StorageError(f"Cannot keep {cid} in {str(self.root)!r}: {e.strerror or e}.") from None
        return sum(len(b) for b in blocks.values())


class IpfsStore(Store):
    """A daemon's RPC (``--ipfs-api http://127.0.0.1:5001``). Blocks it returns are verified like any others."""

    def __init__(self, api: str, timeout: float = 60.0):
        self.api, self.timeout, self.http = api.rstrip("/"), timeout, requests.Session()
        self.version = self._call("version").json().get("Version", "?")

    def __repr__(self) -> str:
        return f"IpfsStore({self.api!r})"

    def _call(self, command: str, **kwargs):
        try:
            r = self.http.post(f"{self.api}/api/v0/{command}", timeout=self.timeout, **kwargs)
        except requests.RequestException as e:
            raise StorageError(f"The IPFS daemon at {self.api} does not answer ({type(e).__name__}). Start it "
                               f"(`ipfs daemon`) or drop --ipfs-api to use the embedded store.") from None  # fmt: skip
        if r.status_code != 200:
            raise StorageError(f"The IPFS daemon at {self.api} refused {command}: HTTP {r.status_code} {r.text[:200]}")
        return r

    def put_folder(self, folder: str | Path) -> str:
        folder = Path(folder)
        ours = cid_of_folder(folder, 1)
        parts = []  # multipart: the folder, then each entry under its path (js-ipfs needs a Content-Type on each)
        for path in [folder, *sorted(folder.rglob("*"))]:
            rel = quote(str(path.relative_to(folder.parent)), safe="")
            if path.is_dir():
                parts.append(("file", (rel, b"", "application/x-directory")))
            else:
                parts.append(("file", (rel, path.read_bytes(), "application/octet-stream")))
        params = {"cid-version": 1, "raw-leaves": "true", "cid-base": "base32", "pin": "true"}
        added = [json.loads(line) for line in self._call("add", params=params, files=parts).text.splitlines()]
        theirs = next((a["Hash"] for a in added if a.get("Name") == folder.name), None)
        if theirs != ours:
            raise StorageError(f"The IPFS daemon at {self.api} stored {folder.name!r} as {theirs}, but its content "
                               f"hashes to {ours}: the daemon chunks differently; refusing to publish.")  # fmt: skip
        return ours

    def get_blocks(self, cids: list[bytes]) -> dict[bytes, bytes]:
        out = {}
        for cid in cids:
            try:  # offline: a block the daemon lacks would be searched for on the network; don't wait long
                r = self.http.post(f"{self.api}/api/v0/block/get", params={"arg": encode(cid)}, timeout=self.timeout)
            except requests.RequestException as e:
                raise StorageError(f"The IPFS daemon at {self.api} does not answer ({type(e).__name__}).") from None
            if r.status_code == 200 and len(r.content) <= MAX_BLOCK:
                out[cid] = r.content
        return out


def open_store(root: str | Path, ipfs_api: Optional[str] = None) -> Store:
    """The IPFS backend when ``ipfs_api`` is given, else the embedded store under ``root``."""
    return IpfsStore(ipfs_api) if ipfs_api else LocalStore(root)
