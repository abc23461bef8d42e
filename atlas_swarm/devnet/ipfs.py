"""A local IPFS RPC daemon (js-ipfs 0.66 from npm, in scripts/ipfs/; no kubo binary is reachable offline), offline and
on loopback ports: for tests and the demo. It serves the same /api/v0 RPC as kubo."""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from atlas_swarm.devnet.anvil import free_port
from atlas_swarm.errors import AtlasError

IPFS_DIR = Path(__file__).resolve().parents[2] / "scripts" / "ipfs"
JSIPFS = IPFS_DIR / "node_modules" / ".bin" / "jsipfs"


@dataclass
class IpfsDaemon:
    process: subprocess.Popen
    api: str  # http://127.0.0.1:PORT

    @classmethod
    def start(cls, repo: Path, timeout: float = 60.0) -> "IpfsDaemon":
        if not JSIPFS.exists():
            raise AtlasError("js-ipfs is not installed: run scripts/npm_deps.sh scripts/ipfs")
        env = dict(os.environ, IPFS_PATH=str(repo),
                   NODE_OPTIONS=f"--require {IPFS_DIR / 'polyfill.cjs'}")  # fmt: skip
        subprocess.run([str(JSIPFS), "init", "--empty-repo"], env=env, capture_output=True, check=True, timeout=120)
        config_path = repo / "config"
        config = json.loads(config_path.read_text())
        api = free_port()
        config["Addresses"].update(Swarm=[], API=f"/ip4/127.0.0.1/tcp/{api}", RPC=f"/ip4/127.0.0.1/tcp/{free_port()}",
                                   Gateway=f"/ip4/127.0.0.1/tcp/{free_port()}")  # fmt: skip
        config["Bootstrap"] = []
        config_path.write_text(json.dumps(config))
        log = (repo / "daemon.log").open("w")
        proc = subprocess.Popen([str(JSIPFS), "daemon", "--offline"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        url = f"http://127.0.0.1:{api}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AtlasError(f"the IPFS daemon exited: {(repo / 'daemon.log').read_text()[-1000:]}")
            if "Daemon is ready" in (repo / "daemon.log").read_text():
                return cls(proc, url)
            time.sleep(0.2)
        proc.kill()
        raise AtlasError(f"the IPFS daemon was not ready within {timeout:.0f} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()
