"""Frozen, validated configs: the run spec every peer of a run shares, and one peer's own settings.

A ``RunSpec`` is what makes two peers "the same run": its canonical JSON is hashed into the run id, so peers that
disagree on any hyperparameter can never meet in the same averaging group by accident.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from atlas_swarm.errors import ConfigError, SpecError, SpecMismatch

TASKS = ("causal-lm", "sequence-classification")
OPTIMIZERS = ("adamw", "sgd")
COMPRESSIONS = ("none", "float16", "scaled-float16", "uniform8bit", "blockwise4bit")
ADMISSIONS = ("open", "allowlist", "staked")
AGGREGATIONS = ("mean", "centered_clip", "trimmed_mean")  # train/aggregate.py
_PEER_ID_RE = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{40,60}$")  # base58 (RSA PeerIDs are 46 characters)
DEVICES = ("auto", "cpu", "cuda", "mps")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
_RUN_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}-[0-9a-f]{16}$")
_ADDRESS_RE = re.compile(r"^0x[0-9a-fA-F]{40}$")
MAX_SPEC_BYTES = 8 * 1024  # a real spec is well under 1 KiB; a DHT record holds 8 KiB (swarm/records.py)
MAX_SPEC_DEPTH = 4  # {section: {field: [items]}} is 3 levels


@dataclass(frozen=True)
class ModelSpec:
    base: str  # a hub name ("org/model") or a local folder; each peer may point to its own copy (--base-model)
    task: str
    labels: tuple[str, ...] = ()  # sequence-classification only: the label set, in index order
    max_length: int = 128


@dataclass(frozen=True)
class LoraSpec:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()
    modules_to_save: tuple[str, ...] = ()


@dataclass(frozen=True)
class OptimizerSpec:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0


@dataclass(frozen=True)
class AveragingSpec:
    target_batch_size: int = 256  # samples the whole swarm accumulates per epoch (one optimizer step)
    matchmaking_time: float = 3.0  # seconds peers spend forming a group (while the epoch runs; see swarm/optimizer.py)
    averaging_timeout: float = 30.0  # give up on a round after this long and proceed with local gradients
    average_state_every: int = 4  # also average the parameters every N epochs (repairs drift)
    compression: str = "none"


@dataclass(frozen=True)
class TrustSpec:
    """Who may train in the run and how a group's updates are combined (README "Threat model")."""

    admission: str = "open"  # open: anyone; allowlist: the peers below; staked: bound on chain with >= minStake
    allowlist: tuple[str, ...] = ()  # PeerIDs, or wallet addresses (0x...) whose signed binding names the PeerID
    aggregation: str = ""  # mean | centered_clip | trimmed_mean; "" = centered_clip (mean in an allowlist run)
    clip_tau: float = 0.0  # centered_clip's radius; 0 = the median distance of the group's updates from its median
    trim: float = 0.4  # trimmed_mean drops ceil(trim * n) values at each end of every coordinate (n=4: 1, n=8: 3)
    max_samples_per_peer: int = 0  # the most samples one peer's update weighs in a round; 0 = target_batch_size

    @property
    def rule(self) -> str:
        """The aggregation rule in force."""
        return self.aggregation or ("mean" if self.admission == "allowlist" else "centered_clip")


@dataclass(frozen=True)
class RunSpec:
    name: str
    model: ModelSpec
    lora: LoraSpec = field(default_factory=LoraSpec)
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    averaging: AveragingSpec = field(default_factory=AveragingSpec)
    trust: TrustSpec = field(default_factory=TrustSpec)  # left out of the canonical JSON when all defaults
    seed: int = 0  # seeds adapter initialisation, so every peer starts from identical parameters
    # The address that opens (and alone can close) the run on a staking contract. The run id commits to it, and the
    # chain's run id is derived from it, so nobody can squat the run or pocket money sent to it. "" = no chain run.
    trainer: str = ""

    def __post_init__(self):
        _check(_NAME_RE.match(self.name), "name", self.name, "lowercase letters, digits and '-', at most 40 chars")
        _check(isinstance(self.trainer, str) and (self.trainer == "" or _ADDRESS_RE.match(self.trainer)), "trainer",
               self.trainer, "an address (0x and 40 hex digits), or leave it out")
        object.__setattr__(self, "trainer", self.trainer.lower())  # one canonical form, one run id
        m, lo, o, a = self.model, self.lora, self.optimizer, self.averaging
        _check(m.base.strip(), "model.base", m.base, "a hub model name or a local folder")
        _check(m.task in TASKS, "model.task", m.task, f"one of {', '.join(TASKS)}")
        if m.task == "sequence-classification":
            _check(len(m.labels) >= 2, "model.labels", list(m.labels), "at least 2 labels for classification")
            _check(len(set(m.labels)) == len(m.labels), "model.labels", list(m.labels), "labels must be unique")
        else:
            _check(not m.labels, "model.labels", list(m.labels), "leave empty for causal-lm")
        _check(8 <= m.max_length <= 8192, "model.max_length", m.max_length, "an integer in [8, 8192]")
        _check(1 <= lo.r <= 1024, "lora.r", lo.r, "an integer in [1, 1024]")
        _check(lo.alpha > 0, "lora.alpha", lo.alpha, "a positive number")
        _check(0.0 <= lo.dropout < 1.0, "lora.dropout", lo.dropout, "a number in [0, 1)")
        _check(len(lo.target_modules) > 0, "lora.target_modules", [], "module names such as [\"q_proj\", \"v_proj\"]")
        _check(o.name in OPTIMIZERS, "optimizer.name", o.name, f"one of {', '.join(OPTIMIZERS)}")
        _check(0.0 < o.lr < 1.0, "optimizer.lr", o.lr, "a learning rate in (0, 1)")
        _check(o.weight_decay >= 0.0, "optimizer.weight_decay", o.weight_decay, "a non-negative number")
        _check(a.target_batch_size >= 1, "averaging.target_batch_size", a.target_batch_size, "a positive integer")
        _check(0.2 <= a.matchmaking_time <= 600, "averaging.matchmaking_time", a.matchmaking_time, "seconds in [0.2, 600]")
        _check(
            a.averaging_timeout > a.matchmaking_time,
            "averaging.averaging_timeout",
            a.averaging_timeout,
            f"more seconds than averaging.matchmaking_time ({a.matchmaking_time})",
        )
        _check(a.average_state_every >= 1, "averaging.average_state_every", a.average_state_every, "an integer >= 1")
        _check(a.compression in COMPRESSIONS, "averaging.compression", a.compression, f"one of {', '.join(COMPRESSIONS)}")
        t = self.trust
        _check(t.admission in ADMISSIONS, "trust.admission", t.admission, f"one of {', '.join(ADMISSIONS)}")
        _check(t.aggregation in AGGREGATIONS + ("",), "trust.aggregation", t.aggregation,
               f"one of {', '.join(AGGREGATIONS)}")  # fmt: skip
        _check(all(_PEER_ID_RE.match(p) or _ADDRESS_RE.match(p) for p in t.allowlist), "trust.allowlist",
               list(t.allowlist), "PeerIDs (base58) or wallet addresses (0x and 40 hex digits)")  # fmt: skip
        _check(t.admission != "allowlist" or t.allowlist, "trust.allowlist", [], "at least one peer in an "
               "allowlist run")  # fmt: skip
        _check(t.admission == "allowlist" or not t.allowlist, "trust.allowlist", list(t.allowlist),
               "empty unless trust.admission = \"allowlist\"")  # fmt: skip
        _check(t.admission != "staked" or self.trainer, "trust.admission", t.admission,
               "a run with a trainer address (staked admission reads the run's minStake from the chain)")
        _check(0.0 <= t.clip_tau < 1e30, "trust.clip_tau", t.clip_tau, "a radius >= 0 (0: automatic)")
        _check(0.0 <= t.trim < 0.5, "trust.trim", t.trim, "a fraction in [0, 0.5)")
        _check(t.max_samples_per_peer >= 0, "trust.max_samples_per_peer", t.max_samples_per_peer, "an integer >= 0")
        object.__setattr__(self, "trust", dataclasses.replace(t, allowlist=tuple(
            p.lower() if p.startswith("0x") else p for p in t.allowlist)))  # fmt: skip
        size = len(self.canonical_bytes())
        _check(size <= MAX_SPEC_BYTES, "(the whole spec)", f"{size} bytes", f"at most {MAX_SPEC_BYTES} bytes of "
               f"canonical JSON, the most a peer accepts from the network (fewer labels or modules)")

    @property
    def run_id(self) -> str:
        """``<name>-<16 hex of sha256(canonical spec)>``: equal ids imply equal specs."""
        return f"{self.name}-{self.spec_hash.hex()[:16]}"

    @property
    def spec_hash(self) -> bytes:
        """sha256 of the canonical spec: what the run id abbreviates and the staking contract stores."""
        return hashlib.sha256(self.canonical_bytes()).digest()

    def to_dict(self) -> dict[str, Any]:
        d = _plain(dataclasses.asdict(self))
        if not d["trainer"]:
            del d["trainer"]  # specs without a trainer keep the run ids they had before the field existed
        if self.trust == TrustSpec():
            del d["trust"]  # ... and without a [trust] section, too (they get the robust default all the same)
        return d

    def canonical_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunSpec":
        if not isinstance(data, dict):
            raise SpecError(f"A run spec must be a table of fields, got {type(data).__name__}.")
        data = dict(data)
        sections = {"model": ModelSpec, "lora": LoraSpec, "optimizer": OptimizerSpec, "averaging": AveragingSpec,
                    "trust": TrustSpec}  # fmt: skip
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in sections:
                kwargs[key] = _build(sections[key], value, key)
            elif key in ("name", "seed", "trainer"):
                kwargs[key] = value
            else:
                raise SpecError(f"Unknown run spec field '{key}'. Known: name, seed, trainer, {', '.join(sections)}.")
        for required in ("name", "model"):
            if required not in kwargs:
                raise SpecError(f"The run spec has no '{required}' field; add it (see atlas_swarm/specs/*.toml).")
        _check(isinstance(kwargs["name"], str), "name", kwargs["name"], "a string")
        _check(isinstance(kwargs.get("seed", 0), int), "seed", kwargs.get("seed"), "an integer")
        try:
            return cls(**kwargs)
        except (TypeError, ValueError, OverflowError) as e:  # a field of the wrong type met a range check
            raise SpecError(f"The run spec has a field of the wrong type: {e}.") from None

    @classmethod
    def from_toml(cls, path: str | Path) -> "RunSpec":
        path = Path(path)
        if not path.is_file():
            raise SpecError(f"Run spec file {str(path)!r} does not exist. Pass --run-spec PATH to a .toml file.")
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise SpecError(f"Run spec {str(path)!r} is not valid TOML: {e}.") from None
        try:
            return cls.from_dict(data)
        except SpecError as e:
            raise SpecError(f"Run spec {str(path)!r}: {e}") from None

    @classmethod
    def from_canonical_bytes(cls, raw: bytes) -> "RunSpec":
        """Parse a spec from the network: size and nesting are bounded before the JSON parser sees it."""
        if not isinstance(raw, (bytes, bytearray)) or len(raw) > MAX_SPEC_BYTES:
            size = len(raw) if isinstance(raw, (bytes, bytearray)) else type(raw).__name__
            raise SpecError(f"A published run spec must be at most {MAX_SPEC_BYTES} bytes of JSON, got {size}.")
        if _nesting(raw) > MAX_SPEC_DEPTH:
            raise SpecError(f"A published run spec nests deeper than {MAX_SPEC_DEPTH} levels: not a run spec.")
        try:
            return cls.from_dict(json.loads(raw))
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise SpecError(f"A published run spec is not valid JSON: {e}") from None


def diff_specs(ours: RunSpec, theirs: RunSpec) -> list[str]:
    """Dotted names of the fields that differ, e.g. ``["lora.r", "optimizer.lr"]``."""
    a, b = _flatten(ours.to_dict()), _flatten(theirs.to_dict())
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def check_same_spec(ours: RunSpec, theirs: RunSpec) -> None:
    """Raise SpecMismatch naming every differing field (with both values) unless the specs are equal."""
    fields = diff_specs(ours, theirs)
    if fields:
        a, b = _flatten(ours.to_dict()), _flatten(theirs.to_dict())
        lines = "; ".join(f"{f}: yours={a.get(f)!r}, swarm's={b.get(f)!r}" for f in fields)
        raise SpecMismatch(
            f"Your run spec differs from the one run {theirs.run_id} publishes in {', '.join(fields)} ({lines}). "
            f"Drop --run-spec to use the swarm's spec, or start a new run with yours (its id is {ours.run_id}).",
            fields,
        )


def validate_run_id(run_id: str) -> str:
    if not _RUN_ID_RE.match(run_id):
        raise ConfigError(
            f"--run {run_id!r} is not a run id. Run ids look like 'my-run-0123456789abcdef' (name, '-', 16 hex digits); "
            f"the first peer prints it."
        )
    return run_id


@dataclass(frozen=True)
class ChainConfig:
    """Where a peer settles its group's receipts (all three flags together, or none)."""

    rpc: str  # any EVM chain's RPC URL; the chain id comes from the node
    contract: str  # AtlasStaking address
    wallet: str  # encrypted keystore JSON (never a private key on the command line)
    password_file: Optional[str] = None  # else $ATLAS_WALLET_PASSWORD, else a prompt
    receipt_batch: int = 4  # epochs per transaction (settleReceipts): ~33k gas per peer in a group of 4, ~53k one by one
    receipt_max_wait: float = 120.0  # ... but no receipt waits longer than this for the others

    def __post_init__(self):
        if not 1 <= self.receipt_batch <= 64:
            raise ConfigError(f"--receipt-batch {self.receipt_batch} must be in [1, 64].")
        if self.receipt_max_wait < 0:
            raise ConfigError(f"--receipt-max-wait {self.receipt_max_wait} must be >= 0.")

    @classmethod
    def from_flags(cls, rpc: Optional[str], contract: Optional[str], wallet: Optional[str],
                   password_file: Optional[str] = None, receipt_batch: int = 4,
                   receipt_max_wait: float = 120.0) -> Optional["ChainConfig"]:  # fmt: skip
        given = {"--chain-rpc": rpc, "--staking-contract": contract, "--wallet": wallet}
        if not any(given.values()):
            return None
        missing = [flag for flag, v in given.items() if not v]
        if missing:
            raise ConfigError(f"Settling receipts needs --chain-rpc, --staking-contract and --wallet together; missing "
                              f"{', '.join(missing)}.")  # fmt: skip
        return cls(rpc, contract, wallet, password_file, receipt_batch, receipt_max_wait)


@dataclass(frozen=True)
class PeerConfig:
    """One peer's own settings (not shared with the swarm). Built by peer.parse_args; validated here."""

    run_spec: Optional[str] = None  # path to a TOML run spec (first peer, or a check against the swarm's)
    run_id: Optional[str] = None
    initial_peers: tuple[str, ...] = ()
    data: Optional[str] = None
    batch_size: Optional[int] = None  # samples per optimizer.step(); None = auto
    device: str = "auto"
    precision: str = "auto"  # auto, fp32, bf16, fp16
    quantize: str = "none"  # none, nf4, int8: this peer's base quantized by bitsandbytes (model/fit.py)
    gradient_checkpointing: str = "auto"  # auto (on with a quantized base or a GPU micro-batch below 4), on, off
    max_memory: Optional[float] = None  # GB of the GPU this peer may use; None = the whole card
    identity: Optional[str] = None  # default: <out>/identity.key
    out: str = "atlas-runs/peer"
    base_model: Optional[str] = None  # local folder that overrides the spec's model.base for this peer
    host_maddrs: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)
    announce_maddrs: tuple[str, ...] = ()
    client_mode: bool = False
    max_epochs: Optional[int] = None  # stop once the swarm reaches this epoch
    max_steps: Optional[int] = None  # stop after this many local optimizer steps
    save_every: int = 1  # write the adapter folder every N epochs
    log_format: str = "rich"
    threads: Optional[int] = None  # torch intra-op threads; None = torch's default
    join_timeout: float = 30.0  # seconds to wait for --initial-peers / the run spec / --wait-for-peers
    wait_for_peers: int = 1  # do not train until this many peers (this one included) are in the run
    seed: int = 0  # shuffles this peer's data order
    chain: Optional[ChainConfig] = None  # settle co-signed receipts on a staking contract
    publish_every: int = 5  # publish the adapter (content-addressed) every N epochs when elected; 0 = never
    store: Optional[str] = None  # the embedded block store's folder; default: <out>/store
    ipfs_api: Optional[str] = None  # use this IPFS daemon's /api/v0 RPC as the store instead
    verbose: bool = False  # hivemind's own log lines, its optimizer's status lines included

    def __post_init__(self):
        if self.run_spec is None and self.run_id is None:
            raise ConfigError("Give --run-spec FILE to start a run, or --run RUN_ID with --initial-peers to join one.")
        if self.run_id is not None:
            validate_run_id(self.run_id)
        if self.run_id is not None and not self.initial_peers:
            raise ConfigError(
                f"--run {self.run_id} needs --initial-peers MULTIADDR to find the swarm (the first peer prints it)."
            )
        if self.batch_size is not None and not 1 <= self.batch_size <= 65536:
            raise ConfigError(f"--batch-size {self.batch_size} is out of range; use an integer in [1, 65536] or 'auto'.")
        if self.device not in DEVICES:
            raise ConfigError(f"--device {self.device!r} is unknown; use one of {', '.join(DEVICES)}.")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"--precision {self.precision!r} is unknown; use auto, fp32, bf16 or fp16.")
        if self.quantize not in ("none", "nf4", "int8"):
            raise ConfigError(f"--quantize {self.quantize!r} is unknown; use none, nf4 or int8.")
        if self.gradient_checkpointing not in ("auto", "on", "off"):
            raise ConfigError(f"--gradient-checkpointing {self.gradient_checkpointing!r} is unknown; use auto, on or off.")
        if self.max_memory is not None and not 0.1 <= self.max_memory <= 100_000:
            raise ConfigError(f"--max-memory {self.max_memory} is out of range; give the GPU memory to use in GB.")
        if self.log_format not in ("rich", "json", "plain"):
            raise ConfigError(f"--log-format {self.log_format!r} is unknown; use rich, json or plain.")
        if self.save_every < 1:
            raise ConfigError(f"--save-every {self.save_every} must be >= 1.")
        for name in ("max_epochs", "max_steps", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {value} must be >= 1.")
        if self.wait_for_peers < 1:
            raise ConfigError(f"--wait-for-peers {self.wait_for_peers} must be >= 1.")
        if self.join_timeout <= 0:
            raise ConfigError(f"--join-timeout {self.join_timeout} must be positive.")
        if self.publish_every < 0:
            raise ConfigError(f"--publish-every {self.publish_every} must be >= 0 (0: never publish).")
        if self.ipfs_api is not None and not re.match(r"^https?://[^/\s]+/?$", self.ipfs_api):
            raise ConfigError(f"--ipfs-api {self.ipfs_api!r} is not a daemon URL such as http://127.0.0.1:5001.")

    @property
    def identity_path(self) -> Path:
        return Path(self.identity) if self.identity else Path(self.out) / "identity.key"

    @property
    def store_path(self) -> Path:
        return Path(self.store) if self.store else Path(self.out) / "store"


def _check(ok: Any, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise SpecError(f"run spec field '{name}' = {value!r} is invalid: expected {expected}.")


def _nesting(raw: bytes) -> int:
    """Deepest bracket nesting of JSON bytes, brackets inside strings skipped: linear, no recursion."""
    depth = deepest = 0
    in_string = escaped = False
    for b in raw:
        if in_string:
            if escaped:
                escaped = False
            elif b == 0x5C:  # backslash
                escaped = True
            elif b == 0x22:
                in_string = False
        elif b == 0x22:
            in_string = True
        elif b in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif b in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _build(cls: type, value: Any, section: str):
    if not isinstance(value, dict):
        raise SpecError(f"run spec field '{section}' must be a table ([{section}]), got {value!r}.")
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, v in value.items():
        if key not in known:
            raise SpecError(f"Unknown run spec field '{section}.{key}'. Known: {', '.join(known)}.")
        default = known[key].default
        if isinstance(v, list):
            if not all(isinstance(x, str) for x in v):
                raise SpecError(f"run spec field '{section}.{key}' must be a list of strings, got {v!r}.")
            v = tuple(v)
        elif isinstance(default, float) and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        expected_type = type(default) if default is not dataclasses.MISSING else str
        if default is dataclasses.MISSING and known[key].type in ("str",):
            expected_type = str
        if not isinstance(v, expected_type) or isinstance(v, bool) != isinstance(default, bool):
            raise SpecError(
                f"run spec field '{section}.{key}' = {v!r} has the wrong type: expected {expected_type.__name__}."
            )
        kwargs[key] = v
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise SpecError(f"run spec section [{section}] is incomplete: {e}.") from None


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
