"""Joining the swarm: a hivemind DHT node with our identity, signed + schema-checked run records, and the optimizer.

Everything hivemind-specific about the DHT lives here; callers get plain methods and atlas errors.
"""

from __future__ import annotations

import time
from collections import Counter
from functools import lru_cache, partial
from typing import Callable, Optional, Sequence

import hivemind
import msgpack
import psutil
from cryptography.hazmat.primitives import serialization
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.schema import SchemaValidator
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.multiaddr import Multiaddr

from atlas_swarm.config import RunSpec
from atlas_swarm.errors import ConfigError, PeersUnreachable, RunNotFound, SpecError, SwarmError
from atlas_swarm.identity import Identity, peer_id_of
from atlas_swarm.swarm import blocks
from atlas_swarm.swarm.heal import heal_forever, stop_healing
from atlas_swarm.swarm.records import (
    ADAPTERS_KEPT,
    ADAPTERS_TTL,
    COSIGNED_KEPT,
    COSIGNED_TTL,
    MAX_RECORD_BYTES,
    SPEC_TTL,
    STATUS_TTL,
    WALLET_TTL,
    CoSignature,
    CoSignatures,
    GlobalRecords,
    PeerStatus,
    PublishedAdapter,
    PublishedAdapters,
    RunAnnouncement,
    RunRecords,
    WalletBinding,
)
from atlas_swarm.swarm.tasks import PinsTasks

POLL_EVERY = 0.5
BOOTSTRAP_PAUSE = 3.0  # at most this long between two tries to reach the initial peers (Swarm.join)
STOP_HEALING_TIMEOUT = 2.0  # swarm/heal.py's stop_healing takes at most 1 s in the DHT process
STORE_TIMEOUT = 30.0  # a blocking store that no node answers in this long fails (hivemind's future can hang)
JOIN_ABANDON_TIMEOUT = 3.0  # seconds to stop a DHT process (and its p2pd) whose join failed or was interrupted
READ_TIMEOUT = 30.0  # a read the DHT process does not answer in this long fails (its lookups end in a few seconds)


class RunSchemaValidator(SchemaValidator):
    """hivemind's SchemaValidator, merged without duplicates. Every run adds the same schema for its own keys;
    hivemind's merge appends the schema again per run, and every record is then checked against each copy: a node
    that watches many runs (a monitor) slows and grows with every run ever announced. Ours keeps one copy per
    schema class, and forget_run drops a run's keys again."""

    def merge_with(self, other) -> bool:
        if not isinstance(other, SchemaValidator):
            return False
        self._schemas.extend(s for s in other._schemas if s not in self._schemas)
        self._key_id_to_field_name.update(other._key_id_to_field_name)
        self._allow_extra_keys = self._allow_extra_keys or other._allow_extra_keys
        return True


async def _drop_keys(_dht, node, key_ids: list) -> None:
    """In the DHT process: forget the schema keys of a run this node no longer watches."""
    for validator in getattr(node.protocol.record_validator, "_validators", []):
        if isinstance(validator, SchemaValidator):
            for key_id in key_ids:
                validator._key_id_to_field_name.pop(key_id, None)


async def _connections(_dht, node) -> int:
    return len(await node.p2p.list_peers())


class PinnedDHT(PinsTasks, hivemind.DHT):
    """hivemind's DHT, whose process keeps every call's task until it ends (swarm/tasks.py)."""


class Swarm:
    """This peer's DHT node. ``Swarm.join(...)`` starts it; ``shutdown()`` stops it and its p2pd."""

    def __init__(self, dht: hivemind.DHT, identity: Identity, private_key: RSAPrivateKey):
        self.dht, self.identity, self.private_key = dht, identity, private_key
        self.signer = RSASignatureValidator(private_key)
        self._validated_runs: set[str] = set()
        self.forged = 0  # well-signed records whose content names another peer than their signer (dropped)
        # the run's admission (swarm/gate.py, set by the peer): run records of non-admitted peers are ignored
        self.admits: Callable[[str], bool] = lambda _peer_id: True
        self.not_admitted = 0  # run records read and ignored because their writer is not admitted

    @classmethod
    def join(
        cls,
        identity: Identity,
        initial_peers: Sequence[str] = (),
        host_maddrs: Sequence[str] = ("/ip4/0.0.0.0/tcp/0",),
        announce_maddrs: Sequence[str] = (),
        client_mode: bool = False,
        startup_timeout: float = 30.0,
        audit: bool = False,
        while_joining: Optional[Callable[[], None]] = None,
        **p2p_options,
    ) -> "Swarm":
        """Start a DHT node with ``identity``; with no initial peers it starts a new swarm. ``audit``: count the
        records the node rejects (monitors; see swarm/audit.py). ``p2p_options`` go to hivemind.P2P (relay, NAT).
        ``while_joining`` runs once in this thread while the DHT process (forked first) bootstraps: work that would
        otherwise wait for the join (a peer's model imports)."""
        for flag, addrs in (("--initial-peers", initial_peers), ("--host-maddrs", host_maddrs),
                            ("--announce-maddrs", announce_maddrs)):  # fmt: skip
            for addr in addrs:
                _check_maddr(flag, addr)
        if any("/p2p/" not in a for a in initial_peers):
            bad = next(a for a in initial_peers if "/p2p/" not in a)
            raise ConfigError(f"--initial-peers {bad!r} has no /p2p/<PeerID> part; copy the full address the peer printed.")
        private_key = hivemind_key(identity)
        validators = [RSASignatureValidator(private_key), RunSchemaValidator(GlobalRecords, prefix="atlas")]
        if audit:
            from atlas_swarm.swarm.audit import AuditingValidator

            validators = [AuditingValidator(validators)]
        # p2pd gives up on the initial peers after one round of dials: try again, a few seconds apart, until
        # startup_timeout (--join-timeout), so that peers started with their bootstrap node (a script, a reboot)
        # join once it is up instead of exiting
        deadline, attempt = time.monotonic() + startup_timeout, 0
        while True:
            attempt += 1
            try:
                dht = PinnedDHT(
                    initial_peers=list(initial_peers),
                    host_maddrs=list(host_maddrs),
                    announce_maddrs=list(announce_maddrs) or None,
                    identity_path=str(identity.path),
                    client_mode=client_mode,
                    record_validators=validators,
                    startup_timeout=max(1.0, deadline - time.monotonic()),
                    start=True,
                    await_ready=False,
                    **p2p_options,
                )
                try:
                    if while_joining is not None:  # no thread: nothing else runs here when a process is forked
                        while_joining, work = None, while_joining
                        work()
                    dht.wait_until_ready()  # the daemon's error, if any, is raised here
                except BaseException:  # a failed or interrupted join leaves no process (nor its p2pd) running
                    try:  # a process stopped before its p2pd has started (or failed) could orphan that p2pd
                        dht.wait_until_ready(JOIN_ABANDON_TIMEOUT)
                    except BaseException:
                        pass
                    cls(dht, identity, private_key).shutdown(timeout=JOIN_ABANDON_TIMEOUT)
                    raise
                break
            except P2PDaemonError as e:
                text = str(e)
                pause = min(attempt, BOOTSTRAP_PAUSE)
                if "bootstrap" in text and time.monotonic() + pause < deadline:
                    time.sleep(pause)
                    continue
                if "bootstrap" in text:
                    raise PeersUnreachable(
                        f"None of --initial-peers answered ({', '.join(initial_peers)}; tried {attempt}x in "
                        f"{startup_timeout:.0f} s, --join-timeout). Check "
                        f"that the address is current (a peer prints new ones when it restarts without --identity), "
                        f"that its port is open, and that you can reach its host."
                    ) from None
                if "already taken" in text:
                    raise ConfigError(
                        f"Identity {str(identity.path)!r} is already used by a running peer. Each running peer needs "
                        f"its own --identity (or --out)."
                    ) from None
                raise SwarmError(f"The p2p daemon failed to start: {text}") from None
        swarm = cls(dht, identity, private_key)
        # keep re-contacting the initial and known peers: hivemind alone never heals a network split (swarm/heal.py)
        dht.run_coroutine(partial(heal_forever, initial_peers=list(initial_peers)), return_future=True)
        return swarm

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    def visible_maddrs(self) -> list[str]:
        """This node's multiaddrs, public ones first (loopback last)."""
        return sorted((str(a) for a in self.dht.get_visible_maddrs()), key=lambda a: "/127." in a or "/::1/" in a)

    def connected(self) -> bool:
        """Whether any peer holds a connection to this one (if none, every record read is this node's own copy)."""
        try:
            return self.dht.run_coroutine(_connections, return_future=True).result(READ_TIMEOUT) > 0
        except (ConnectionError, OSError):  # our p2pd is gone (or the DHT process does not answer): nobody can reach us
            return False

    def _read(self, key: str):
        """hivemind's ``get(key, latest=True)``, bounded: a DHT process that stopped answering is an error here, not
        a caller that waits forever."""
        try:
            return self.dht.get(key, latest=True, return_future=True).result(READ_TIMEOUT)
        except TimeoutError:
            raise SwarmError(f"This peer's DHT process did not answer a read within {READ_TIMEOUT:.0f} s; restart "
                             f"the peer if it keeps happening.") from None

    def is_alive(self) -> bool:
        """False once the DHT process has died (or was shut down)."""
        return self.dht.is_alive()

    def _ensure_validators(self, run_id: str) -> None:
        if run_id not in self._validated_runs:
            self.dht.add_validators([RunSchemaValidator(RunRecords, prefix=run_id)])
            self._validated_runs.add(run_id)

    def forget_run(self, run_id: str) -> None:
        """Drop the validators of a run this node stops watching (a monitor evicting it), so that their number stays
        bounded. Its records are then unknown keys to this node, as they were before it first read the run; reading
        it again adds the validators again."""
        if run_id not in self._validated_runs and run_id + ":progress" not in self._validated_runs:
            return
        self._validated_runs.discard(run_id)
        self._validated_runs.discard(run_id + ":progress")
        names = [f.alias for f in RunRecords.__fields__.values()] + ["progress"]
        key_ids = [DHTID.generate(source=f"{run_id}_{name}").to_bytes() for name in names]
        self.dht.run_coroutine(partial(_drop_keys, key_ids=key_ids), return_future=True)

    def _store(self, key: str, value, ttl: float, wait: bool, what: str, timeout: float = STORE_TIMEOUT) -> None:
        """Store one signed record. Too large a record fails here, at once: hivemind's DHT process drops a store of
        about 200 kB (BlockingIOError on its pipe) and the caller's future never resolves. A blocking store that no
        node answers within STORE_TIMEOUT fails too."""
        size = len(msgpack.packb(value, use_bin_type=True))
        if size > MAX_RECORD_BYTES:
            raise SwarmError(f"Could not store {what}: the record is {size} bytes, over the {MAX_RECORD_BYTES}-byte "
                             f"limit of a DHT record.")  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            future = self.dht.store(key, subkey=self.signer.local_public_key, value=value,
                                    expiration_time=get_dht_time() + ttl, return_future=True)  # fmt: skip
            if not wait:
                return
            try:
                ok = future.result(timeout=max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                ok = False
            # a store that no node took can succeed a moment later: seen twice in a full test run at a peer's final
            # status, as its groupmates were leaving (refused within 0.5 s, not timed out)
            if ok or time.monotonic() + 0.5 >= deadline:
                break
            time.sleep(0.5)
        if not ok:
            raise SwarmError(f"Could not store {what} in the DHT: no node accepted it within {timeout:.0f} s.")

    # -- the run spec -------------------------------------------------------------------------------------------
    def publish_spec(self, spec: RunSpec, wait: bool = True, timeout: float = 30.0) -> None:
        """Store the spec; with ``wait``, retry until a node accepts it (a busy node may time a store out: the spec
        is self-certifying, so storing it again is harmless) or ``timeout`` s pass."""
        self._ensure_validators(spec.run_id)
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self._store(f"{spec.run_id}_spec", spec.canonical_bytes(), SPEC_TTL, wait, "the run spec")
            except SwarmError:
                if time.monotonic() >= deadline or len(spec.canonical_bytes()) > MAX_RECORD_BYTES:
                    raise
            time.sleep(1.0)

    def fetch_spec(self, run_id: str, timeout: float) -> RunSpec:
        """Find the spec of ``run_id`` in the DHT. Only bytes whose hash equals the id are accepted."""
        self._ensure_validators(run_id)
        deadline = time.monotonic() + timeout
        while True:
            found = self._read(f"{run_id}_spec")
            if found is not None and isinstance(found.value, dict):
                for entry in found.value.values():  # one junk entry must not hide a good one
                    raw = entry.value
                    if isinstance(raw, bytes) and _spec_id(raw) == run_id:
                        return RunSpec.from_canonical_bytes(raw)
            if time.monotonic() >= deadline:
                raise RunNotFound(
                    f"No peer in this swarm publishes run {run_id!r} (waited {timeout:.0f} s). Check the run id; if "
                    f"the run's peers all left, restart it with --run-spec FILE."
                )
            time.sleep(POLL_EVERY)

    # -- peer status --------------------------------------------------------------------------------------------
    def publish_status(self, run_id: str, status: PeerStatus, wait: bool = False, timeout: float = 5.0) -> None:
        """Non-blocking unless ``wait`` (then at most ``timeout`` s): the DHT process stores it in the background."""
        self._ensure_validators(run_id)
        self._store(f"{run_id}_peers", status.dict(), STATUS_TTL, wait, "this peer's status", timeout=timeout)

    def peer_statuses(self, run_id: str) -> dict[str, PeerStatus]:
        """Live peers of ``run_id`` by PeerID (records already signature- and schema-checked by the DHT)."""
        self._ensure_validators(run_id)
        return {s.peer_id: s for s in self._owned_records(f"{run_id}_peers", PeerStatus, admitted=True)}

    def _owned_records(self, key: str, model, admitted: bool = False) -> list:
        """The entries under ``key`` that parse as ``model`` and name the PeerID of the key that signed them (the
        DHT has already checked signature and schema). Records signed by one peer but naming another are dropped
        and counted in ``forged``."""
        found = self._read(key)
        out = []
        if found is not None and isinstance(found.value, dict):
            for subkey, entry in found.value.items():
                try:
                    record = model.parse_obj(entry.value)
                except Exception:
                    continue
                if peer_id_of_owner(subkey) != record.peer_id:
                    self.forged += 1
                    continue
                if admitted and not self.admits(record.peer_id):
                    self.not_admitted += 1
                    continue
                out.append(record)
        return out

    # -- the run registry and hivemind's own progress records ---------------------------------------------------
    def announce_run(self, run_id: str) -> None:
        """Say which run this peer is in (non-blocking), so monitors can find every run."""
        value = RunAnnouncement(run_id=run_id, peer_id=self.peer_id, time=time.time()).dict()
        self._store("atlas_runs", value, STATUS_TTL, False, "the run announcement")

    def announced_runs(self) -> set[str]:
        return set(self.announcers())

    def announcers(self) -> Counter:
        """Run id -> how many peers announce it (each key announces one run: one signed entry per key)."""
        return Counter(a.run_id for a in self._owned_records("atlas_runs", RunAnnouncement))

    def training_progress(self, run_id: str) -> list[dict]:
        """hivemind's per-peer progress records of a run ({peer_id, epoch, samples_accumulated, ...})."""
        from hivemind.optim.progress_tracker import LocalTrainingProgress, TrainingProgressSchema

        if run_id + ":progress" not in self._validated_runs:
            self.dht.add_validators([RunSchemaValidator(TrainingProgressSchema, prefix=run_id)])
            self._validated_runs.add(run_id + ":progress")
        found = self._read(f"{run_id}_progress")
        out = []
        if found is not None and isinstance(found.value, dict):
            for entry in found.value.values():
                try:
                    out.append(LocalTrainingProgress.parse_obj(entry.value).dict())
                except Exception:
                    continue
        return out

    def rejected_records(self) -> dict[str, int]:
        """Records dropped so far: by the node (bad signature or schema; needs audit=True) and forged content."""
        from atlas_swarm.swarm.audit import rejected_counts

        counts = rejected_counts(self.dht)
        counts["forged"] = self.forged
        counts["not_admitted"] = self.not_admitted
        return counts

    # -- PeerID <-> wallet binding -------------------------------------------------------------------------------
    def publish_wallet(self, run_id: str, address: str, signature: bytes) -> None:
        self._ensure_validators(run_id)
        binding = WalletBinding(peer_id=self.peer_id, address=address, signature=signature)
        self._store(f"{run_id}_wallets", binding.dict(), WALLET_TTL, True, "this peer's wallet binding")

    def wallet_bindings(self, run_id: str) -> dict[str, str]:
        """PeerID -> address, only where the record was signed by that PeerID's own key (its subkey derives to the
        PeerID it names) and the address signed the binding too."""
        from atlas_swarm.proofs.binding import verify_binding

        self._ensure_validators(run_id)
        out = {}
        for b in self._owned_records(f"{run_id}_wallets", WalletBinding):
            if verify_binding(b.peer_id, b.address, b.signature):
                out[b.peer_id] = b.address
            else:
                self.forged += 1  # the address never agreed to this binding
        return out

    # -- co-signatures of receipts and checkpoint votes ----------------------------------------------------------
    def publish_cosignatures(self, run_id: str, signatures: Sequence[CoSignature]) -> None:
        """(Re)publish this peer's last COSIGNED_KEPT signatures (non-blocking), signed by its key."""
        self._ensure_validators(run_id)
        record = CoSignatures(peer_id=self.peer_id, signatures=list(signatures)[-COSIGNED_KEPT:])
        self._store(f"{run_id}_cosigned", record.dict(), COSIGNED_TTL, False, "this peer's co-signatures")

    def cosignatures(self, run_id: str) -> dict[str, list[CoSignature]]:
        """PeerID -> the signatures it lists (admitted peers only; each signature is checked by its reader
        against the wallet it must come from)."""
        self._ensure_validators(run_id)
        return {r.peer_id: r.signatures for r in self._owned_records(f"{run_id}_cosigned", CoSignatures, admitted=True)}

    # -- published adapters (content-addressed; blocks served over p2p) -----------------------------------------
    def serve_blocks(self, get_blocks: blocks.GetBlocks) -> None:
        """Serve blocks to any peer that asks, from ``get_blocks`` (a store's; see swarm/blocks.py)."""
        blocks.serve(self.dht, get_blocks)

    def blocks_from(self, peer_id: str) -> blocks.GetBlocks:
        """A verified-later ``get_blocks`` that asks ``peer_id``."""
        return blocks.blocks_from(self.dht, peer_id)

    def publish_adapters(self, run_id: str, adapters: Sequence[PublishedAdapter], wait: bool = True,
                         keeper: bool = False) -> None:  # fmt: skip
        """(Re)publish this peer's adapter list (the last ADAPTERS_KEPT), signed by its key."""
        self._ensure_validators(run_id)
        record = PublishedAdapters(peer_id=self.peer_id, adapters=list(adapters)[-ADAPTERS_KEPT:], keeper=keeper)
        self._store(f"{run_id}_adapters", record.dict(), ADAPTERS_TTL, wait, "the published adapter record")

    def adapter_records(self, run_id: str) -> list[PublishedAdapters]:
        self._ensure_validators(run_id)
        return self._owned_records(f"{run_id}_adapters", PublishedAdapters, admitted=True)

    def published_adapters(self, run_id: str) -> list[tuple[str, PublishedAdapter]]:
        """(publisher PeerID, adapter) pairs, newest epoch first."""
        pairs = [(r.peer_id, a) for r in self.adapter_records(run_id) for a in r.adapters]
        return sorted(pairs, key=lambda pa: (-pa[1].epoch, -pa[1].time))

    def shutdown(self, timeout: Optional[float] = None) -> None:
        """Stop the DHT process and its p2pd. With ``timeout`` (a peer asked to stop), all of it within about that
        long: what still runs then is killed. p2pd closes its connections when it stops, and with a groupmate that
        no longer reads (a frozen machine) that took over 5 s while the DHT process waited for it (test_swarm,
        Ctrl-C during a round)."""
        if not self.is_alive():
            return
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> float:  # (with a deadline)
            return max(0.1, deadline - time.monotonic())

        try:
            dht = psutil.Process(self.dht.pid)
            processes = [dht, *dht.children(recursive=True)]  # with its p2pd
        except psutil.Error:
            processes = []
        try:  # the healing loop first: a task left pending in the DHT process is reported when it stops
            wait = STOP_HEALING_TIMEOUT if deadline is None else min(STOP_HEALING_TIMEOUT, timeout / 4)
            self.dht.run_coroutine(stop_healing, return_future=True).result(wait)
        except Exception:  # a DHT process that no longer answers in time is stopped all the same
            pass
        if deadline is not None:
            self.dht.shutdown_timeout = 0.7 * left()  # then terminated; the rest of the time for its p2pd to end
        self.dht.shutdown()
        if deadline is not None:
            _gone, alive = psutil.wait_procs(processes, timeout=left())
            for process in alive:
                try:
                    process.kill()
                except psutil.Error:
                    pass
            psutil.wait_procs(alive, timeout=0.2)


@lru_cache(maxsize=1024)  # each progress fetch reads every record's subkey twice (tracker.ThrottledTracker)
def peer_id_of_owner(subkey: bytes) -> Optional[str]:
    """The libp2p PeerID (base58) of the RSA key in an ``[owner:<ssh-rsa key>]`` record subkey, or None."""
    m = RSASignatureValidator._PUBLIC_KEY_RE.search(subkey) if isinstance(subkey, bytes) else None
    if m is None:
        return None
    try:
        return peer_id_of(serialization.load_ssh_public_key(m.group(1)))
    except Exception:
        return None


def hivemind_key(identity: Identity) -> RSAPrivateKey:
    """hivemind's key object for our identity. hivemind's RSAPrivateKey has no from-bytes constructor; its
    unpickling (``__setstate__`` with the DER bytes) is the one way in that its own code uses."""
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key.__setstate__({"_private_key": identity.private_der()})
    return key


def _spec_id(raw: bytes) -> Optional[str]:
    try:
        spec = RunSpec.from_canonical_bytes(raw)  # bounded: size and nesting are checked before parsing
    except SpecError:
        return None
    return spec.run_id if spec.canonical_bytes() == raw else None


def _check_maddr(flag: str, addr: str) -> None:
    try:
        Multiaddr(addr)
    except Exception:
        raise ConfigError(
            f"{flag} {addr!r} is not a multiaddr. Expected something like /ip4/203.0.113.5/tcp/31337/p2p/12D3Koo..."
        ) from None



def peer_id_of_key(public_key) -> str:
    """The libp2p PeerID (base58) of a hivemind RSAPublicKey."""
    return peer_id_of(serialization.load_ssh_public_key(public_key.to_bytes()))
