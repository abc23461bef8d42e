"""The Solidity side: committed artifacts equal a fresh solc-js compile, and the forge suite (fuzzed, 256 runs per
fuzz test) passes. Both need the npm toolchain that scripts/test.sh installs (scripts/npm_deps.sh)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
FORGE = ROOT / "contracts" / "node_modules" / "@foundry-rs" / "forge-linux-amd64" / "bin" / "forge"


def test_committed_artifacts_match_a_fresh_compile():
    proc = subprocess.run([sys.executable, "scripts/compile_contracts.py", "--check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_forge_suite_passes_with_fuzzing():
    assert FORGE.exists(), "run scripts/npm_deps.sh first"
    proc = subprocess.run([str(FORGE), "test", "--offline", "--use", "./bin/solc"], cwd=ROOT / "contracts",
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    passed = re.search(r"(\d+) tests passed, 0 failed, 0 skipped", out)
    assert passed and int(passed.group(1)) >= 45, out[-2000:]
    fuzz_runs = [int(n) for n in re.findall(r"testFuzz_\w+\([^)]*\) \(runs: (\d+),", out)]
    assert fuzz_runs and min(fuzz_runs) >= 256, "every fuzz test runs at least 256 cases"
    # escrow conservation and "nobody takes out more than it put in plus what it earned", over random call sequences
    invariants = re.findall(r"\[PASS\] (invariant_\w+)\(\) \(runs: (\d+), calls: (\d+), reverts: 0\)", out)
    assert {name for name, _, _ in invariants} == {"invariant_BalanceEqualsWhatIsOwed",
                                                   "invariant_NobodyTakesOutMoreThanPutInPlusCredited"}, out[-2000:]
    assert all(int(runs) >= 64 and int(calls) >= 4096 for _, runs, calls in invariants)
    # every attack of the 186506a security review on the contract is a story in AtlasStakingAttacks.t.sol
    for attack in ("SelfSlashIsAlwaysALoss", "SquatterCannotTakeTheRunOrItsFunding", "RelayedReceiptDoesNotSinkTheBatch",
                   "ThirdPartyCannotLockAPeerId", "ReceiptsQueuedAtCloseArePaidForAWindow"):
        assert re.search(rf"\[PASS\] test(Fuzz)?_{attack}\(", out), attack
    # and every way to be paid without witnessed work (issue 19) is refused in AtlasStakingReceipts.t.sol
    for refused in ("RevertEpochsAheadOfTheRunsClock", "RevertMinoritySignatures", "RevertNonMembersSignature",
                    "RevertSignaturesOfAnotherRunChainOrContractOrOtherWeights", "UnstakedOrUnboundMembersNeitherCountNorArePaid",
                    "FlaggedMemberIsPaidNothing", "ReplayedReceiptPaysNobodyTwice", "ColludingPairIsBoundedByTheRunsPace",
                    "TwoDifferentReceiptsForOneEpochAreSlashable", "BogusCheckpointIsReplacedByMoreVotesWithinItsWindow",
                    "CheckpointNeedsAMajorityOfThePeersPaidForTheEpochBefore"):
        assert re.search(rf"\[PASS\] test(Fuzz)?_{refused}\(", out), refused
