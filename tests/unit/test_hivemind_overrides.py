"""Every hivemind method we override is listed in swarm/__init__.py, still exists on its hivemind base class, and
takes what hivemind passes it: a hivemind upgrade that renames or re-signs one fails here, not in a swarm."""

import asyncio
import concurrent.futures
import importlib
import inspect
import logging
from types import SimpleNamespace

import pytest

from atlas_swarm.swarm import HIVEMIND_INTERNALS, HIVEMIND_OVERRIDES

MODULES = ["optimizer", "tracker", "averagers", "downloads", "gather", "codec", "node", "audit", "records", "blocks",
           "tasks"]


def _hivemind_bases(cls):
    return [c for c in cls.__mro__ if c.__module__.split(".")[0] == "hivemind"]


def _ours(key):
    module, cls_name, name = key.split(".")
    cls = getattr(importlib.import_module(f"atlas_swarm.swarm.{module}"), cls_name)
    return cls, name


def _users(cls):
    """Classes of ours that have ``cls`` in their MRO with hivemind below it (a mixin reaches hivemind in them)."""
    for module in MODULES:
        for c in vars(importlib.import_module(f"atlas_swarm.swarm.{module}")).values():
            if inspect.isclass(c) and cls in c.__mro__ and _hivemind_bases(c):
                yield c


def _base_attr(cls, name):
    for user in _users(cls):
        for base in _hivemind_bases(user):
            if name in base.__dict__:
                return base, base.__dict__[name]
    return None, None


@pytest.mark.parametrize("key", sorted(HIVEMIND_OVERRIDES))
def test_each_override_still_exists_with_a_compatible_signature(key):
    cls, name = _ours(key)
    ours = cls.__dict__[name]
    base, theirs = _base_attr(cls, name)
    assert base is not None, f"{key}: hivemind no longer has {name!r}"
    if isinstance(theirs, property) or isinstance(ours, property):
        assert isinstance(theirs, property) and isinstance(ours, property), f"{key}: property vs method"
        return
    ours_sig, theirs_sig = inspect.signature(ours), inspect.signature(theirs)
    ours_params = ours_sig.parameters
    var_kw = any(p.kind is p.VAR_KEYWORD for p in ours_params.values())
    var_pos = any(p.kind is p.VAR_POSITIONAL for p in ours_params.values())
    for p in theirs_sig.parameters.values():  # everything hivemind may pass, ours takes
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        assert p.name in ours_params or var_kw or (var_pos and p.kind is p.POSITIONAL_ONLY), \
            f"{key}: hivemind's {base.__name__}.{name}{theirs_sig} passes {p.name!r}; ours is {name}{ours_sig}"
    for p in ours_params.values():  # and ours needs nothing hivemind does not pass
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            assert p.name in theirs_sig.parameters, f"{key}: ours requires {p.name!r}, which hivemind never passes"


def test_no_override_is_missing_from_the_register():
    found = set()
    for module in MODULES:
        mod = importlib.import_module(f"atlas_swarm.swarm.{module}")
        for cls in vars(mod).values():
            if not inspect.isclass(cls) or cls.__module__ != mod.__name__ or not list(_users(cls)):
                continue
            for name in cls.__dict__:
                if (name.startswith("__") and name != "__init__") or name == "_abc_impl":
                    continue
                if _base_attr(cls, name)[0] is not None:
                    found.add(f"{module}.{cls.__name__}.{name}")
    assert found == set(HIVEMIND_OVERRIDES), (sorted(found - set(HIVEMIND_OVERRIDES)),
                                              sorted(set(HIVEMIND_OVERRIDES) - found))


@pytest.mark.parametrize("qualname", sorted(HIVEMIND_INTERNALS))
def test_the_internals_we_touch_are_still_there(qualname):
    module, name = qualname.rsplit(".", 1)
    source = inspect.getsource(getattr(importlib.import_module(module), name))
    missing = [a for a in HIVEMIND_INTERNALS[qualname] if f".{a}" not in source and f"def {a}" not in source
               and f" {a}()" not in source]  # an attribute, a method, or a module function it calls
    assert not missing, f"{qualname} no longer has {missing}"


@pytest.mark.parametrize("error, shown", [
    (concurrent.futures.InvalidStateError("Can't set_result to a future that is CANCELLED"), False),  # Ctrl-C
    (asyncio.TimeoutError(), False),  # a round that outlived its allreduce_timeout
    (ConnectionResetError("Connection lost"), False),  # a leader SIGKILLed while we asked to join it
    (RuntimeError("fault: this round breaks after its group formed"), True),  # anything else: one line, shown
])  # fmt: skip
def test_a_round_that_failed_after_its_step_has_the_outcome_is_not_a_traceback(error, shown, caplog):
    """hivemind's _step gives the StepControl every exception it does not catch, then re-raises it from a task nobody
    awaits: asyncio printed "Task exception was never retrieved" and a traceback on the peer's terminal (Ctrl-C as a
    round ends, a leader killed mid-join: full-suite runs). Ours ends such a round with at most one log line; an
    exception the step does not hold still raises."""
    from atlas_swarm.swarm.gather import GatherAverage

    class Hivemind:
        async def _step(self, *, step, **kwargs):
            raise error

    class Averager(GatherAverage, Hivemind):
        pass

    class Step:
        def __init__(self, done):
            self._done = done

        def done(self):
            return self._done

    with caplog.at_level(logging.DEBUG, logger="hivemind.averaging.averager"):
        assert asyncio.run(Averager()._step(step=Step(True))) is None
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == ([f"An averaging round failed: {error!r}"] if shown else [])
    assert not any(r.exc_info for r in caplog.records)
    with pytest.raises(type(error)):
        asyncio.run(Averager()._step(step=Step(False)))


def _parsing_tracker(own_key, **refresh):
    """A ThrottledTracker without a DHT or a thread: only its parsing of fetched records is under test."""
    import threading

    from hivemind.dht.schema import SchemaValidator
    from hivemind.optim.progress_tracker import LocalTrainingProgress, ProgressTracker, TrainingProgressSchema
    from hivemind.utils.performance_ema import PerformanceEMA

    from atlas_swarm.swarm.node import peer_id_of_owner
    from atlas_swarm.swarm.tracker import ThrottledTracker

    SchemaValidator(TrainingProgressSchema, prefix="t")  # as each peer's tracker does: it sets extra=forbid
    tracker = ThrottledTracker.__new__(ThrottledTracker)
    threading.Thread.__init__(tracker, daemon=True)
    defaults = {k: v.default for k, v in inspect.signature(ProgressTracker.__init__).parameters.items()
                if v.default is not inspect.Parameter.empty}  # fmt: skip
    vars(tracker).update(gate=None, own_peer_id=peer_id_of_owner(own_key), sample_cap=float("inf"),
                         target_batch_size=1440, ignored_writers=set(), prefix="t", status_loglevel=logging.DEBUG,
                         performance_ema=PerformanceEMA(alpha=0.1), **{k: defaults[k] for k in (
                             "min_refresh_period", "max_refresh_period", "default_refresh_period",
                             "expected_drift_peers", "expected_drift_rate")})  # fmt: skip
    vars(tracker).update(refresh)
    tracker.local_progress = LocalTrainingProgress(peer_id=b"x", epoch=0, samples_accumulated=0, samples_per_second=1.0,
                                                   time=0.0, client_mode=False)  # fmt: skip
    return tracker


def _record(samples, rate, t, epoch=0):
    return SimpleNamespace(value=dict(peer_id=b"x", epoch=epoch, samples_accumulated=samples, samples_per_second=rate,
                                      time=t, client_mode=False))  # fmt: skip


def test_the_tracker_hands_hivemind_records_its_model_accepts_with_a_fast_peer_capped():
    """ThrottledTracker's records go through hivemind's own parser (its pydantic model forbids unknown fields: a
    field of ours left in a record once stopped every peer's progress fetcher, and each trained alone), and a fast
    peer in a first epoch counts its constant cap however stale the reader's copy."""
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.utils.crypto import RSAPrivateKey
    from hivemind.utils.timed_storage import get_dht_time

    keys = [RSASignatureValidator(RSAPrivateKey()).local_public_key for _ in range(3)]
    fast, *slow = keys
    tracker = _parsing_tracker(fast)

    def estimate(fast_age):  # the fast peer (this one) has trained 8 s, the others' copies are from 2.3 s
        now = get_dht_time()
        metadata = {fast: _record(int(450 * (8 - fast_age)), 450.0, now - fast_age),
                    slow[0]: _record(128, 56.0, now - 5.7), slow[1]: _record(138, 60.0, now - 5.7)}
        progress = tracker._parse_swarm_progress_data(metadata)
        assert progress.num_peers == 3 and progress.samples_accumulated == 2 * 138 + 128 + 138
        return progress.eta_next_epoch - now

    assert estimate(0.0) == pytest.approx(estimate(2.0), abs=1e-3)


def test_the_tracker_fetches_again_soon_while_a_peer_whose_status_it_read_has_no_record_read():
    """A tracker that read only its own record (the others' not yet stored, or not found) while the statuses list
    peers at its epoch (or read the others' and not its own) fetches again in refetch_unread (0.5 s), not in the up
    to 2 s hivemind sets from the records it read: at the start of a run one tracker read only its own record for
    2-4 s, counted the epoch as a lone peer's and fell out of step with the others (README, Known limits)."""
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.utils.crypto import RSAPrivateKey
    from hivemind.utils.timed_storage import get_dht_time

    from atlas_swarm.swarm.node import peer_id_of_owner

    own, other, old = [RSASignatureValidator(RSAPrivateKey()).local_public_key for _ in range(3)]
    tracker = _parsing_tracker(own, max_refresh_period=2.0, min_refresh_period=0.2, default_refresh_period=1.0)
    tracker.local_progress = tracker.local_progress.copy(update={"epoch": 3})

    def next_fetch(metadata, statuses):
        tracker.status_epochs = {peer_id_of_owner(k): e for k, e in statuses.items()}
        now = get_dht_time()
        return tracker._parse_swarm_progress_data(metadata).next_fetch_time - now

    alone = {own: _record(40, 100.0, get_dht_time(), epoch=3)}  # 1,400 samples to go at 100/s: hivemind waits 2 s
    assert next_fetch(alone, {}) == pytest.approx(2.0, abs=0.05)
    assert next_fetch(alone, {own: 3, old: 1}) == pytest.approx(2.0, abs=0.05)  # a status behind: a syncing newcomer
    assert next_fetch(alone, {own: 3, other: 3}) == pytest.approx(tracker.refetch_unread, abs=0.05)
    assert next_fetch(alone, {other: 4}) == pytest.approx(tracker.refetch_unread, abs=0.05)
    assert next_fetch(None, {other: 3}) == pytest.approx(tracker.refetch_unread, abs=0.05)  # no record read at all
    both = {**alone, other: _record(40, 100.0, get_dht_time(), epoch=3)}
    assert next_fetch(both, {own: 3, other: 3}) > 1.0  # both read: hivemind's own schedule
    assert next_fetch({other: both[other]}, {own: 3, other: 3}) == pytest.approx(tracker.refetch_unread, abs=0.05)
    tracker.gate = SimpleNamespace(admits=lambda pid: pid != peer_id_of_owner(other), set_followed=lambda _: None)
    assert next_fetch(alone, {other: 3}) == pytest.approx(2.0, abs=0.05)  # a stranger's status: no faster fetches
    tracker.gate = None

    # statuses read while the fetcher sleeps (the peer's wait for company ends) wake it to fetch sooner
    import threading

    tracker.status_epochs, tracker.global_state_updated = {}, threading.Event()
    tracker.global_progress = tracker._parse_swarm_progress_data(alone)
    tracker.note_statuses({peer_id_of_owner(own): 3})
    assert not tracker.global_state_updated.is_set()
    assert tracker.global_progress.next_fetch_time - get_dht_time() == pytest.approx(2.0, abs=0.05)
    tracker.note_statuses({peer_id_of_owner(own): 3, peer_id_of_owner(other): 3})
    assert tracker.global_state_updated.is_set()
    assert tracker.global_progress.next_fetch_time - get_dht_time() == pytest.approx(tracker.refetch_unread, abs=0.05)
