"""Hosts with their own addresses on one machine, for tests and benches of what crosses a real network: Linux network
namespaces joined by veth pairs to a bridge (iproute2), partitions, NAT routers (nftables) and rate limits (tc tbf).
Needs root (CI runs as root) and `scripts/system_deps.sh` (iproute2, nftables). Nothing leaves the namespaces it
makes: the bridge has no uplink and no address outside the lab's subnet, and nothing routes to other networks.

    with Lab("t1") as lab:                      # bridge atl-t1 with 10.<n>.0.1/24 (the machine's own side)
        a, b = lab.host("a"), lab.host("b")     # namespaces atl-t1-a, atl-t1-b: 10.<n>.0.2, .3
        home = lab.natted("c")                  # atl-t1-c behind router atl-t1-c-r: outbound only (masquerade)
        PeerProcess(..., netns=a.ns)            # a process in a namespace
        lab.partition([a], [b, home])           # the halves' switch ports on two bridges: frames between them vanish
        lab.heal()
        w, x = lab.wan(["w", "x"], delay_ms=20, loss=0.01, rate_mbit=20)  # hosts on an emulated WAN instead

The kernel here has no netem qdisc (CONFIG_NET_SCH_NETEM is off): the switch has no delay or loss (`limit` shapes a
rate with tbf); hosts that need them join ``lab.wan``, a user-space WAN (devnet/wan.py). Namespaces, links and
routers are named after the lab's tag and removed by ``close()`` (also at the start of
a lab with the same tag, for what a killed run left behind).
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import zlib
from dataclasses import dataclass, field
from typing import Optional, Sequence

import psutil

from atlas_swarm.errors import ConfigError


def _ip(*args: str, ns: Optional[str] = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip", *(["netns", "exec", ns, "ip"] if ns else []), *args]
    return _run(cmd, check)


def _run(cmd: Sequence[str], check: bool = True, stdin: Optional[str] = None) -> subprocess.CompletedProcess:
    done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30, input=stdin)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip() or done.stdout.strip()}")
    return done


@dataclass
class Host:
    name: str
    ns: str  # the namespace: `ip netns exec <ns> ...`
    addr: str  # its address (behind a NAT: its private one)
    port: Optional[str]  # the host-side veth on the lab's bridge (a NATed host: its router's; a WAN host: none)
    router: Optional[str] = None  # the namespace of its NAT router
    public: Optional[str] = None  # the address others see (its router's), for a NATed host

    def exec(self, *cmd: str) -> list[str]:
        """``cmd`` run in this host's namespace."""
        return ["ip", "netns", "exec", self.ns, *cmd]

    def maddr(self, port: int = 0) -> str:
        return f"/ip4/{self.addr}/tcp/{port}"


@dataclass
class Lab:
    tag: str
    hosts: list[Host] = field(default_factory=list)

    def __post_init__(self):
        if not shutil.which("ip"):
            raise ConfigError("The network lab needs iproute2's `ip` (run scripts/system_deps.sh).")
        if len(self.tag) > 6 or not self.tag.isalnum():
            raise ValueError("a lab tag is 1-6 letters or digits (interface names are at most 15 characters)")
        # 10.<n>.0.0/24 with n from the tag: labs with different tags can run side by side
        self.net = 64 + zlib.crc32(self.tag.encode()) % 128
        self.bridge = f"atl-{self.tag}"
        self._aside: Optional[str] = None  # the second bridge of a partition
        self._routers = 0
        self._wan: Optional[subprocess.Popen] = None
        self.wan_counts: dict = {}  # the WAN's counters per host, once it stopped (close())
        self.close()
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"10.{self.net}.0.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def gateway(self) -> str:
        """The machine's own address on the lab (a service here, e.g. anvil, listens on it for the hosts)."""
        return f"10.{self.net}.0.1"

    def _new_ns(self, name: str) -> str:
        ns = f"atl-{self.tag}-{name}"
        _ip("netns", "add", ns)
        _ip("link", "set", "lo", "up", ns=ns)
        return ns

    def _plug(self, ns: str, addr: str, ifname: str = "eth0") -> str:
        """A veth from ``ns`` (as ``ifname``, with ``addr``/24) to the lab's bridge; returns the bridge-side end."""
        port = f"a{self.tag}{len(self.hosts) + self._routers}"
        _ip("link", "add", port, "type", "veth", "peer", "name", ifname, "netns", ns)
        _ip("link", "set", port, "master", self.bridge, "up")
        _ip("addr", "add", f"{addr}/24", "dev", ifname, ns=ns)
        _ip("link", "set", ifname, "up", ns=ns)
        return port

    def host(self, name: str) -> Host:
        """A host on the lab's switch with the next free address."""
        addr = f"10.{self.net}.0.{len(self.hosts) + self._routers + 2}"
        ns = self._new_ns(name)
        host = Host(name, ns, addr, self._plug(ns, addr))
        self.hosts.append(host)
        return host

    def natted(self, name: str) -> Host:
        """A host behind its own home router: a private 192.168.<k>.2, the router's public address on the switch,
        masquerade outbound, nothing inbound (no port forwarding)."""
        if not shutil.which("nft"):
            raise ConfigError("A NATed host needs nftables' `nft` (run scripts/system_deps.sh).")
        self._routers += 1
        k = self._routers
        public = f"10.{self.net}.0.{len(self.hosts) + self._routers + 1}"
        router = self._new_ns(f"{name}-r")
        port = self._plug(router, public, "wan")
        ns = self._new_ns(name)
        private = f"192.168.{k}.2"
        _ip("link", "add", "lan", "netns", router, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("addr", "add", f"192.168.{k}.1/24", "dev", "lan", ns=router)
        _ip("link", "set", "lan", "up", ns=router)
        _ip("addr", "add", f"{private}/24", "dev", "eth0", ns=ns)
        _ip("link", "set", "eth0", "up", ns=ns)
        _ip("route", "add", "default", "via", f"192.168.{k}.1", ns=ns)
        _run(["ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        rules = """
table ip nat {
  chain post {
    type nat hook postrouting priority 100;
    oifname "wan" masquerade
  }
}
table ip filter {
  chain through {
    type filter hook forward priority 0; policy drop;
    ct state established,related accept
    iifname "lan" oifname "wan" accept
  }
}
"""
        _run(["ip", "netns", "exec", router, "nft", "-f", "-"], stdin=rules)
        host = Host(name, ns, private, port, router=router, public=public)
        self.hosts.append(host)
        return host

    def wan(self, names: Sequence[str], delay_ms: float = 20.0, loss: float = 0.01, rate_mbit: float = 20.0,
            queue_ms: float = 200.0, seed: int = 0, uplinks: dict[str, float] | None = None) -> list[Host]:  # fmt: skip
        """Hosts joined to each other (and to nothing else) by an emulated WAN, devnet/wan.py: ``delay_ms`` one way
        (RTT twice that), ``loss`` per packet, a ``rate_mbit`` uplink each (``uplinks``: name -> Mbit/s of the hosts
        whose uplink differs). Addresses 10.<n>.1.2, .3, ...; one WAN per lab; they are not on the switch (no
        partition)."""
        if self._wan is not None:
            raise RuntimeError("one WAN per lab")
        if not os.path.exists("/dev/net/tun"):  # a container may lack the node while its kernel has TUN
            try:
                os.makedirs("/dev/net", exist_ok=True)
                os.mknod("/dev/net/tun", stat.S_IFCHR | 0o666, os.makedev(10, 200))
            except OSError as e:
                raise ConfigError(f"The lab's WAN needs TUN devices: /dev/net/tun is missing ({e}).") from None
        hosts = [Host(name, self._new_ns(name), f"10.{self.net}.1.{i + 2}", None) for i, name in enumerate(names)]
        self._wan = subprocess.Popen(
            [sys.executable, "-m", "atlas_swarm.devnet.wan", "--tag", self.tag, "--delay-ms", str(delay_ms),
             "--loss", str(loss), "--rate-mbit", str(rate_mbit), "--queue-ms", str(queue_ms), "--seed", str(seed),
             *(f"{h.ns}={h.addr}" + (f"@{uplinks[h.name]}" if h.name in (uplinks or {}) else "") for h in hosts)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        readable, _, _ = select.select([self._wan.stdout], [], [], 30)
        if not readable or "ready" not in self._wan.stdout.readline():
            self._wan.kill()
            raise RuntimeError(f"the lab's WAN did not start: {self._wan.communicate(timeout=10)[1][-2000:]}")
        for h in hosts:
            _ip("addr", "add", f"{h.addr}/24", "dev", "wan0", ns=h.ns)
            _ip("link", "set", "wan0", "up", ns=h.ns)
        self.hosts += hosts
        return hosts

    # -- faults ---------------------------------------------------------------------------------------------------
    def partition(self, *groups: Sequence[Host]) -> None:
        """Cut the switch in two: the hosts of ``groups[1:]`` move to a second bridge, so frames between the halves
        are lost without a word (no reset, no ICMP), as on a broken link. One partition at a time."""
        if self._aside is not None:
            raise RuntimeError("already partitioned; heal() first")
        self._aside = f"atl-{self.tag}-x"
        _ip("link", "add", self._aside, "type", "bridge")
        _ip("link", "set", self._aside, "up")
        for group in groups[1:]:
            for host in group:
                if host.port is None:
                    raise ValueError(f"{host.name} is on the WAN, not the switch")
                _ip("link", "set", host.port, "master", self._aside)

    def heal(self) -> None:
        if self._aside is None:
            return
        for host in self.hosts:
            if host.port is not None:
                _ip("link", "set", host.port, "master", self.bridge)
        _ip("link", "del", self._aside, check=False)
        self._aside = None

    def limit(self, host: Host, rate_mbit: float, burst_kb: int = 64, latency_ms: int = 100) -> None:
        """Shape ``host``'s uplink (its outgoing traffic; a NATed host's router's WAN side) with a token bucket."""
        if host.port is None:
            raise ValueError(f"{host.name} is on the WAN: its rate is the WAN's")
        ns, dev = (host.router, "wan") if host.router else (host.ns, "eth0")
        _run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate",
              f"{rate_mbit}mbit", "burst", f"{burst_kb}kb", "latency", f"{latency_ms}ms"])  # fmt: skip

    # -- cleanup --------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Remove every namespace and link of this tag, SIGKILLing what still runs in them (a process left in a
        deleted namespace would keep it, and its veth, alive), and stop the lab's WAN (also one a killed run left)."""
        if self._wan is not None:
            self._wan.terminate()
            try:
                out, _ = self._wan.communicate(timeout=10)
                self.wan_counts = next((json.loads(x)["counts"] for x in out.splitlines() if "counts" in x), {})
            except subprocess.TimeoutExpired:
                self._wan.kill()
            self._wan = None
        for proc in psutil.process_iter(["cmdline"]):
            cmd = proc.info["cmdline"] or []
            if "atlas_swarm.devnet.wan" in cmd and cmd[cmd.index("--tag") + 1 : cmd.index("--tag") + 2] == [self.tag]:
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass
        listed = _run(["ip", "netns", "list"], check=False).stdout.split("\n")
        for ns in (line.split(" ")[0] for line in listed):
            if ns.startswith(f"atl-{self.tag}-"):
                for pid in _run(["ip", "netns", "pids", ns], check=False).stdout.split():
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except (ProcessLookupError, ValueError):
                        pass
                _ip("netns", "del", ns, check=False)
        links = _run(["ip", "-o", "link", "show"], check=False).stdout.split("\n")
        for name in (line.split(": ")[1].split("@")[0] for line in links if line.count(": ") >= 2):
            if re.fullmatch(rf"a{self.tag}\d+|atl-{self.tag}(-x)?", name):
                _ip("link", "del", name, check=False)
        self.hosts, self._aside, self._routers = [], None, 0
