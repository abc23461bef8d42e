"""Keeps a peer's view of who is admitted to its run current (admission.py decides; swarm/gate.py carries it).

An allowlist of PeerIDs is fixed; wallet addresses in an allowlist admit the PeerIDs their signed bindings name, and
a staked run admits peers bound on chain both ways with a stake of at least the run's ``minStake``: both change, so
they are read again every ``REFRESH_EVERY`` seconds, and ``REFRESH_SOON`` after a record from a PeerID not yet
admitted (a newcomer that just bound its wallet), in a background thread (a slow chain RPC never stalls training).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Optional

from atlas_swarm.admission import admitted_peers
from atlas_swarm.config import RunSpec
from atlas_swarm.errors import NotAdmitted
from atlas_swarm.swarm.gate import Gate

if TYPE_CHECKING:  # web3 takes a second to import: a peer without a chain never does
    from atlas_swarm.chain.session import ChainSession

REFRESH_EVERY = 30.0
REFRESH_SOON = 3.0  # a PeerID not yet admitted asks for a refresh this soon (at most this often): a newcomer's binding
log = logging.getLogger(__name__)


class Gatekeeper:
    def __init__(self, spec: RunSpec, swarm, chain: Optional[ChainSession] = None):
        self.spec, self.swarm, self.chain = spec, swarm, chain
        self.trust = spec.trust
        self.gate = Gate(open_run=self.trust.admission == "open")
        self.refresh_errors = 0
        self._stop, self._soon = threading.Event(), threading.Event()
        self._thread: Optional[threading.Thread] = None
        swarm.admits = self._admits

    def _admits(self, peer_id: str) -> bool:
        if self.gate.admits(peer_id):
            return True
        self._soon.set()  # a newcomer that just bound its wallet should not wait REFRESH_EVERY to be admitted
        return False

    @property
    def dynamic(self) -> bool:
        """Whether the admitted set can change: addresses in an allowlist, or stakes."""
        return self.trust.admission == "staked" or any(p.startswith("0x") for p in self.trust.allowlist)

    def refresh(self) -> None:
        run_id, t = self.spec.run_id, self.trust
        if t.admission == "open":
            return
        bindings, stakes, min_stake = {}, {}, 0
        if t.admission == "staked" and self.chain is None:
            pass  # nobody can be checked without a chain: check_self says what to do
        elif t.admission == "staked":
            from atlas_swarm.chain.session import verified_bindings

            client = self.chain.client
            bindings = verified_bindings(self.swarm, client, run_id)
            run = client.get_run(self.chain.run)
            min_stake = run["min_stake"] if run is not None else 2**256
            stakes = {addr.lower(): (True, client.reputation(addr)["stake"]) for addr in bindings.values()}
        elif self.dynamic:
            bindings = self.swarm.wallet_bindings(run_id)
        self.gate.set_admitted(admitted_peers(t, bindings, stakes, min_stake))

    def check_self(self) -> None:
        """Refuse to start a peer the run would not admit (exit 2 with what to do), rather than let it train alone."""
        t, me = self.trust, self.swarm.peer_id
        if t.admission == "staked" and self.chain is None:
            raise NotAdmitted(f"Run {self.spec.run_id} admits staked peers only: join with --chain-rpc, "
                              f"--staking-contract and --wallet (a wallet with at least the run's minStake).")
        if t.admission == "allowlist" and self.chain is None and me not in t.allowlist:
            raise NotAdmitted(f"Run {self.spec.run_id} is private: this peer's PeerID {me} is not in its allowlist. "
                              f"Ask its trainer to add it (or a wallet address of yours, then join with --wallet).")
        if not self.gate.admits(me):
            raise NotAdmitted(f"Run {self.spec.run_id} does not admit this peer ({me}): "
                              + ("it is not in the run's allowlist, by PeerID or by its wallet's binding."
                                 if t.admission == "allowlist" else "its wallet is not bound both ways or its stake "
                                 "is below the run's minStake."))  # fmt: skip

    def start(self) -> "Gatekeeper":
        self.refresh()
        if self.dynamic:
            self._thread = threading.Thread(target=self._loop, name="atlas-gatekeeper", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._soon.wait(REFRESH_EVERY)
            if self._stop.wait(REFRESH_SOON):  # also the rate limit of refreshes asked for by refusals
                return
            self._soon.clear()
            try:
                self.refresh()
            except Exception as e:  # the last admitted set stays in force; counted, retried
                self.refresh_errors += 1
                log.warning(f"Could not refresh the run's admitted peers: {e}")

    def close(self) -> None:
        self._stop.set()
        self._soon.set()
