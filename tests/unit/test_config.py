import dataclasses

import pytest

from atlas_swarm.config import PeerConfig, RunSpec, check_same_spec, diff_specs
from atlas_swarm.errors import ConfigError, SpecError, SpecMismatch

BASE = {"name": "demo", "model": {"base": "org/model", "task": "causal-lm"}, "lora": {"target_modules": ["q_proj"]}}


def spec(**overrides) -> RunSpec:
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in BASE.items()}
    for dotted, value in overrides.items():
        section, _, key = dotted.partition("__")
        if key:
            data.setdefault(section, {})[key] = value
        else:
            data[section] = value
    return RunSpec.from_dict(data)


def test_run_id_is_stable_and_changes_with_any_hyperparameter():
    assert spec().run_id == spec().run_id
    assert spec().run_id.startswith("demo-") and len(spec().run_id) == len("demo-") + 16
    assert spec(lora__r=16).run_id != spec().run_id
    assert spec(optimizer__lr=0.002).run_id != spec().run_id


def test_canonical_bytes_round_trip():
    s = spec(averaging__compression="float16")
    assert RunSpec.from_canonical_bytes(s.canonical_bytes()) == s


def test_diff_names_each_field():
    assert diff_specs(spec(), spec(lora__r=16, optimizer__lr=0.5)) == ["lora.r", "optimizer.lr"]
    with pytest.raises(SpecMismatch) as e:
        check_same_spec(spec(lora__r=16), spec())
    assert e.value.fields == ["lora.r"] and "yours=16" in str(e.value)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"name": "Bad Name"}, "name"),
        ({"model__task": "translation"}, "model.task"),
        ({"lora__r": 0}, "lora.r"),
        ({"lora__target_modules": []}, "lora.target_modules"),
        ({"optimizer__lr": 5.0}, "optimizer.lr"),
        ({"averaging__compression": "zip"}, "averaging.compression"),
        ({"averaging__averaging_timeout": 1.0, "averaging__matchmaking_time": 2.0}, "averaging.averaging_timeout"),
        ({"model__task": "sequence-classification"}, "model.labels"),
    ],
)
def test_invalid_fields_are_named(overrides, field):
    with pytest.raises(SpecError, match=field.replace(".", r"\.")):
        spec(**overrides)


def test_wrong_types_and_unknown_fields():
    with pytest.raises(SpecError, match="lora.r"):
        spec(lora__r="8")
    with pytest.raises(SpecError, match="lora.rank"):
        spec(lora__rank=8)
    with pytest.raises(SpecError, match="Unknown run spec field 'extra'"):
        spec(extra=1)


def test_from_toml_errors(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        RunSpec.from_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = ")
    with pytest.raises(SpecError, match="not valid TOML"):
        RunSpec.from_toml(bad)


def test_shipped_demo_spec_is_valid():
    from pathlib import Path

    import atlas_swarm

    demo = RunSpec.from_toml(Path(atlas_swarm.__file__).parent / "specs" / "demo-minilm-topics.toml")
    assert demo.model.task == "sequence-classification" and len(demo.model.labels) == 20


def test_peer_config_validation():
    with pytest.raises(ConfigError, match="--run-spec"):
        PeerConfig()
    with pytest.raises(ConfigError, match="--initial-peers"):
        PeerConfig(run_id="demo-0123456789abcdef")
    with pytest.raises(ConfigError, match="not a run id"):
        PeerConfig(run_id="demo", initial_peers=("/ip4/1.2.3.4/tcp/1",))
    with pytest.raises(ConfigError, match="--device"):
        PeerConfig(run_spec="x.toml", device="tpu")
    with pytest.raises(ConfigError, match="--batch-size"):
        PeerConfig(run_spec="x.toml", batch_size=0)
    cfg = PeerConfig(run_spec="x.toml", out="o")
    assert str(cfg.identity_path) == "o/identity.key"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.out = "p"


def test_the_trainer_is_part_of_the_run_id_and_checked():
    """The chain's run id is derived from the spec's trainer: the spec must name it exactly, and the run id must
    commit to it. Specs without one keep the ids they had before the field existed."""
    assert spec().run_id == "demo-" + spec().spec_hash.hex()[:16] and "trainer" not in spec().to_dict()
    addr = "0x" + "Ab" * 20
    named = spec(trainer=addr)
    assert named.trainer == addr.lower() and named.run_id != spec().run_id
    assert spec(trainer=addr.lower()).run_id == named.run_id, "one canonical form"
    assert RunSpec.from_canonical_bytes(named.canonical_bytes()) == named
    for bad in ("0x1234", "me", 42):
        with pytest.raises(SpecError, match="trainer"):
            spec(trainer=bad)


def test_a_spec_too_large_to_publish_is_refused_when_it_is_made():
    with pytest.raises(SpecError, match="at most 8192 bytes"):
        spec(model__task="sequence-classification", model__labels=[f"label-{i}" for i in range(3000)])


def test_the_trust_section_is_part_of_the_run_id_and_checked():
    """[trust] commits the run to its admission and aggregation rule; without one a spec keeps its old run id and
    gets the robust default."""
    plain = spec()
    assert "trust" not in plain.to_dict() and plain.trust.rule == "centered_clip"
    listed = spec(trust__admission="allowlist", trust__allowlist=["Qm" + "a" * 44, "0x" + "Cd" * 20])
    assert listed.run_id != plain.run_id and listed.trust.rule == "mean"  # a private swarm trusts its peers
    assert listed.trust.allowlist[1] == "0x" + "cd" * 20  # one canonical form, one run id
    assert RunSpec.from_canonical_bytes(listed.canonical_bytes()) == listed
    assert spec(trust__aggregation="trimmed_mean").trust.rule == "trimmed_mean"


@pytest.mark.parametrize("trust, field", [
    ({"admission": "vip"}, "trust.admission"),
    ({"aggregation": "median"}, "trust.aggregation"),
    ({"admission": "allowlist"}, "trust.allowlist"),  # a private run with nobody in it
    ({"allowlist": ["Qm" + "a" * 44]}, "trust.allowlist"),  # a list in an open run means nothing
    ({"admission": "allowlist", "allowlist": ["not a peer"]}, "trust.allowlist"),
    ({"admission": "staked"}, "trust.admission"),  # staked needs a trainer (the chain's run)
    ({"trim": 0.5}, "trust.trim"),
    ({"max_samples_per_peer": -1}, "trust.max_samples_per_peer"),
])  # fmt: skip
def test_invalid_trust_fields_are_named(trust, field):
    with pytest.raises(SpecError, match=f"'{field}'"):
        spec(**{f"trust__{k}": v for k, v in trust.items()})
