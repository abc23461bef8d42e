"""Property-based tests of the parsers of network bytes: random and adversarial input gives an atlas error or a valid
object, never another exception, within bounded time. (The DAG parser's properties are in test_dag_bounds.py.)"""

from __future__ import annotations

import json
import math
import time

import msgpack
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atlas_swarm.config import MAX_SPEC_BYTES, RunSpec
from atlas_swarm.errors import SpecError
from atlas_swarm.swarm.node import RunSchemaValidator
from atlas_swarm.swarm.records import (
    CoSignatures,
    PeerStatus,
    PublishedAdapters,
    RunAnnouncement,
    RunRecords,
    WalletBinding,
)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=30,
)
SPEC = {"name": "demo", "model": {"base": "org/model", "task": "causal-lm"}, "lora": {"target_modules": ["q_proj"]}}
spec_like = st.fixed_dictionaries({}, optional={
    "name": st.text(max_size=50) | json_values, "seed": json_values, "trainer": st.text(max_size=50) | json_values,
    "model": st.fixed_dictionaries({}, optional={"base": json_values, "task": st.sampled_from(["causal-lm", "x"]) |
                                                 json_values, "labels": json_values, "max_length": json_values}),
    "lora": st.fixed_dictionaries({}, optional={"r": json_values, "alpha": json_values, "dropout": json_values,
                                                "target_modules": json_values}),
    "optimizer": json_values, "averaging": json_values,
})  # fmt: skip


def parse_spec(raw: bytes):
    t0 = time.perf_counter()
    try:
        spec = RunSpec.from_canonical_bytes(raw)
    except SpecError:
        spec = None
    assert time.perf_counter() - t0 < 1.0, "bounded time"
    return spec


@SETTINGS
@given(st.binary(max_size=4096))
def test_random_bytes_are_a_spec_error_or_a_spec(raw):
    spec = parse_spec(raw)
    assert spec is None or isinstance(spec, RunSpec)


@SETTINGS
@given(spec_like)
def test_spec_shaped_json_is_a_spec_error_or_a_valid_spec(data):
    spec = parse_spec(json.dumps(data).encode())
    if spec is not None:  # a valid spec round-trips exactly
        assert RunSpec.from_canonical_bytes(spec.canonical_bytes()) == spec


@SETTINGS
@given(st.integers(1, 200_000), st.sampled_from([b"[", b"{", b'{"a":', b'[{"a":']))
def test_deep_or_huge_nesting_is_refused_before_parsing(n, opener):
    assert parse_spec(opener * n) is None


def test_a_real_spec_still_parses_and_huge_ones_are_refused():
    raw = RunSpec.from_dict(SPEC).canonical_bytes()
    assert parse_spec(raw) == RunSpec.from_dict(SPEC)
    assert parse_spec(raw[:-1] + b"," + b'"x":"' + b"a" * MAX_SPEC_BYTES + b'"}') is None


# -- DHT records: what hivemind's SchemaValidator (ours merges it once per schema) accepts from the network ----------
VALIDATOR = RunSchemaValidator(RunRecords, prefix="tiny-test-0123456789abcdef")
OWNER = RSASignatureValidator(RSAPrivateKey()).local_public_key
FIELDS = {"peers": PeerStatus, "wallets": WalletBinding, "adapters": PublishedAdapters, "cosigned": CoSignatures}
msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=30) |
    st.binary(max_size=30),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=20), inner, max_size=8),
    max_leaves=40,
)  # fmt: skip


def record(field: str, value) -> DHTRecord:
    key = DHTID.generate(source=f"tiny-test-0123456789abcdef_{field}").to_bytes()
    return DHTRecord(key=key, subkey=DHTProtocol.serializer.dumps(OWNER), value=DHTProtocol.serializer.dumps(value),
                     expiration_time=get_dht_time() + 10)  # fmt: skip


def finite_everywhere(obj) -> bool:
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(finite_everywhere(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(finite_everywhere(v) for v in obj)
    return True


@SETTINGS
@given(st.sampled_from(sorted(FIELDS)), msgpack_values | st.dictionaries(st.sampled_from(
    sorted(set(PeerStatus.__fields__) | set(PublishedAdapters.__fields__) | {"adapters", "address", "signature"}
           | {"signatures", "kind", "digest", "cid"})),
    msgpack_values, max_size=20))  # fmt: skip
def test_a_record_value_is_refused_or_small_finite_and_well_typed(field, value):
    try:
        ok = VALIDATOR.validate(record(field, value))
    except (ValueError, TypeError, msgpack.exceptions.ExtraData) as e:  # hivemind's own refusal of odd bytes
        ok = False, e
    if ok is True and value is not None:  # None: a peer withdrawing its record (Optional in the schema)
        parsed = FIELDS[field].parse_obj(value)
        assert finite_everywhere(parsed.dict()), "no NaN/inf gets past a schema"
        assert len(msgpack.packb(parsed.dict(), use_bin_type=True)) < 64 * 1024, "small"


@SETTINGS
@given(st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(2**63), 2**64 - 1))  # what msgpack carries
def test_status_floats_must_be_finite(x):
    status = dict(peer_id="Qm", device="cpu", precision="fp32", client_mode=False, adapter_shapes="x", epoch=0,
                  samples_total=0, samples_per_second=x, loss=x, time=0.0)  # fmt: skip
    full = PeerStatus(**dict(status, samples_per_second=0.0, loss=None)).dict()
    accepted = VALIDATOR.validate(record("peers", dict(full, samples_per_second=x, loss=x)))
    assert accepted == (isinstance(x, float) and math.isfinite(x) and x >= 0)


@SETTINGS
@given(st.lists(st.fixed_dictionaries({"kind": st.sampled_from(["receipt", "vote", "proof", ""]),
                                       "epoch": st.integers(-1, 2**41), "digest": st.binary(max_size=40),
                                       "signature": st.binary(max_size=70)}), max_size=20))  # fmt: skip
def test_co_signatures_are_refused_or_bounded_and_well_formed(entries):
    """A groupmate's receipt signatures and votes (what a peer's poster reads): any shape is refused or bounded."""
    value = {"peer_id": "Qm", "signatures": entries}
    ok = VALIDATOR.validate(record("cosigned", value))
    well_formed = len(entries) <= 16 and all(
        e["kind"] in ("receipt", "vote") and 0 <= e["epoch"] <= 2**40 and len(e["digest"]) == 32
        and len(e["signature"]) == 65 for e in entries)  # fmt: skip
    assert ok is well_formed


def test_an_announcement_is_bounded():
    ok = RunAnnouncement(run_id="r" * 128, peer_id="Qm", time=0.0)
    assert ok.run_id
    for bad in (dict(run_id="r" * 129, peer_id="Qm", time=0.0), dict(run_id="r", peer_id="Qm", time=float("nan"))):
        try:
            RunAnnouncement(**bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad}")


def test_validators_stay_one_schema_per_class_however_many_runs_are_watched():
    """M3: hivemind's merge appended the run schema again for every run a node ever read (a monitor under a flood
    of announcements checked each record against thousands of copies)."""
    from hivemind.dht.schema import SchemaValidator

    ours, theirs = RunSchemaValidator(RunRecords, prefix="r0"), SchemaValidator(RunRecords, prefix="r0")
    for i in range(1, 300):
        ours.merge_with(RunSchemaValidator(RunRecords, prefix=f"r{i}"))
        theirs.merge_with(SchemaValidator(RunRecords, prefix=f"r{i}"))
    assert len(ours._schemas) == 1 and len(theirs._schemas) == 300
    assert len(ours._key_id_to_field_name) == 300 * len(RunRecords.__fields__)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_base58_and_protobuf_round_trip_and_refuse_junk(raw):
    """encoding.py parses what peers send (PeerIDs, key files, dag-pb blocks): exact round trips, ValueError else."""
    from atlas_swarm.encoding import b58decode, b58encode, pb_bytes, pb_fields, pb_uint

    assert b58decode(b58encode(raw)) == raw
    assert list(pb_fields(pb_uint(1, len(raw)) + pb_bytes(2, raw))) == [(1, len(raw)), (2, raw)]
    try:
        list(pb_fields(raw))  # junk: fields, or a ValueError, never anything else
    except ValueError:
        pass
