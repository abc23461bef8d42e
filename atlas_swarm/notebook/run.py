"""``Run``: a trainer's handle on one run, from a notebook or a script.

    run = Run.create(base_model=..., task=..., lora={...}, target_batch_size=...)   build + validate the spec
    print(run.launch())               a DHT node in this process publishes the spec; returns the peers' join command
    run = Run.attach(run_id, peers)   or reattach to a running run
    run.status(), run.watch()         peers, samples/s, epochs, loss (table / live bar + plot)
    run.contribute(data=...); run.stop()   this machine trains too, as a background peer process
    run.adapter(), run.evaluate(ds)   the latest published adapter, every block verified against its CID
    run.connect_chain(...); run.fund(eth); run.rewards()   the staking contract: budget and per-peer ledger
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from atlas_swarm.chain.client import StakingClient, eth
from atlas_swarm.chain.session import verified_bindings
from atlas_swarm.chain.wallet import load_wallet
from atlas_swarm.checkpoints.keeper import Keeper
from atlas_swarm.config import RunSpec, validate_run_id
from atlas_swarm.errors import AtlasError, ChainUnavailable, ConfigError, SpecError
from atlas_swarm.identity import Identity
from atlas_swarm.launch import PeerFailed, PeerProcess
from atlas_swarm.model.lora import resolve_base_model
from atlas_swarm.monitor import Monitor
from atlas_swarm.notebook.contribute import peer_args, write_data
from atlas_swarm.notebook.display import Display
from atlas_swarm.notebook.fetch import evaluate_adapter, fetch_adapter, load_peft
from atlas_swarm.proofs import chain_run_id
from atlas_swarm.swarm import Swarm, quiet_hivemind

# LoRA target modules by transformers model_type, used when create() is given no lora.target_modules
DEFAULT_TARGETS = {"llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
                   "gpt2": ["c_attn"], "bert": ["query", "value"], "roberta": ["query", "value"],
                   "distilbert": ["q_lin", "v_lin"]}  # fmt: skip


class Run:
    def __init__(self, spec: RunSpec, workdir: str | Path = "atlas-runs/notebook", ipfs_api: Optional[str] = None):
        self.spec = spec
        self.workdir = Path(workdir)
        self.ipfs_api = ipfs_api
        self.swarm = None
        self._monitor = None
        self._contributions: list[PeerProcess] = []
        self._chain = None
        self._keeper = None

    # -- building and joining ------------------------------------------------------------------------------------
    @classmethod
    def create(cls, base_model: str, task: str = "causal-lm", *, name: str = "notebook-run",
               labels: Sequence[str] = (), lora: Optional[dict] = None, target_batch_size: int = 256,
               lr: float = 1e-3, optimizer: str = "adamw", max_length: int = 128, matchmaking_time: float = 3.0,
               averaging_timeout: float = 30.0, average_state_every: int = 4, compression: str = "none",
               seed: int = 0, trainer: str = "", trust: Optional[dict] = None,
               workdir: str | Path = "atlas-runs/notebook", ipfs_api: Optional[str] = None) -> "Run":
        """Build and validate a run spec (a SpecError names any bad field). ``lora``: r, alpha, dropout,
        target_modules, modules_to_save; target_modules default to the usual attention projections of the model.
        ``trainer``: the address that will fund the run on a staking contract (the run id commits to it).
        ``trust``: the spec's [trust] section (admission, allowlist, aggregation, clip_tau, trim,
        max_samples_per_peer; README "Who may train")."""
        lora = dict(lora or {})
        if "target_modules" not in lora:
            lora["target_modules"] = _default_targets(base_model)
        spec = RunSpec.from_dict({
            "name": name, "seed": seed, "trainer": trainer,
            "model": {"base": str(base_model), "task": task, "labels": list(labels), "max_length": max_length},
            "lora": {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in lora.items()},
            "optimizer": {"name": optimizer, "lr": float(lr)},
            "averaging": {"target_batch_size": target_batch_size, "matchmaking_time": float(matchmaking_time),
                          "averaging_timeout": float(averaging_timeout), "average_state_every": average_state_every,
                          "compression": compression},
            **({"trust": {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in trust.items()}}
               if trust else {}),
        })  # fmt: skip
        return cls(spec, workdir, ipfs_api)

    @classmethod
    def from_toml(cls, path: str | Path, **kwargs) -> "Run":
        return cls(RunSpec.from_toml(path), **kwargs)

    @classmethod
    def attach(cls, run_id: str, initial_peers: Sequence[str], timeout: float = 30.0,
               workdir: str | Path = "atlas-runs/notebook", ipfs_api: Optional[str] = None) -> "Run":
        """Reattach to a running run: join its swarm and fetch (and verify) its spec."""
        validate_run_id(run_id)
        initial_peers = [initial_peers] if isinstance(initial_peers, str) else list(initial_peers or [])
        swarm = _join(Path(workdir), initial_peers)
        try:
            spec = swarm.fetch_spec(run_id, timeout=timeout)
        except BaseException:
            swarm.shutdown()
            raise
        run = cls(spec, workdir, ipfs_api)
        run.swarm = swarm
        run._start_keeper()
        return run

    def _start_keeper(self) -> None:
        """Keep a verified copy of every adapter this run publishes (see checkpoints/keeper.py)."""
        if self._keeper is None:
            self._keeper = Keeper(self.swarm, self.workdir / "store", lambda: [self.run_id])
            self._keeper.keep_new()  # publishes the keeper record before launch() returns
            self._keeper.start()

    def launch(self, initial_peers: Optional[Sequence[str]] = None,
               host_maddrs: Sequence[str] = ("/ip4/0.0.0.0/tcp/0",)) -> str:  # fmt: skip
        """Publish the spec to the swarm (starting a DHT node here; with no ``initial_peers`` it is the swarm's first
        node) and return the command peers run to join."""
        initial_peers = [initial_peers] if isinstance(initial_peers, str) else list(initial_peers or [])
        if self.swarm is None:
            self.swarm = _join(self.workdir, initial_peers, host_maddrs)
        self.swarm.publish_spec(self.spec)
        self.swarm.announce_run(self.run_id)
        self._start_keeper()
        return self.join_command

    @property
    def run_id(self) -> str:
        return self.spec.run_id

    @property
    def maddrs(self) -> list[str]:
        """This node's addresses, public ones first."""
        self._need_swarm()
        return sorted(self.swarm.visible_maddrs(), key=lambda a: ("/127." in a, "/ip6/" in a))

    @property
    def join_command(self) -> str:
        base = f" --base-model PATH_TO_{Path(self.spec.model.base).name}" if Path(self.spec.model.base).is_dir() else ""
        return f"python -m atlas_swarm.peer --initial-peers {self.maddrs[0]} --run {self.run_id} --data YOUR_DATA{base}"

    def __repr__(self) -> str:
        return f"Run({self.run_id!r}, {'attached' if self.swarm else 'not launched'})"

    def _need_swarm(self) -> None:
        if self.swarm is None:
            raise ConfigError("This run is not in a swarm yet: call run.launch() (or Run.attach(run_id, peers)).")

    # -- watching ------------------------------------------------------------------------------------------------
    def _view(self) -> Optional[dict]:
        self._need_swarm()
        if self._monitor is None:
            self._monitor = Monitor(self.swarm, runs=(self.run_id,))
        self._monitor.poll_once()
        runs = [r for r in self._monitor.snapshot()["runs"] if r["run_id"] == self.run_id]
        return runs[0] if runs else None

    def status(self):
        """One row per peer whose status record is live (state "training", or "left" for a peer that said goodbye):
        epoch, samples, samples/s, loss, averaging rounds, proofs, rewards. A pandas DataFrame when pandas is
        installed, else a list of dicts."""
        self._need_swarm()
        columns = ["peer_id", "state", "epoch", "samples", "samples_per_second", "loss", "device", "rounds_averaged",
                   "rounds_failed", "receipts_posted", "rewards_eth"]  # fmt: skip
        rows = []
        for pid, st in sorted(self.swarm.peer_statuses(self.run_id).items()):
            rows.append(dict(zip(columns, [pid, "left" if st.leaving else "training", st.epoch, st.samples_total,
                                           round(st.samples_per_second, 2), st.loss, st.device, st.rounds_averaged,
                                           st.rounds_failed, st.receipts_posted, st.rewards_eth])))  # fmt: skip
        try:
            import pandas
        except ImportError:
            return rows
        return pandas.DataFrame(rows, columns=columns)

    def watch(self, until_epoch: Optional[int] = None, timeout: Optional[float] = None, every: float = 2.0):
        """Live progress until the swarm reaches ``until_epoch`` (or ``timeout`` s pass, or the background
        contribution exits, or you interrupt it: that stops the watching, not the run). Returns the last view."""
        display = Display(until_epoch)
        deadline = None if timeout is None else time.monotonic() + timeout
        view = None
        try:
            while True:
                view = self._view()
                display.update(view)
                if until_epoch is not None and view is not None and view["epoch"] >= until_epoch:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    break
                if self._contributions and not any(c.running for c in self._contributions):
                    break
                time.sleep(every)
        except KeyboardInterrupt:
            pass
        finally:
            display.close()
        return view

    # -- contributing ----------------------------------------------------------------------------------------------
    def contribute(self, data, *, batch_size: Optional[int] = None, max_epochs: Optional[int] = None,
                   publish_every: int = 1, base_model: Optional[str] = None, threads: Optional[int] = None,
                   extra_args: Sequence[str] = (), wait_started: float = 120.0) -> PeerProcess:
        """Train on ``data`` (a path, 'builtin:NAME', or a list of strings / {"text", "label"} dicts; it stays on
        this machine) as a peer of this run, in a background process; ``run.stop()`` ends it."""
        self._need_swarm()
        out = self.workdir / "peers" / f"peer-{len(self._contributions)}"
        path = write_data(data, out)
        local = [a for a in self.maddrs if "/127.0.0.1/" in a] or self.maddrs
        c = PeerProcess(out, peer_args(self.run_id, local[:1], path, batch_size, max_epochs, publish_every,
                                       base_model, threads, extra_args))  # fmt: skip
        self._contributions.append(c)
        try:
            c.wait_event("started", wait_started)  # bad data or a bad model fail here, with the peer's own message
        except PeerFailed:
            if c.running:
                c.stop()
                raise AtlasError(f"The contributing peer did not start within {wait_started:.0f} s: {c.error()}")
            raise AtlasError(f"The contributing peer exited: {c.error()}") from None
        return c

    def stop(self) -> list[int]:
        """Stop this notebook's contributing peers (each saves its adapter and leaves); their exit codes."""
        return [c.stop() for c in self._contributions]

    # -- the result ------------------------------------------------------------------------------------------------
    def published(self) -> list[dict]:
        """Every adapter the run's peers published, newest first: epoch, CID, adapter hash, publisher."""
        self._need_swarm()
        return [{"epoch": a.epoch, "cid": a.cid, "adapter_hash": a.adapter_hash, "publisher": pid}
                for pid, a in self.swarm.published_adapters(self.run_id)]  # fmt: skip

    def adapter(self, epoch: Optional[int] = None, load: bool = True, base_model: Optional[str] = None,
                timeout: float = 0.0):
        """The published adapter of ``epoch`` (default: the newest), fetched and verified block by block against its
        CID, kept in this notebook's store; a ready ``PeftModel`` or, with ``load=False``, the folder."""
        folder = fetch_adapter(self, epoch, timeout)
        if not load:
            return folder

        return load_peft(self.spec, folder, base_model)

    def evaluate(self, dataset, epoch: Optional[int] = None, base_model: Optional[str] = None,
                 batch_size: int = 16) -> dict[str, Any]:
        """The metric (mean loss; accuracy for classification) on ``dataset`` before training (the run's seeded
        initial adapter) and after (the published adapter of ``epoch``, default the newest)."""
        folder = fetch_adapter(self, epoch, 0.0)
        data = write_data(dataset, self.workdir / "eval")
        return evaluate_adapter(self.spec, folder, data, base_model, batch_size)

    # -- the chain -------------------------------------------------------------------------------------------------
    def connect_chain(self, rpc: str, contract: str, wallet: Optional[str] = None,
                      password: Optional[str] = None) -> None:
        """Use the AtlasStaking contract at ``contract`` on ``rpc`` (``wallet``: a keystore, needed to fund)."""
        account = load_wallet(wallet, password) if wallet else None
        self._chain = StakingClient.connect(StakingClient.web3(rpc), contract, account)

    def _need_chain(self, signing: bool = False):
        if self._chain is None:
            raise ChainUnavailable("Not available without a chain: call run.connect_chain(rpc, contract, wallet=...) "
                                   "first (see `python -m atlas_swarm.chain deploy`).")  # fmt: skip
        if signing and self._chain.account is None:
            raise ChainUnavailable("Funding signs a transaction: connect_chain(..., wallet=KEYSTORE, password=...).")
        return self._chain

    def _chain_run(self) -> bytes:
        if not self.spec.trainer:
            raise ChainUnavailable(f"Run {self.run_id}'s spec names no trainer, so it has no run on chain: create it "
                                   f"with Run.create(..., trainer=YOUR_ADDRESS).")  # fmt: skip
        return chain_run_id(self.run_id, self.spec.trainer)

    def fund(self, amount_eth: float, reward_per_sample_eth: float = 1e-6, min_stake_eth: float = 0.01,
             max_samples_per_epoch: Optional[int] = None, not_mine: bool = False) -> dict:
        """Add ``amount_eth`` to the run's reward budget (opening the run on chain first if it is not there yet,
        with the given rate and minimum stake). Returns the run's on-chain record. Funding a run whose spec names
        another trainer is refused unless ``not_mine=True``: what is left at its close goes back to that trainer."""
        chain = self._need_chain(signing=True)
        if amount_eth <= 0:
            raise ConfigError(f"fund({amount_eth}): the amount must be positive (in ETH).")
        run = self._chain_run()
        mine = self.spec.trainer == chain.account.address.lower()
        if not mine and not not_mine:
            raise ConfigError(f"Run {self.run_id}'s trainer is {self.spec.trainer}, not your wallet "
                              f"{chain.account.address}: the money left at its close would go to them. Pass "
                              f"not_mine=True to fund it anyway.")  # fmt: skip
        if chain.get_run(run) is None:
            if not mine:
                raise ChainUnavailable(f"Run {self.run_id} is not on chain yet; only its trainer can open it.")
            max_samples = max_samples_per_epoch or 2 * self.spec.averaging.target_batch_size
            chain.create_run(self.run_id, self.spec.spec_hash, eth(reward_per_sample_eth), eth(min_stake_eth),
                             max_samples, eth(amount_eth), samples_per_epoch=2 * self.spec.averaging.target_batch_size,
                             min_epoch_seconds=1)  # fmt: skip
        else:
            chain.fund_run(run, eth(amount_eth))
        return chain.get_run(run)

    def rewards(self):
        """Per-peer ledger of this run from the contract's events: epochs and samples accepted, rewards, slashes
        (with the PeerID where a peer bound its wallet both ways). DataFrame if pandas is installed."""
        chain = self._need_chain()
        ledger = chain.run_ledger(self._chain_run())
        peer_of = {}
        if self.swarm is not None:
            peer_of = {addr: pid for pid, addr in verified_bindings(self.swarm, chain, self.run_id).items()}
        rows = [{"address": addr, "peer_id": peer_of.get(addr), "epochs": r["epochs"], "samples": r["samples"],
                 "reward_eth": r["reward_wei"] / 1e18, "reward_wei": r["reward_wei"], "slashes": r["slashes"],
                 "slashed_eth": r["slashed_wei"] / 1e18} for addr, r in sorted(ledger.items())]  # fmt: skip
        try:
            import pandas
        except ImportError:
            return rows
        return pandas.DataFrame(rows)

    # -- leaving ---------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop contributing peers and this notebook's DHT node."""
        try:
            self.stop()
        finally:
            if self._keeper is not None:
                self._keeper.stop()
                self._keeper = None
            if self.swarm is not None:
                self.swarm.shutdown()
                self.swarm = self._monitor = None

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _join(workdir: Path, initial_peers: Sequence[str], host_maddrs: Sequence[str] = ("/ip4/0.0.0.0/tcp/0",)):
    quiet_hivemind()
    identity = Identity.load_or_create(workdir / "identity.key")
    return Swarm.join(identity, initial_peers, host_maddrs)


def _default_targets(base_model: str) -> list[str]:
    config = Path(resolve_base_model(str(base_model))) / "config.json"
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError):
        model_type = None
    if model_type not in DEFAULT_TARGETS:
        raise SpecError(f"No default LoRA target modules for model type {model_type!r} ({base_model}); pass "
                        f"lora={{'target_modules': [...]}} with the names of its attention projections.")  # fmt: skip
    return DEFAULT_TARGETS[model_type]
