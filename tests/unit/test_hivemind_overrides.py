"""Every hivemind method we override is listed in swarm/__init__.py, still exists on its hivemind base class, and
takes what hivemind passes it: a hivemind upgrade that renames or re-signs one fails here, not in a swarm."""

import asyncio
import concurrent.futures
import importlib
import inspect
import logging

import pytest

from atlas_swarm.swarm import HIVEMIND_INTERNALS, HIVEMIND_OVERRIDES

MODULES = ["optimizer", "averagers", "downloads", "gather", "codec", "node", "audit", "records", "blocks", "tasks"]


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


def test_the_tracker_hands_hivemind_records_its_model_accepts_with_a_fast_peer_capped():
    """ThrottledTracker's records go through hivemind's own parser (its pydantic model forbids unknown fields: a
    field of ours left in a record once stopped every peer's progress fetcher, and each trained alone), and a fast
    peer in a first epoch counts its constant cap however stale the reader's copy."""
    import threading
    from types import SimpleNamespace

    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.dht.schema import SchemaValidator
    from hivemind.optim.progress_tracker import LocalTrainingProgress, ProgressTracker, TrainingProgressSchema
    from hivemind.utils.crypto import RSAPrivateKey
    from hivemind.utils.performance_ema import PerformanceEMA
    from hivemind.utils.timed_storage import get_dht_time

    from atlas_swarm.swarm.node import peer_id_of_owner
    from atlas_swarm.swarm.optimizer import ThrottledTracker

    SchemaValidator(TrainingProgressSchema, prefix="t")  # as each peer's tracker does: it sets extra=forbid
    keys = [RSASignatureValidator(RSAPrivateKey()).local_public_key for _ in range(3)]
    fast, *slow = keys
    tracker = ThrottledTracker.__new__(ThrottledTracker)  # no DHT: only the parsing is under test
    threading.Thread.__init__(tracker, daemon=True)
    defaults = {k: v.default for k, v in inspect.signature(ProgressTracker.__init__).parameters.items()
                if v.default is not inspect.Parameter.empty}  # fmt: skip
    vars(tracker).update(gate=None, own_peer_id=peer_id_of_owner(fast), sample_cap=float("inf"), target_batch_size=1440,
                         ignored_writers=set(), prefix="t", status_loglevel=logging.DEBUG,
                         performance_ema=PerformanceEMA(alpha=0.1), **{k: defaults[k] for k in (
                             "min_refresh_period", "max_refresh_period", "default_refresh_period",
                             "expected_drift_peers", "expected_drift_rate")})  # fmt: skip
    tracker.local_progress = LocalTrainingProgress(peer_id=b"x", epoch=0, samples_accumulated=0, samples_per_second=1.0,
                                                   time=0.0, client_mode=False)  # fmt: skip

    def record(key, samples, rate, t):
        return SimpleNamespace(value=dict(peer_id=b"x", epoch=0, samples_accumulated=samples, samples_per_second=rate,
                                          time=t, client_mode=False))  # fmt: skip

    def estimate(fast_age):  # the fast peer (this one) has trained 8 s, the others' copies are from 2.3 s
        now = get_dht_time()
        metadata = {fast: record(fast, int(450 * (8 - fast_age)), 450.0, now - fast_age),
                    slow[0]: record(slow[0], 128, 56.0, now - 5.7), slow[1]: record(slow[1], 138, 60.0, now - 5.7)}
        progress = tracker._parse_swarm_progress_data(metadata)
        assert progress.num_peers == 3 and progress.samples_accumulated == 2 * 138 + 128 + 138
        return progress.eta_next_epoch - now

    assert estimate(0.0) == pytest.approx(estimate(2.0), abs=1e-3)
