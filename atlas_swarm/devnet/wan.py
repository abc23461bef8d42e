"""A wide-area network between a lab's hosts, emulated in user space: the kernel here has no netem qdisc, so delay and
loss cannot be set with `tc`. Each host gets a TUN interface (`wan0`, created inside its namespace); this process reads
every IPv4 packet a host sends, drops it with probability ``loss``, queues it behind the sender's uplink (a
``rate_mbit`` serializer with at most ``queue_ms`` of backlog, beyond which it is dropped as a full home-router buffer
would), and writes it into the destination host's TUN ``delay_ms`` after it left the uplink. With the same settings
on every host, two hosts see an RTT of 2 × ``delay_ms``. Packets to addresses of no host are dropped: nothing leaves
the lab. Non-persistent TUNs vanish with this process, so killing it removes the WAN.

    python -m atlas_swarm.devnet.wan --tag T --delay-ms 20 --loss 0.01 --rate-mbit 20 NS=10.1.1.2 NS2=10.1.1.3 ...

Prints one JSON line ``{"ready": true}`` once every TUN exists (the caller then gives them addresses), and on SIGTERM
or SIGINT one line of counters per host (packets and bytes sent, lost, dropped at a full queue). Start it through
``Lab.wan`` (devnet/netns.py).
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import heapq
import ipaddress
import json
import os
import random
import select
import signal
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
CLONE_NEWNET = 0x40000000
IFNAME = "wan0"
MTU = 1500
DRAIN = 64  # packets read from one TUN per wake-up, so one busy host cannot starve the others


def open_tun(ns: str) -> int:
    """A TUN named IFNAME created inside namespace ``ns``; the returned fd stays bound to it from here."""
    libc = ctypes.CDLL(None, use_errno=True)
    here = os.open("/proc/self/ns/net", os.O_RDONLY)
    there = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(there, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns}")
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", IFNAME.encode(), IFF_TUN | IFF_NO_PI))
    finally:
        if libc.setns(here, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns back")
        os.close(here)
        os.close(there)
    return fd


class Wan:
    def __init__(self, hosts: dict[str, str], delay_ms: float, loss: float, rate_mbit: float, queue_ms: float,
                 seed: int = 0, rates: dict[str, float] | None = None):  # fmt: skip
        self.fds = {ns: open_tun(ns) for ns in hosts}
        self.by_addr = {ipaddress.IPv4Address(addr).packed: self.fds[ns] for ns, addr in hosts.items()}
        self.name = {fd: ns for ns, fd in self.fds.items()}
        self.delay, self.loss = delay_ms / 1000, loss
        self.byte_s = {fd: (rates or {}).get(ns, rate_mbit) * 1e6 / 8 for ns, fd in self.fds.items()}
        self.queue = queue_ms / 1000
        self.rng = random.Random(seed)
        self.uplink_free = {fd: 0.0 for fd in self.fds.values()}  # when each sender's uplink is next idle
        self.flight: list[tuple[float, int, int, bytes]] = []  # (arrival, seq, destination fd, packet)
        self.seq = 0
        self.counts = {ns: {"sent": 0, "bytes": 0, "lost": 0, "queue_full": 0, "unroutable": 0} for ns in hosts}
        self.stopped = False

    def take(self, fd: int, now: float) -> None:
        count = self.counts[self.name[fd]]
        for _ in range(DRAIN):
            try:
                packet = os.read(fd, 65535)
            except (BlockingIOError, InterruptedError):
                return
            if len(packet) < 20 or packet[0] >> 4 != 4:
                continue  # IPv6 (router solicitations and the like): the lab is IPv4
            to = self.by_addr.get(packet[16:20])
            if to is None:
                count["unroutable"] += 1
                continue
            if self.rng.random() < self.loss:
                count["lost"] += 1
                continue
            start = max(now, self.uplink_free[fd])
            if start - now > self.queue:
                count["queue_full"] += 1
                continue
            self.uplink_free[fd] = start + len(packet) / self.byte_s[fd]
            self.seq += 1
            heapq.heappush(self.flight, (self.uplink_free[fd] + self.delay, self.seq, to, packet))
            count["sent"] += 1
            count["bytes"] += len(packet)

    def deliver(self, now: float) -> None:
        while self.flight and self.flight[0][0] <= now:
            _, _, to, packet = heapq.heappop(self.flight)
            try:
                os.write(to, packet)
            except OSError:
                pass  # the host's interface is down or its queue full: lost, as on a wire

    def run(self) -> None:
        poller = select.poll()
        for fd in self.fds.values():
            poller.register(fd, select.POLLIN)
        while not self.stopped:
            wait_ms = 200 if not self.flight else max(0.0, (self.flight[0][0] - time.monotonic()) * 1000)
            try:
                ready = poller.poll(wait_ms)
            except InterruptedError:
                ready = []
            now = time.monotonic()
            for fd, _ in ready:
                self.take(fd, now)
            self.deliver(time.monotonic())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tag", required=True, help="the lab's tag (to find and stop this process)")
    ap.add_argument("--delay-ms", type=float, default=20.0, help="one-way delay (RTT is twice this)")
    ap.add_argument("--loss", type=float, default=0.0, help="probability that a packet is lost")
    ap.add_argument("--rate-mbit", type=float, default=1000.0, help="each host's uplink")
    ap.add_argument("--queue-ms", type=float, default=200.0, help="uplink backlog before packets are dropped")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("hosts", nargs="+", help="NAMESPACE=IPV4 for each host, or NAMESPACE=IPV4@MBIT: its own uplink")
    args = ap.parse_args(argv)
    hosts, rates = {}, {}
    for h in args.hosts:
        ns, _, rest = h.partition("=")
        hosts[ns], _, mbit = rest.partition("@")
        if mbit:
            rates[ns] = float(mbit)
    wan = Wan(hosts, args.delay_ms, args.loss, args.rate_mbit, args.queue_ms, args.seed, rates)

    def stop(*_):
        wan.stopped = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(json.dumps({"ready": True}), flush=True)
    wan.run()
    print(json.dumps({"counts": wan.counts}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
