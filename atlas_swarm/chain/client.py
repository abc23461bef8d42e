"""The staking contract from Python: web3.py + eth-account, transactions signed locally, reverts decoded.

``StakingClient`` is the only class that talks to a chain. Every failure becomes an atlas error:
``TxReverted`` (the contract said no: permanent, its custom error decoded by name with arguments and a fix),
``ChainUnreachable`` (the RPC did not answer: transient) or ``ChainError`` (anything else the node reports).
Works with any EVM node by RPC URL (anvil, a public chain) and with eth-tester in-process (tests).
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from importlib import resources
from typing import Iterable, Optional, Sequence

from eth_abi import decode as abi_decode
from eth_utils import function_abi_to_4byte_selector, to_checksum_address
from web3 import Web3
from web3.exceptions import MethodUnavailable

from atlas_swarm.errors import ChainError, ChainUnreachable, ConfigError, TxReverted
from atlas_swarm.proofs.eip712 import Domain, chain_run_id, peer_id_hash, run_tag
from atlas_swarm.proofs.receipt import RECEIPT_TYPEHASH
from atlas_swarm.proofs.receipt import Receipt as GroupReceipt
from atlas_swarm.storage.cid import encode
from atlas_swarm.storage.dag import parse_cid

ETHER = 10**18
TX_TIMEOUT = 60.0

# What to do about each revert, shown after the decoded error.
CID_V1_DAG_PB = bytes([1, 0x70, 0x12, 0x20])  # CIDv1, dag-pb, sha2-256, 32 bytes: what the chain leaves out

FIXES = {
    "InsufficientStake": "stake more: python -m atlas_swarm.chain stake AMOUNT_ETH",
    "PeerNotRegistered": "bind your PeerID first: python -m atlas_swarm.chain register --identity OUT/identity.key",
    "AlreadyRegistered": "this address is already bound to a PeerID (one per address); use another wallet",
    "UnknownRun": "the trainer has not created this run on chain yet (python -m atlas_swarm.chain create-run)",
    "RunClosed": "the trainer closed this run (receipts were paid until its closing window ended)",
    "RunStillClosing": "the run's closing window (one challenge window) is not over yet; reclaim after it",
    "RunNotFunded": "only equivocation in a run that was funded can be slashed",
    "NotTrainer": "only the run's trainer (the address its id was derived from) can do that",
    "BudgetExhausted": "the run's escrow is empty; the trainer can add funds with `fund-run`",
    "NothingToClaim": "no rewards are past their challenge window yet",
    "UnbondingNotOver": "wait until the unbonding period is over",
    "EpochAhead": "the run's epochs may not advance faster than its minEpochSeconds: wait, it is paid later",
    "NoQuorum": "more than half of the members listed must sign (each bound to its PeerID and staked)",
    "CheckpointFinal": "the recorded checkpoint's challenge window is over",
    "NotMoreVotes": "a recorded checkpoint is replaced only by one with more votes",
    "NotAVoter": "voters are listed sorted, once each, and each was paid for the epoch before the checkpoint",
}


def eth(amount: str | float | int) -> int:
    """Ether -> wei, exactly: '0.5', 0.5 and 1e-6 (a float is read as the decimal it prints as, not its binary value)."""
    try:
        value = Decimal(str(amount))
    except InvalidOperation:
        raise ConfigError(f"{amount!r} is not an amount of ether (e.g. 0.5).") from None
    if value < 0:
        raise ConfigError(f"{amount!r}: amounts cannot be negative.")
    return int(value * ETHER)


@lru_cache(maxsize=None)
def artifact(name: str = "AtlasStaking") -> dict:
    """ABI + bytecode compiled from contracts/src (scripts/compile_contracts.py keeps them in sync)."""
    return json.loads(resources.files("atlas_swarm.chain").joinpath(f"artifacts/{name}.json").read_text())


@lru_cache(maxsize=None)
def _error_abis() -> dict[bytes, dict]:
    return {function_abi_to_4byte_selector(e): e for e in artifact()["abi"] if e["type"] == "error"}


def decode_revert(data: bytes) -> tuple[str, tuple, str]:
    """(error name, arguments, readable text) of revert data from the contract (a custom error or Error(string))."""
    if len(data) >= 4 and data[:4] == bytes.fromhex("08c379a0"):
        (reason,) = abi_decode(["string"], data[4:])
        return "Error", (reason,), reason
    if len(data) >= 4 and data[:4] == bytes.fromhex("4e487b71"):
        (code,) = abi_decode(["uint256"], data[4:])
        return "Panic", (code,), f"Panic(0x{code:02x})"
    abi = _error_abis().get(bytes(data[:4]))
    if abi is None:
        return "Unknown", (), f"an unknown revert (data 0x{bytes(data).hex()})" if data else "a revert without reason"
    values = tuple(to_checksum_address(v) if i["type"] == "address" else v
                   for i, v in zip(abi["inputs"], abi_decode([i["type"] for i in abi["inputs"]], data[4:])))
    shown = ", ".join(f"{i['name']}={_show(v)}" for i, v in zip(abi["inputs"], values))
    return abi["name"], tuple(values), f"{abi['name']}({shown})"


def _show(v) -> str:
    if isinstance(v, bytes):
        return "0x" + v.hex()
    return str(v)


def _revert_data(e: BaseException) -> Optional[bytes]:
    """Revert bytes from web3 (ContractCustomError/ContractLogicError .data) or eth-tester (TransactionFailed)."""
    data = getattr(e, "data", None)
    if isinstance(data, str) and data.startswith("0x"):
        return bytes.fromhex(data[2:])
    if isinstance(data, bytes):
        return data
    for arg in getattr(e, "args", ()):
        if isinstance(arg, bytes):
            return arg
        if isinstance(arg, str):
            if arg.startswith("execution reverted: b'") or arg.startswith('execution reverted: b"'):
                return ast.literal_eval(arg[len("execution reverted: "):])
            if arg.startswith("0x") and all(c in "0123456789abcdefABCDEF" for c in arg[2:]):
                return bytes.fromhex(arg[2:])
    return None


def _is_unreachable(e: BaseException) -> bool:
    import requests

    return isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError,
                          TimeoutError))  # fmt: skip


@dataclass(frozen=True)
class Receipt:
    tx_hash: str
    gas_used: int
    block: int
    events: tuple[str, ...]


class StakingClient:
    """One deployment of AtlasStaking, used by one local account (or read-only with ``account=None``)."""

    def __init__(self, w3: Web3, address: str, account=None):
        self.w3 = w3
        self.address = to_checksum_address(address)
        self.contract = w3.eth.contract(address=self.address, abi=artifact()["abi"])
        self.account = account
        self._chain_id: Optional[int] = None
        self._window: Optional[int] = None

    # -- connecting ---------------------------------------------------------------------------------------------
    @staticmethod
    def web3(rpc_url: str, timeout: float = 10.0) -> Web3:
        if not rpc_url.startswith(("http://", "https://")):
            raise ChainError(f"--chain-rpc {rpc_url!r} is not an http(s) URL (e.g. http://127.0.0.1:8545).")
        w3 = Web3(Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": timeout}))
        try:
            w3.eth.chain_id
        except Exception as e:
            raise ChainUnreachable(f"The chain RPC at {rpc_url} did not answer ({type(e).__name__}). Is the node "
                                   f"running and the URL right?") from None  # fmt: skip
        return w3

    @classmethod
    def connect(cls, w3: Web3, address: str, account=None) -> "StakingClient":
        """Check that ``address`` holds the AtlasStaking contract on this chain."""
        try:
            address = to_checksum_address(address)
        except ValueError:
            raise ChainError(f"--staking-contract {address!r} is not an address (0x followed by 40 hex digits).") from None
        client = cls(w3, address, account)
        code = cls._call(lambda: w3.eth.get_code(address))
        # immutables make the runtime code differ per deployment: identify the contract by its receipt type instead
        try:
            ok = bool(code) and client.contract.functions.RECEIPT_TYPEHASH().call() == RECEIPT_TYPEHASH
        except Exception:
            ok = False
        if not ok:
            what = "no contract" if not code else "a different contract"
            raise ChainError(f"There is {what} at {address} on chain {w3.eth.chain_id}, not AtlasStaking. Check "
                             f"--staking-contract and --chain-rpc.")  # fmt: skip
        return client

    @classmethod
    def deploy(cls, w3: Web3, account, unbonding_period: int = 7 * 86400, challenge_window: int = 86400,
               slash_bps: int = 5000, bounty_bps: int = 2000) -> "StakingClient":  # fmt: skip
        factory = w3.eth.contract(abi=artifact()["abi"], bytecode=artifact()["bytecode"])
        probe = cls(w3, "0x" + "00" * 20, account)
        receipt = probe._send(factory.constructor(unbonding_period, challenge_window, slash_bps, bounty_bps))
        address = w3.eth.get_transaction_receipt(receipt.tx_hash)["contractAddress"]
        return cls(w3, address, account)

    @property
    def chain_id(self) -> int:
        if self._chain_id is None:
            self._chain_id = self._call(lambda: self.w3.eth.chain_id)
        return self._chain_id

    @property
    def domain(self) -> Domain:
        return Domain(self.chain_id, self.address)

    # -- views --------------------------------------------------------------------------------------------------
    def reputation(self, address: str) -> dict:
        r = self._call(lambda: self.contract.functions.reputationOf(to_checksum_address(address)).call())
        keys = ("peer_id_hash", "stake", "unbonding", "unbonding_ready_at", "verified_samples", "epochs_contributed",
                "times_slashed", "claimable", "pending")  # fmt: skip
        return dict(zip(keys, r))

    def get_run(self, run: bytes) -> Optional[dict]:
        """The run with on-chain id ``run`` (chain_run_id(run_id, trainer)), or None. ``closing``: the trainer
        called closeRun (receipts are paid until ``closes_at``, unix time)."""
        r = self._call(lambda: self.contract.functions.getRun(run).call())
        keys = ("trainer", "max_samples_per_epoch", "closes_at", "spec_hash", "reward_per_sample", "min_stake",
                "budget", "funded", "samples_per_epoch", "min_epoch_seconds", "created_at")  # fmt: skip
        out = dict(zip(keys, r))
        if int(out["trainer"], 16) == 0:
            return None
        out["closing"] = out["closes_at"] != 0
        return out

    def run_ledger(self, run: bytes, from_block: int = 0) -> dict[str, dict]:
        """Per address, from the run's events: epochs and samples paid, rewards earned, slashes (an epoch settled
        at 0 samples, flagged or over the epoch's samples, is no epoch paid)."""
        rid = run
        events = self.contract.events
        ledger: dict[str, dict] = {}

        def row(peer: str) -> dict:
            return ledger.setdefault(peer, {"epochs": 0, "samples": 0, "reward_wei": 0, "slashed_wei": 0, "slashes": 0})

        paid = self._call(lambda: events.ContributionPaid.get_logs(from_block=from_block,
                                                                   argument_filters={"runId": rid}))  # fmt: skip
        for log in paid:
            r = row(log.args.peer)
            r["epochs"] += log.args.samples > 0
            r["samples"] += log.args.samples
            r["reward_wei"] += log.args.reward
        slashed = self._call(lambda: events.Slashed.get_logs(from_block=from_block, argument_filters={"runId": rid}))
        for log in slashed:
            r = row(log.args.peer)
            r["slashes"] += 1
            r["slashed_wei"] += log.args.slashed
        return ledger

    def peer_id_of(self, address: str) -> Optional[bytes]:
        """The PeerID hash ``address`` registered, or None. Several addresses may name one PeerID (the chain cannot
        check a libp2p key): a binding counts only together with the PeerID's own signature (verified_bindings)."""
        h = self._call(lambda: self.contract.functions.peerIdOf(to_checksum_address(address)).call())
        return None if int.from_bytes(h, "big") == 0 else bytes(h)

    def binds(self, address: str, peer_id: str) -> bool:
        return self.peer_id_of(address) == peer_id_hash(peer_id)

    def checkpoint_of(self, run: bytes, epoch: int) -> Optional[dict]:
        """The checkpoint recorded on chain for (run, epoch), or None: ``cid`` (the adapter folder's CID),
        ``publisher``, ``votes``, ``recorded_at`` and ``final`` (its challenge window is over: nothing replaces it)."""
        fn = self.contract.functions.checkpointOf(run, epoch)
        digest, publisher, votes, recorded_at = self._call(fn.call)
        if int.from_bytes(digest, "big") == 0:
            return None
        if self._window is None:  # immutable: read once per client
            self._window = self._call(lambda: self.contract.functions.CHALLENGE_WINDOW().call())
        window = self._window
        now = self._call(lambda: self.w3.eth.get_block("latest")["timestamp"])
        return {"cid": encode(CID_V1_DAG_PB + digest), "publisher": publisher, "votes": votes,
                "recorded_at": recorded_at, "final": now >= recorded_at + window}  # fmt: skip

    def receipt_digest(self, receipt: GroupReceipt) -> bytes:
        return self._call(lambda: self.contract.functions.receiptDigest(receipt.as_tuple()).call())

    def checkpoint_digest(self, run: bytes, epoch: int, cid_digest: bytes) -> bytes:
        return self._call(lambda: self.contract.functions.checkpointDigest(run, epoch, cid_digest).call())

    def epoch_tally(self, run: bytes, epoch: int) -> dict:
        samples, payees = self._call(lambda: self.contract.functions.epochTally(run, epoch).call())
        return {"samples": samples, "payees": payees}

    def payable_epoch(self, run: bytes) -> int:
        return self._call(lambda: self.contract.functions.payableEpoch(run).call())

    def paid_for(self, run: bytes, address: str, epoch: int) -> bool:
        """Whether ``address`` was settled for (run, epoch) by a receipt: paid, or at 0 samples (flagged, or nothing
        left of the epoch's samples). Settled peers are the epoch's payees and its checkpoint voters."""
        return self._call(lambda: self.contract.functions.paidFor(run, to_checksum_address(address), epoch).call())

    def balance(self, address: Optional[str] = None) -> int:
        return self._call(lambda: self.w3.eth.get_balance(address or self.account.address))

    # -- transactions -------------------------------------------------------------------------------------------
    def stake(self, wei: int) -> Receipt:
        return self._send(self.contract.functions.stake(), value=wei)

    def request_unstake(self, wei: int) -> Receipt:
        return self._send(self.contract.functions.requestUnstake(wei))

    def withdraw(self) -> Receipt:
        return self._send(self.contract.functions.withdraw())

    def record_checkpoint(self, run: bytes, epoch: int, cid: str, votes: dict[str, bytes]) -> Receipt:
        """Record the CIDv1 of the adapter peers hold at ``epoch`` with ``votes`` (address -> signature of
        checkpoint_digest), each voter paid for ``epoch - 1``, more than half of the peers paid for it."""
        voters = sorted(votes, key=lambda a: int(a, 16))
        fn = self.contract.functions.recordCheckpoint(run, epoch, cid_digest(cid),
                                                      [to_checksum_address(v) for v in voters],
                                                      [votes[v] for v in voters])  # fmt: skip
        return self._send(fn)

    def register_peer(self, peer_id: str) -> Receipt:
        return self._send(self.contract.functions.registerPeer(peer_id_hash(peer_id)))

    def create_run(self, run_id: str, spec_hash: bytes, reward_per_sample: int, min_stake: int,
                   max_samples_per_epoch: int, budget: int, samples_per_epoch: Optional[int] = None,
                   min_epoch_seconds: int = 1) -> Receipt:  # fmt: skip
        """Open run ``run_id`` with this account as its trainer; its on-chain id is chain_run_id(run_id, account).
        All receipts of one epoch are paid at most ``samples_per_epoch`` samples together (default: 8 peers at
        ``max_samples_per_epoch``), and epoch e is paid from creation + e x ``min_epoch_seconds`` on."""
        terms = (reward_per_sample, min_stake, max_samples_per_epoch,
                 samples_per_epoch if samples_per_epoch is not None else 8 * max_samples_per_epoch, min_epoch_seconds)
        return self._send(self.contract.functions.createRun(run_tag(run_id), spec_hash, terms), value=budget)

    def run_of(self, run_id: str, trainer: Optional[str] = None) -> bytes:
        """On-chain id of ``run_id`` opened by ``trainer`` (default: this client's account)."""
        if trainer is None:
            if self.account is None:
                raise ChainError(f"Whose run {run_id}? Name its trainer's address (or pass --wallet).")
            trainer = self.account.address
        return chain_run_id(run_id, trainer)

    def fund_run(self, run: bytes, wei: int) -> Receipt:
        return self._send(self.contract.functions.fundRun(run), value=wei)

    def close_run(self, run: bytes) -> Receipt:
        """Start closing: receipts are still paid for one challenge window, then reclaim_budget refunds the rest."""
        return self._send(self.contract.functions.closeRun(run))

    def reclaim_budget(self, run: bytes) -> Receipt:
        return self._send(self.contract.functions.reclaimBudget(run))

    def settle_receipts(self, signed: Sequence[tuple[GroupReceipt, Sequence[bytes]]]) -> Receipt:
        """Settle co-signed receipts (signatures in member order, b"" for a member who did not sign); one receipt:
        settleReceipt, several: settleReceipts. Members paid before are skipped, never paid twice."""
        if len(signed) == 1:
            receipt, sigs = signed[0]
            return self._send(self.contract.functions.settleReceipt(receipt.as_tuple(), list(sigs)))
        fn = self.contract.functions.settleReceipts([r.as_tuple() for r, _ in signed], [list(s) for _, s in signed])
        return self._send(fn)

    def slash_conflicting_receipts(self, a: GroupReceipt, sig_a: bytes, b: GroupReceipt, sig_b: bytes,
                                   peer: str) -> Receipt:  # fmt: skip
        return self._send(self.contract.functions.slashConflictingReceipts(a.as_tuple(), sig_a, b.as_tuple(), sig_b,
                                                                           to_checksum_address(peer)))  # fmt: skip

    def slash_conflicting_votes(self, run: bytes, epoch: int, cid_a: str, sig_a: bytes, cid_b: str, sig_b: bytes,
                                peer: str) -> Receipt:  # fmt: skip
        return self._send(self.contract.functions.slashConflictingVotes(
            run, epoch, cid_digest(cid_a), sig_a, cid_digest(cid_b), sig_b, to_checksum_address(peer)))

    def claim(self) -> Receipt:
        return self._send(self.contract.functions.claim())

    # -- plumbing -----------------------------------------------------------------------------------------------
    @staticmethod
    def _call(fn):
        try:
            return fn()
        except Exception as e:
            raise _translate(e) from None

    def _send(self, fn, value: int = 0) -> Receipt:
        """Estimate (a revert is caught here, before any gas is spent), sign locally, send, wait for the receipt."""
        if self.account is None:
            raise ChainError("This command sends a transaction: pass --wallet KEYFILE.")
        sender = self.account.address
        try:
            gas = _estimate(fn, {"from": sender, "value": value})
            tx = fn.build_transaction({
                "from": sender, "value": value, "gas": int(gas * 1.2) + 10_000, "chainId": self.chain_id,
                "nonce": self.w3.eth.get_transaction_count(sender, "pending"),
            })  # fmt: skip
            signed = self.account.sign_transaction(tx)
            tx_hash = self.w3.eth.send_raw_transaction(signed.raw_transaction)
            receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=TX_TIMEOUT)
        except Exception as e:
            raise _translate(e) from None
        if receipt["status"] != 1:
            raise TxReverted(f"Transaction {tx_hash.hex()} reverted on chain (gas used {receipt['gasUsed']}).",
                             "Unknown")  # fmt: skip
        events = tuple(_event_names(self.contract, receipt))
        return Receipt("0x" + bytes(tx_hash).hex().removeprefix("0x"), receipt["gasUsed"], receipt["blockNumber"], events)


def _estimate(fn, tx: dict) -> int:
    """Gas, estimated against the pending block: the one the transaction joins, at the current time. The default,
    "latest", is the last mined block, whose timestamp on a chain that mines only on demand (anvil) stops while
    nobody sends a transaction: every receipt then looked EpochAhead and none was ever sent (the partition test, 2
    runs in a row). eth-tester has no estimate for a given block: the default there."""
    try:
        return fn.estimate_gas(tx, block_identifier="pending")
    except MethodUnavailable:
        return fn.estimate_gas(tx)


def cid_digest(cid: str) -> bytes:
    """The 32 bytes the chain keeps of an adapter folder's CIDv1 (dag-pb, sha2-256)."""
    raw = parse_cid(cid)
    if raw[:4] != CID_V1_DAG_PB:
        raise ValueError(f"{cid} is not a CIDv1 of a dag-pb folder")
    return raw[4:]


def _event_names(contract, receipt) -> Iterable[str]:
    topics = {}
    for e in contract.abi:
        if e["type"] == "event":
            sig = f"{e['name']}({','.join(i['type'] for i in e['inputs'])})"
            topics[Web3.keccak(text=sig)] = e["name"]
    for log in receipt["logs"]:
        if log["topics"] and bytes(log["topics"][0]) in topics:
            yield topics[bytes(log["topics"][0])]


def _translate(e: BaseException) -> Exception:
    if isinstance(e, (ChainError,)):
        return e
    data = _revert_data(e)
    if data is not None:
        name, args, text = decode_revert(data)
        fix = FIXES.get(name)
        return TxReverted(f"The staking contract refused: {text}" + (f". Fix: {fix}" if fix else ""), name, args)
    if _is_unreachable(e):
        return ChainUnreachable(f"The chain RPC did not answer ({type(e).__name__}: {e}).")
    if type(e).__name__ == "TimeExhausted":
        return ChainUnreachable(f"No receipt within {TX_TIMEOUT:.0f} s ({e}).")
    return ChainError(f"The chain node refused the request: {type(e).__name__}: {e}")
