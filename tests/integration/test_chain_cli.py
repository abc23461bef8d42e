"""`python -m atlas_swarm.chain` against anvil, as an operator and a trainer would use it."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from atlas_swarm.chain.anvil import DEV_KEYS, Anvil

pytestmark = pytest.mark.integration


def cli(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "atlas_swarm.chain", *args], capture_output=True, text=True,
                          env=env, timeout=120)  # fmt: skip


def test_operator_commands(tmp_path, tiny_spec):
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
        assert "bound PeerID" in cli(env, "register", "--wallet", w, "--identity", str(tmp_path / "id.key")).stdout
        assert "already bound" in cli(env, "register", "--wallet", w, "--identity", str(tmp_path / "id.key")).stdout
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
        assert "refunded 2 ETH" in cli(env, "close-run", run_id, "--wallet", w).stdout
    finally:
        anvil.stop()
