"""`python -m atlas_swarm.chain` against anvil, as an operator and a trainer would use it."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from eth_account import Account

from atlas_swarm.devnet.anvil import DEV_KEYS, Anvil
from atlas_swarm.identity import Identity
from tests.conftest import write_spec

pytestmark = pytest.mark.integration


def cli(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "atlas_swarm.chain", *args], capture_output=True, text=True,
                          env=env, timeout=120)  # fmt: skip


def test_operator_commands(tmp_path, tiny_model):
    anvil = Anvil.start()
    try:
        env = dict(os.environ, ATLAS_CHAIN_RPC=anvil.url, ATLAS_WALLET_PASSWORD="pw")
        (tmp_path / "key").write_text(DEV_KEYS[1])
        w = str(tmp_path / "w.json")
        assert cli(env, "new-wallet", w, "--import-key-file", str(tmp_path / "key")).returncode == 0
        out = cli(env, "deploy", "--wallet", w, "--challenge-window", "60", "--unbonding", "120")
        assert out.returncode == 0, out.stderr
        env["ATLAS_STAKING_CONTRACT"] = re.search(r"0x[0-9a-fA-F]{40}", out.stdout).group(0)

        assert "active stake 1.5 ETH" in cli(env, "stake", "1.5", "--wallet", w).stdout
        typo = cli(env, "register", "--wallet", w, "--identity", str(tmp_path / "id.kye"))
        assert typo.returncode == 2 and "does not exist" in typo.stderr  # never binds a brand-new key by accident
        Identity.load_or_create(tmp_path / "id.key")
        assert "bound PeerID" in cli(env, "register", "--wallet", w, "--identity", str(tmp_path / "id.key")).stdout
        assert "already bound" in cli(env, "register", "--wallet", w, "--identity", str(tmp_path / "id.key")).stdout
        me = Account.from_key(DEV_KEYS[1]).address
        not_named = write_spec(tmp_path / "anyone.toml", str(tiny_model))
        bad = cli(env, "create-run", "--wallet", w, "--run-spec", str(not_named), "--reward-per-sample", "0.000001",
                  "--budget", "2")  # fmt: skip
        assert bad.returncode == 2 and f'trainer = \"{me}\"' in bad.stderr  # the spec must name its trainer
        tiny_spec = write_spec(tmp_path / "spec.toml", str(tiny_model), trainer=me)
        out = cli(env, "create-run", "--wallet", w, "--run-spec", str(tiny_spec), "--reward-per-sample", "0.000001",
                  "--budget", "2", "--min-stake", "1")  # fmt: skip
        assert out.returncode == 0 and "open with 2 ETH" in out.stdout, out.stderr
        run_id = re.search(r"run (\S+) open", out.stdout).group(1)
        status = cli(env, "status", "--wallet", w, "--run", run_id).stdout
        assert "stake             1.5 ETH" in status and "budget            2 ETH" in status
        assert "unbonding         0.5 ETH" in cli(env, "unstake", "0.5", "--wallet", w).stdout + cli(
            env, "status", "--wallet", w).stdout

        # mistakes: exit 2 and one line that names the problem and the fix, never a traceback
        bad = cli(env, "claim", "--wallet", w)
        assert bad.returncode == 2 and "NothingToClaim" in bad.stderr and "Traceback" not in bad.stderr
        bad = cli(env, "withdraw", "--wallet", w)
        assert bad.returncode == 2 and "UnbondingNotOver" in bad.stderr
        bad = cli(env, "stake", "lots", "--wallet", w)
        assert bad.returncode == 2 and "not an amount of ether" in bad.stderr
        bad = cli(env, "stake", "1", "--wallet", w, "--wallet-password-file", str(tmp_path / "key"))
        assert bad.returncode == 2 and "Wrong password" in bad.stderr
        other = Account.from_key(DEV_KEYS[2]).address
        bad = cli(env, "fund-run", run_id, "1", "--wallet", w, "--trainer", other)
        assert bad.returncode == 2 and "--not-mine" in bad.stderr  # someone else's run: asked explicitly or not at all
        assert "budget now 3 ETH" in cli(env, "fund-run", run_id, "1", "--wallet", w).stdout
        assert "closing" in cli(env, "close-run", run_id, "--wallet", w).stdout
        bad = cli(env, "reclaim-budget", run_id, "--wallet", w)
        assert bad.returncode == 2 and "RunStillClosing" in bad.stderr  # queued receipts are paid a window first
    finally:
        anvil.stop()
