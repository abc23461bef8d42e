"""Test doubles for the layer above the one under test (the real layers are tested against real processes), and
small builders the unit tests share."""

from __future__ import annotations


class Events:
    """A Reporter that records what it is told: (kind, fields) pairs."""

    def __init__(self):
        self.seen: list[tuple[str, dict]] = []

    def event(self, kind, text="", **fields):
        self.seen.append((kind, fields))

    def kinds(self) -> list[str]:
        return [k for k, _ in self.seen]


class FakeSwarm:
    """Swarm's public methods over in-memory tables, for the layer above (monitor, keeper, publisher). The real
    Swarm is tested against real DHT processes (tests/integration)."""

    peer_id = "QmFake"

    def __init__(self, runs=(), statuses=None, progress=None, publications=(), stores=None, spec_error=None):
        self.runs = set(runs)  # announced run ids
        self.statuses = statuses or {}  # peer id -> PeerStatus (every run)
        self.progress = progress or []  # hivemind's progress records (every run)
        self.publications = list(publications)  # (publisher peer id, PublishedAdapter)
        self.stores = stores or {}  # peer id -> store serving its blocks
        self.spec_error = spec_error
        self.records, self.forgotten, self.served = [], set(), []

    def is_alive(self) -> bool:
        return True

    def announcers(self) -> dict:
        return {r: 1 for r in self.runs}

    def forget_run(self, run_id):
        self.forgotten.add(run_id)

    def fetch_spec(self, run_id, timeout):
        from atlas_swarm.errors import RunNotFound

        raise self.spec_error or RunNotFound(run_id)

    def peer_statuses(self, run_id):
        return dict(self.statuses)

    def training_progress(self, run_id):
        return list(self.progress)

    def rejected_records(self):
        return {}

    def serve_blocks(self, get_blocks):
        self.served.append(get_blocks)

    def published_adapters(self, run_id):
        return self.publications

    def adapter_records(self, run_id):
        return []

    def blocks_from(self, pid):
        return self.stores[pid].get_blocks

    def publish_adapters(self, run_id, adapters, wait=True, keeper=False):
        self.records.append(([a.cid for a in adapters], wait, keeper))
