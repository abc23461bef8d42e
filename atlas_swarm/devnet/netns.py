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

The kernel here has no netem qdisc (CONFIG_NET_SCH_NETEM is off): delay is not emulated by this module; rates are
(tbf). Namespaces, links and routers are named after the lab's tag and removed by ``close()`` (also at the start of
a lab with the same tag, for what a killed run left behind).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import zlib
from dataclasses import dataclass, field
from typing import Optional, Sequence

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
    port: str  # the host-side veth on the lab's bridge (for a NATed host: its router's)
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
                _ip("link", "set", host.port, "master", self._aside)

    def heal(self) -> None:
        if self._aside is None:
            return
        for host in self.hosts:
            _ip("link", "set", host.port, "master", self.bridge)
        _ip("link", "del", self._aside, check=False)
        self._aside = None

    def limit(self, host: Host, rate_mbit: float, burst_kb: int = 64, latency_ms: int = 100) -> None:
        """Shape ``host``'s uplink (its outgoing traffic; a NATed host's router's WAN side) with a token bucket."""
        ns, dev = (host.router, "wan") if host.router else (host.ns, "eth0")
        _run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate",
              f"{rate_mbit}mbit", "burst", f"{burst_kb}kb", "latency", f"{latency_ms}ms"])  # fmt: skip

    # -- cleanup --------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Remove every namespace and link of this tag, SIGKILLing what still runs in them (a process left in a
        deleted namespace would keep it, and its veth, alive)."""
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
