"""swarm/heal.py's bookkeeping with a stand-in node (its dials and pings are what the network tests exercise for
real, tests/integration/test_network.py): who is re-dialled, how often, and that memory and dials stay bounded."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from hivemind.p2p import PeerID

from atlas_swarm.identity import Identity
from atlas_swarm.swarm import heal


class FakeNode:
    def __init__(self, me: PeerID):
        self.peer_id = me
        self.connected: dict[PeerID, list] = {}
        self.reachable: set[PeerID] = set()
        self.dialled: list[PeerID] = []
        self.protocol = SimpleNamespace(routing_table=set(), call_ping=self._ping)
        self.p2p = SimpleNamespace(list_peers=self._list, _client=SimpleNamespace(connect=self._connect))

    async def _list(self):
        return [SimpleNamespace(peer_id=p, addrs=a) for p, a in self.connected.items()]

    async def _connect(self, pid, addrs):
        self.dialled.append(pid)
        if pid not in self.reachable:
            raise ConnectionError("unreachable")

    async def _ping(self, pid):
        return "node-id" if pid in self.reachable else None


def ids(tmp_path, n):
    return [PeerID.from_base58(Identity.load_or_create(tmp_path / f"{i}.key").peer_id) for i in range(n)]


def tick(node, known):
    asyncio.run(heal._tick(node, node.peer_id, known))


def test_lost_peers_are_redialled_with_a_bounded_backoff_and_found_again(tmp_path, monkeypatch):
    me, a, b = ids(tmp_path, 3)
    node, known = FakeNode(me), heal.OrderedDict()
    clock = [1000.0]
    monkeypatch.setattr(heal.time, "monotonic", lambda: clock[0])
    node.connected = {a: ["/ip4/10.0.0.2/tcp/1"], b: ["/ip4/10.0.0.3/tcp/1"]}
    node.protocol.routing_table = {a, b}
    tick(node, known)
    assert node.dialled == [] and list(known) == [a, b], "connected and in the table: nothing to do"

    node.connected, node.protocol.routing_table = {}, set()  # a split: both gone
    tries = []
    for _ in range(12):  # 12 ticks of 3 s: tries at growing intervals, never more than MAX_BACKOFF apart
        node.dialled.clear()
        tick(node, known)
        if a in node.dialled:
            tries.append(clock[0])
        clock[0] += heal.TICK
    gaps = [t2 - t1 for t1, t2 in zip(tries, tries[1:])]
    assert len(tries) >= 4 and max(gaps) <= heal.MAX_BACKOFF + heal.TICK and gaps[-1] > gaps[0], tries

    node.reachable = {a, b}  # healed: found again within MAX_BACKOFF + a tick
    healed_at, found = clock[0], None
    while found is None and clock[0] - healed_at <= heal.MAX_BACKOFF + heal.TICK:
        node.dialled.clear()
        tick(node, known)
        found = clock[0] if {a, b} <= set(node.dialled) else None
        clock[0] += heal.TICK
    assert found is not None, "not re-dialled within MAX_BACKOFF + a tick of the heal"


def test_memory_and_dials_per_tick_stay_bounded_and_initial_peers_are_kept(tmp_path, monkeypatch):
    me, first, *others = ids(tmp_path, heal.MAX_KNOWN + 12)
    node, clock = FakeNode(me), [1000.0]
    monkeypatch.setattr(heal.time, "monotonic", lambda: clock[0])
    known = heal.OrderedDict({first: heal._Peer(["/ip4/10.0.0.9/tcp/1"], initial=True)})
    node.connected = {p: [f"/ip4/10.1.0.{i % 250}/tcp/1"] for i, p in enumerate(others)}
    tick(node, known)
    assert len(known) == heal.MAX_KNOWN and first in known, "bounded, and the initial peer is never forgotten"
    node.connected = {}
    clock[0] += heal.MAX_BACKOFF  # the initial peer's failed dial of the first tick is due again
    node.dialled.clear()
    tick(node, known)
    assert len(node.dialled) == heal.DIALS_PER_TICK and first in node.dialled, "initial peers first, 8 at most"


def test_the_loop_ends_cleanly_when_stopped_between_ticks_and_mid_dial(tmp_path):
    me, a = ids(tmp_path, 2)
    initial = [f"/ip4/10.0.0.9/tcp/1/p2p/{a.to_base58()}"]

    async def stopped_after(node, seconds: float):
        """Stop the loop ``seconds`` after its first dial (waited for, up to 10 s: a fixed 0.3 s from the start was
        once too short in a loaded run, the dial not yet made)."""
        task = asyncio.create_task(heal.heal_forever(None, node, initial, tick=0.05))
        deadline = asyncio.get_running_loop().time() + 10
        while not node.dialled and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(seconds)
        began = asyncio.get_running_loop().time()
        await heal.stop_healing(None, node)
        return task, asyncio.get_running_loop().time() - began

    idle = FakeNode(me)  # between ticks (each tick's dial fails at once)
    task, took = asyncio.run(stopped_after(idle, 0.12))
    assert task.done() and not task.cancelled() and task.exception() is None and took < 0.2
    assert a in idle.dialled, "the loop was running"

    hanging = FakeNode(me)  # a dial that never answers: the tick is cut short, the loop still ends without an error

    async def never(pid, addrs):
        hanging.dialled.append(pid)
        await asyncio.sleep(3600)

    hanging.p2p._client.connect = never
    task, took = asyncio.run(stopped_after(hanging, 0.12))
    assert task.done() and not task.cancelled() and task.exception() is None and took < 1.5
    assert hanging.dialled == [a]
