"""Test helpers around peer processes (started by atlas_swarm.launch, the one launcher) and HTTP endpoints."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from atlas_swarm.launch import PeerProcess, first_loopback

first_maddr = first_loopback  # a peer's loopback multiaddr from its started event


def planned_first(workdir: Path, name: str, host: str = "127.0.0.1") -> tuple[list[str], str]:
    """The first peer's address, fixed before it runs (its identity made here in ``workdir/name``, a free port), so
    the others start with it at once instead of after its start-up (imports alone take 8-15 s on 2 cores); they try
    its address until --join-timeout. Returns the first peer's --host-maddrs flags and its /p2p/ multiaddr."""
    from atlas_swarm.identity import Identity

    identity = Identity.load_or_create(workdir / name / "identity.key")
    with socket.socket() as s:
        s.bind((host, 0))  # in a lab host's own namespace any port is free; on loopback, one nobody holds now
        port = s.getsockname()[1]
    return ["--host-maddrs", f"/ip4/{host}/tcp/{port}"], f"/ip4/{host}/tcp/{port}/p2p/{identity.peer_id}"

POLL = 0.2


def start_peer(workdir: Path, name: str, args: list[str], threads: int = 1, attack: str = "") -> PeerProcess:
    """A peer process on loopback, offline, in ``workdir/name`` (atlas_swarm.launch, as the notebook starts them);
    with ``attack``, our own peer with that attack patched in (tests/byzantine.py)."""
    verbose = ["--verbose"] if os.environ.get("ATLAS_TEST_VERBOSE") else []  # hivemind's logs on each peer's stderr
    args = ["--host-maddrs", "/ip4/127.0.0.1/tcp/0", *args, *verbose]
    return PeerProcess(workdir / name, args, threads=threads, name=name,
                       env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "ATLAS_ATTACK": attack},
                       module="tests.byzantine" if attack else "atlas_swarm.peer")  # fmt: skip


@contextmanager
def killed_at_exit(peers: list[PeerProcess]):
    """Whatever happens in the block, SIGKILL every peer in ``peers`` (the list may grow inside the block)."""
    try:
        yield peers
    finally:
        for p in peers:
            p.kill()


def kill_session(process) -> None:
    """SIGKILL a process started with start_new_session=True and everything in its session (a bootstrap node and
    its p2pd), then reap it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(10)


def run_together(commands: list[list[str]], timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """Run the commands at once (each a fresh interpreter: its imports take 3-7 s of a core) and return each one's
    result, in order; whatever is still running when this returns or fails is killed."""
    runs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    try:
        outs = [r.communicate(timeout=timeout) for r in runs]
        return [subprocess.CompletedProcess(c, r.returncode, *out) for c, r, out in zip(commands, runs, outs)]
    finally:
        for r in runs:
            r.kill()
            r.wait()


def wait_until(cond: Callable[[], object], timeout: float, what: str, poll: float = 0.3):
    """Poll ``cond`` until it returns something truthy (returned), or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def http_get(url: str) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def scrape(base_url: str) -> dict[tuple, float]:
    """/metrics parsed by Prometheus' own parser: {(sample name, sorted label items): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(http_get(base_url + "/metrics")[1].decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out
