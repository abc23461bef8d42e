"""A local chain for the demo and the integration tests: anvil (npm @foundry-rs/anvil-linux-amd64) on 127.0.0.1.

anvil's default accounts are funded with 10,000 ETH each and their keys are public (the "test test ... junk"
mnemonic): never use them on a real chain.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from atlas_swarm.errors import ChainError

REPO = Path(__file__).resolve().parents[2]
NPM_ANVIL = REPO / "contracts" / "node_modules" / "@foundry-rs" / "anvil-linux-amd64" / "bin" / "anvil"
# anvil's first dev accounts (public test keys; anvil funds them at start)
DEV_KEYS = [
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
    "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
    "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
    "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
    "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a",
    "0x8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba",
]


def find_anvil() -> str:
    for candidate in (os.environ.get("ATLAS_ANVIL"), str(NPM_ANVIL), shutil.which("anvil")):
        if candidate and Path(candidate).exists():
            return candidate
    raise ChainError("anvil was not found: run scripts/npm_deps.sh (installs it into contracts/node_modules) or set "
                     "$ATLAS_ANVIL to an anvil binary.")  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Anvil:
    process: subprocess.Popen
    url: str

    @classmethod
    def start(cls, block_time: float | None = None, timeout: float = 20.0, host: str = "127.0.0.1") -> "Anvil":
        """anvil on a free port of ``host`` (loopback; a lab's gateway for peers in network namespaces)."""
        port = free_port()
        cmd = [find_anvil(), "--host", host, "--port", str(port), "--silent", "--accounts", str(len(DEV_KEYS))]
        if block_time:
            cmd += ["--block-time", str(block_time)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        url = f"http://{host}:{port}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ChainError(f"anvil exited at start: {proc.stderr.read().decode(errors='replace')[-500:]}")
            try:
                with socket.create_connection((host, port), timeout=0.5):
                    return cls(proc, url)
            except OSError:
                time.sleep(0.05)
        proc.kill()
        raise ChainError(f"anvil did not open port {port} within {timeout:.0f} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
