"""Content-addressed storage without a daemon: folder CIDs, the embedded store, verified fetching, and the choice of
which published CID to trust. (Equality with a real IPFS daemon: tests/integration/test_cid_daemon.py.)"""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest

from atlas_swarm.checkpoints.vouch import choose, vouched
from atlas_swarm.errors import StorageError
from atlas_swarm.storage import CorruptBlock, LocalStore, cid_of_folder
from atlas_swarm.storage.cid import CHUNK
from atlas_swarm.storage.dag import first_good, parse_cid
from tests.doubles import FakeSwarm


def make_folder(root, big: int = 3 * CHUNK + 5):
    (root / "sub").mkdir(parents=True)
    (root / "weights.bin").write_bytes(os.urandom(big))
    (root / "config.json").write_text('{"r": 8}')
    (root / "sub" / "empty").write_bytes(b"")
    return root


def test_store_round_trip_gives_identical_files_and_the_folder_cid(tmp_path):
    src = make_folder(tmp_path / "adapter")
    store = LocalStore(tmp_path / "store")

    cid = store.put_folder(src)
    out = store.fetch_folder(cid, tmp_path / "out")

    assert cid == cid_of_folder(src) and cid.startswith("bafy")
    for rel in ("weights.bin", "config.json", "sub/empty"):
        assert (out / rel).read_bytes() == (src / rel).read_bytes()
    assert cid_of_folder(out) == cid


def test_folder_cid_depends_on_content_and_names_not_on_time(tmp_path):
    a = make_folder(tmp_path / "a")
    b = tmp_path / "b"
    import shutil

    shutil.copytree(a, b)
    os.utime(b / "config.json", (1, 1))
    assert cid_of_folder(a) == cid_of_folder(b)
    (b / "config.json").write_text('{"r": 9}')
    assert cid_of_folder(a) != cid_of_folder(b)


def test_a_corrupted_block_is_refused_and_nothing_is_written(tmp_path):
    store = LocalStore(tmp_path / "store")
    cid = store.put_folder(make_folder(tmp_path / "adapter"))
    victim = max((store.blocks).iterdir(), key=lambda p: p.stat().st_size)  # a 256 KiB leaf of weights.bin
    data = bytearray(victim.read_bytes())
    data[1000] ^= 0xFF
    victim.write_bytes(bytes(data))

    with pytest.raises(CorruptBlock, match=victim.name):
        store.fetch_folder(cid, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_a_substituted_block_is_refused(tmp_path):
    """A source answering a CID with another (valid) block, e.g. a peer serving a different adapter."""
    store = LocalStore(tmp_path / "store")
    cid = store.put_folder(make_folder(tmp_path / "adapter"))
    other = LocalStore(tmp_path / "other")
    other.put_folder(make_folder(tmp_path / "other-adapter"))
    theirs = other.get_blocks([parse_cid(other.put_folder(tmp_path / "other-adapter"))])
    substitute = next(iter(theirs.values()))

    def lying(cids):
        return {c: substitute for c in cids}

    with pytest.raises(CorruptBlock):
        LocalStore(tmp_path / "fresh").pin(lying, cid)


def test_a_missing_block_names_the_cid(tmp_path):
    store = LocalStore(tmp_path / "store")
    cid = store.put_folder(make_folder(tmp_path / "adapter"))
    victim = sorted(store.blocks.iterdir())[0]
    victim.unlink()
    with pytest.raises(StorageError, match="not available"):
        store.fetch_folder(cid, tmp_path / "out")


def test_first_good_skips_bad_and_failing_sources(tmp_path):
    store = LocalStore(tmp_path / "store")
    cid = store.put_folder(make_folder(tmp_path / "adapter"))

    def down(cids):
        raise StorageError("peer left")

    def corrupt(cids):
        return {c: b"garbage" for c in cids}

    fresh = LocalStore(tmp_path / "fresh")
    fresh.pin(first_good([("down", down), ("liar", corrupt), ("good", store.get_blocks)]), cid)
    assert fresh.fetch_folder(cid, tmp_path / "out").is_dir()
    with pytest.raises(CorruptBlock, match="liar"):
        LocalStore(tmp_path / "fresh2").pin(first_good([("down", down), ("liar", corrupt)]), cid)
    # nobody had it: the error says why the sources that failed did (a notebook once reported only "not available")
    with pytest.raises(StorageError, match="1 of 1 blocks are not available: peer left"):
        LocalStore(tmp_path / "fresh3").pin(first_good([("down", down), ("empty", lambda cids: {})]), cid)


def test_a_peer_that_does_not_answer_at_once_is_asked_again(monkeypatch):
    """A notebook that had just met a publisher could not reach it yet (seen once in a full run): each request is
    tried again after RETRY_PAUSES, and a peer that never answers is still reported with the reason."""
    from atlas_swarm.swarm import blocks

    monkeypatch.setattr(blocks, "RETRY_PAUSES", (0.01, 0.01))

    class Dht:
        def __init__(self, answers):
            self.answers, self.asked = list(answers), 0

        def run_coroutine(self, _coro):
            self.asked += 1
            return self.answers.pop(0)

    late = Dht([({}, "P2PDaemonError: failed to dial"), ({b"c": b"block"}, None)])
    assert blocks.blocks_from(late, "QmPeer")([b"c"]) == {b"c": b"block"} and late.asked == 2
    gone = Dht([({}, "P2PDaemonError: failed to dial")] * 3)
    with pytest.raises(StorageError, match="Peer QmPeer did not serve the blocks .P2PDaemonError: failed to dial"):
        blocks.blocks_from(gone, "QmPeer")([b"c"])
    assert gone.asked == 3
    # one that accepts the request and never answers costs REQUEST_TIMEOUT once, not three times
    stalls = Dht([({}, "TimeoutError: ")] * 3)
    with pytest.raises(StorageError, match="TimeoutError"):
        blocks.blocks_from(stalls, "QmPeer")([b"c"])
    assert stalls.asked == 1


@pytest.mark.parametrize("bad", ["", "hello", "Qm123", "bafy" + "a" * 10, "zb2rhe5P4gXftAwvA4eXQ5HJwsER2owDyS9sKaQRRVQPn93bA"])
def test_unverifiable_cids_are_refused_with_a_clear_error(bad):
    with pytest.raises(StorageError, match="not a CID"):
        parse_cid(bad)


def test_fetch_never_overwrites_a_folder(tmp_path):
    store = LocalStore(tmp_path / "store")
    cid = store.put_folder(make_folder(tmp_path / "adapter"))
    (tmp_path / "out").mkdir()
    with pytest.raises(StorageError, match="already exists"):
        store.fetch_folder(cid, tmp_path / "out")


def _pub(epoch, cid):
    return SimpleNamespace(epoch=epoch, cid=cid)


def test_choose_takes_the_newest_vouched_epoch_and_the_majority_cid():
    published = [("A", _pub(4, "bafyX")), ("B", _pub(4, "bafyX")), ("C", _pub(4, "bafyEVIL")), ("D", _pub(3, "bafyOld"))]
    reached = {"A": 5, "B": 5, "C": 5, "D": 5}
    assert choose(published, reached) == (4, "bafyX", ["A", "B"])
    assert choose(published, reached, 3) == (3, "bafyOld", ["D"])
    assert choose([("A", _pub(1, "bafyB")), ("B", _pub(1, "bafyA"))], {})[1] == "bafyA"  # tie: smallest
    with pytest.raises(StorageError, match="Nothing published for epoch 9"):
        choose(published, reached, 9)


def test_one_publisher_claiming_a_far_epoch_is_not_chosen():
    """H2: on 186506a the newest epoch any single record claimed was chosen (10**6 beat the real epoch 6)."""
    honest = [("A", _pub(6, "bafyReal")), ("B", _pub(4, "bafyOlder"))]
    reached = {"A": 7, "B": 7, "C": 7, "X": 10**6}  # X's own status claims it too: still one voice of four
    assert choose(honest + [("X", _pub(10**6, "bafyEVIL"))], reached) == (6, "bafyReal", ["A"])
    assert vouched(honest + [("X", _pub(10**6, "bafyEVIL"))], reached) == {6: "bafyReal", 4: "bafyOlder"}
    # with no live statuses (the run ended), publishers alone vouch: the final adapter, published by all, wins
    final = [(p, _pub(8, "bafyFinal")) for p in "ABC"] + [("X", _pub(10**6, "bafyEVIL"))]
    assert choose(final, {})[:2] == (8, "bafyFinal")


def test_saved_adapter_configs_are_canonical_so_equal_adapters_get_equal_cids(tmp_path):
    """PEFT writes target_modules (a set) in hash-seed order: two peers would publish one adapter under two CIDs."""
    import json

    from atlas_swarm.model.lora import _canonical_config

    for i, order in enumerate((["v_proj", "q_proj"], ["q_proj", "v_proj"])):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "adapter_config.json").write_text(json.dumps({"target_modules": order, "r": 4}))
        _canonical_config(tmp_path / str(i) / "adapter_config.json")
    assert cid_of_folder(tmp_path / "0") == cid_of_folder(tmp_path / "1")
    assert json.loads((tmp_path / "0" / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "v_proj"]


def test_a_group_whose_elected_publisher_is_behind_nat_has_a_reachable_member_publish_too(tmp_path):
    """The smallest PeerID publishes; when it is in client mode (nobody can dial it), so does the smallest reachable
    member: both hold the group's adapter, so both list the same CID and a fetcher has a publisher it can reach."""
    from atlas_swarm.checkpoints.publish import AdapterPublisher

    def publishers(group, clients):
        chosen = []
        for me in group:
            swarm = FakeSwarm()
            swarm.peer_id = me
            if AdapterPublisher(swarm, "run-0123456789abcdef", "base", tmp_path / me, None, 2).elected(group, clients):
                chosen.append(me)
        return chosen

    assert publishers(("A", "B", "C", "D"), ()) == ["A"]
    assert publishers(("A", "B", "C", "D"), ("A", "C")) == ["A", "B"]
    assert publishers(("A", "B", "C", "D"), ("A", "B")) == ["A", "C"]
    assert publishers(("A", "B", "C", "D"), ("B", "C")) == ["A"]  # the elected one is reachable: it alone
    assert publishers(("A", "B"), ("A", "B")) == ["A"]  # nobody reachable (cannot average anyway): as before


def test_publishers_that_accept_connections_are_asked_before_those_behind_nat():
    from atlas_swarm.checkpoints.vouch import reachable_first

    statuses = {"A": SimpleNamespace(client_mode=True), "B": SimpleNamespace(client_mode=False),
                "D": SimpleNamespace(client_mode=False), "E": object()}  # fmt: skip
    assert reachable_first(["A", "B", "C", "D", "E", "B"], statuses) == ["B", "D", "C", "E", "A"]
    assert reachable_first([], statuses) == []


def test_keeper_keeps_and_lists_only_what_the_run_vouches_for(tmp_path):
    from atlas_swarm.checkpoints.keeper import Keeper
    from atlas_swarm.swarm.records import PublishedAdapter

    stores = {name: LocalStore(tmp_path / name) for name in ("a", "b", "c")}
    x = stores["a"].put_folder(make_folder(tmp_path / "x"))
    stores["b"].put_folder(tmp_path / "x")
    y = stores["c"].put_folder(make_folder(tmp_path / "y"))  # c's pre-agreement adapter of the same epoch
    pub = lambda cid: PublishedAdapter(epoch=4, cid=cid, adapter_hash="h", time=1.0)  # noqa: E731
    swarm = FakeSwarm(publications=[], stores=stores)
    keeper = Keeper(swarm, tmp_path / "kept", lambda: ["run"])

    keeper.keep_new()  # first sight of the run: an empty keeper record, stored before going on
    swarm.publications = [("a", pub(x)), ("b", pub(x)), ("c", pub(y))]
    keeper.keep_new()
    keeper.keep_new()  # nothing changed: nothing republished

    assert swarm.records == [([], True, True), ([x], False, True)]
    assert set(keeper.kept["run"]) == {x}, "the majority's copy, verified; a lone publisher's other CID is not kept"
    assert LocalStore(tmp_path / "kept").fetch_folder(x, tmp_path / "out").is_dir()


def test_keeper_stays_within_its_quota_and_a_failing_cid_blocks_nothing(tmp_path):
    """H3/M2: a bootstrap keeper pinned every CID any announced run listed, and retried a bad one first forever."""
    from atlas_swarm.checkpoints.keeper import Keeper
    from atlas_swarm.swarm.records import PublishedAdapter

    stores = {"a": LocalStore(tmp_path / "a"), "gone": LocalStore(tmp_path / "gone")}
    old = stores["a"].put_folder(make_folder(tmp_path / "old"))
    new = stores["gone"].put_folder(make_folder(tmp_path / "new"))  # random weights: another CID
    for block in (tmp_path / "gone" / "blocks").iterdir():
        block.unlink()  # its publisher lost it: every fetch of it fails
    pub = lambda epoch, cid: PublishedAdapter(epoch=epoch, cid=cid, adapter_hash="h", time=1.0)  # noqa: E731
    swarm = FakeSwarm(publications=[("a", pub(2, old)), ("a", pub(4, new)), ("gone", pub(4, new))], stores=stores)
    keeper = Keeper(swarm, tmp_path / "kept", lambda: ["run"], every=60.0)
    keeper.keep_new()
    assert set(keeper.kept["run"]) == {old}, "the failing newer CID did not stop the older one"
    assert new in keeper.errors and keeper._retry[new][1] > time.monotonic() + 60, "tried again only after a backoff"

    tight = Keeper(FakeSwarm(publications=[("a", pub(2, old))], stores=stores), tmp_path / "tight", lambda: ["run"], run_quota=100)
    tight.keep_new()
    assert not tight.kept["run"] and "over 100 bytes" in tight.errors[old], "the quota bounds what it stores"
