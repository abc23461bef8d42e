"""Partition healing. hivemind 1.1.12 pings a node's initial peers once, at start, and never again (its issue #624):
after a network split the halves evict each other from their routing tables and stay two swarms for good. This
loop, run inside the DHT process, keeps re-contacting the initial peers and the peers this node was connected to
(their addresses remembered from p2pd's connections), each with a bounded backoff, and pings them so that both ends
put each other back in their routing tables; from there the DHT's own lookups find everyone else.

Bounded: at most MAX_KNOWN remembered peers (the most recently seen), at most DIALS_PER_TICK dials per tick, each
within DIAL_TIMEOUT; a peer that keeps failing is tried every MAX_BACKOFF seconds, so a link that comes back is used
again within about MAX_BACKOFF + TICK seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Optional, Sequence

from hivemind.p2p import PeerID
from hivemind.utils.multiaddr import Multiaddr

logger = logging.getLogger(__name__)

TICK = 3.0  # seconds between rounds
MAX_BACKOFF = 6.0  # the longest wait before a failing peer is tried again (was 12 s: heals took seconds longer)
DIAL_TIMEOUT = 5.0
DIALS_PER_TICK = 8
MAX_KNOWN = 64


class _Peer:
    __slots__ = ("addrs", "fails", "next_try", "initial")

    def __init__(self, addrs: list, initial: bool = False):
        self.addrs, self.fails, self.next_try, self.initial = addrs, 0, 0.0, initial


_stop: Optional[asyncio.Event] = None  # in the DHT process: set by stop_healing
_loop_task: Optional[asyncio.Task] = None


async def heal_forever(_dht, node, initial_peers: Sequence[str], tick: float = TICK) -> None:
    """The loop (``Swarm.join`` starts it with ``dht.run_coroutine``); ends when stop_healing is run, before the
    DHT process stops (``Swarm.shutdown``). Left pending, the task was destroyed with the DHT's event loop: "Task was
    destroyed but it is pending!" and hivemind's traceback of it on a stopped peer's stderr (README, Known limits)."""
    global _stop, _loop_task
    _stop, _loop_task = asyncio.Event(), asyncio.current_task()
    known: OrderedDict[PeerID, _Peer] = OrderedDict()
    for maddr in initial_peers:
        m = Multiaddr(maddr)
        pid = PeerID.from_base58(m.value_for_protocol("p2p"))
        peer = known.setdefault(pid, _Peer([], initial=True))
        peer.addrs.append(m.decapsulate(Multiaddr(f"/p2p/{m.value_for_protocol('p2p')}")))
    me = node.peer_id
    try:
        while True:
            try:
                await asyncio.wait_for(_stop.wait(), tick)
                return
            except asyncio.TimeoutError:
                pass
            try:
                await _tick(node, me, known)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bad tick is logged and the loop goes on (it must never end the DHT process)
                logger.debug("partition healing tick failed: %r", e)
    except asyncio.CancelledError:
        if not _stop.is_set():
            raise  # (hivemind's wrapper logs it) not ours: the DHT process is going down some other way


async def stop_healing(_dht, _node, wait: float = 0.5) -> None:
    """End heal_forever (``dht.run_coroutine``): at once between ticks, a tick in progress cancelled after ``wait``."""
    if _stop is None or _loop_task is None:
        return
    _stop.set()
    _done, pending = await asyncio.wait({_loop_task}, timeout=wait)
    if pending:
        _loop_task.cancel()
        await asyncio.wait({_loop_task}, timeout=wait)


async def _tick(node, me, known: "OrderedDict[PeerID, _Peer]") -> None:
    connected = {info.peer_id: list(info.addrs) for info in await node.p2p.list_peers()}
    for pid, addrs in connected.items():  # remember where the peers we talk to are (most recent last)
        peer = known.pop(pid, None) or _Peer([])
        if addrs:
            peer.addrs = addrs if not peer.initial else list({str(a): a for a in [*peer.addrs, *addrs]}.values())
        peer.fails = 0
        known[pid] = peer
    while len(known) > MAX_KNOWN:  # forget the longest-unseen peer that is not an initial one
        victim = next((pid for pid, p in known.items() if not p.initial), None)
        if victim is None:
            break
        known.pop(victim)
    now = time.monotonic()
    table = node.protocol.routing_table
    due = [pid for pid, p in known.items()
           if pid != me and p.addrs and p.next_try <= now and (pid not in connected or pid not in table)]  # fmt: skip
    due.sort(key=lambda pid: (not known[pid].initial, known[pid].next_try))
    results = await asyncio.gather(*(_dial(node, pid, known[pid].addrs) for pid in due[:DIALS_PER_TICK]))
    for pid, ok in zip(due, results):
        peer = known[pid]
        if ok:  # (a client-mode peer answers but never enters a routing table: pinged again only after a while)
            peer.fails, peer.next_try = 0, time.monotonic() + MAX_BACKOFF
        else:
            peer.fails += 1
            peer.next_try = time.monotonic() + min(MAX_BACKOFF, TICK * 2 ** (peer.fails - 1))


async def _dial(node, pid: PeerID, addrs: list) -> bool:
    """Connect to ``pid`` (p2pd) and ping it (both routing tables take the other in)."""
    try:
        await asyncio.wait_for(node.p2p._client.connect(pid, addrs), DIAL_TIMEOUT)
        return await asyncio.wait_for(node.protocol.call_ping(pid), DIAL_TIMEOUT) is not None
    except asyncio.CancelledError:
        raise
    except Exception:
        return False
