#!/usr/bin/env python3
"""Compile contracts/src with solc-js (contracts/bin/solc) into the committed artifacts in contracts/build/.

    python scripts/compile_contracts.py          # (re)write contracts/build/*.json
    python scripts/compile_contracts.py --check  # recompile and fail if the committed artifacts differ (CI does this)

Needs the npm toolchain in contracts/node_modules (`scripts/npm_deps.sh` installs it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONTRACTS = ROOT / "contracts"
BUILD = CONTRACTS / "build"
# The Python chain client ships the same files inside the package (a wheel cannot reach contracts/).
PACKAGED = ROOT / "atlas_swarm" / "chain" / "artifacts"
# Contracts whose ABI + bytecode are shipped for the Python client (file stem -> contract name).
ARTIFACTS = {"AtlasStaking": "AtlasStaking", "IAtlasStaking": "IAtlasStaking"}
# Benchmark-only contracts (contracts/bench): built into contracts/build/ for scripts/bench_gas.py, not packaged.
BENCH = {"NaiveProof": "NaiveProof"}
SETTINGS = {
    "evmVersion": "cancun",
    "optimizer": {"enabled": True, "runs": 1000},
    "remappings": ["@openzeppelin/=node_modules/@openzeppelin/"],
    "outputSelection": {"*": {"*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"]}},
}


def compile_all() -> dict[str, dict]:
    sources = {f"{d}/{p.name}": {"content": p.read_text()}
               for d in ("src", "bench") for p in sorted((CONTRACTS / d).glob("*.sol"))}  # fmt: skip
    request = {"language": "Solidity", "sources": sources, "settings": SETTINGS}
    proc = subprocess.run(
        ["node", str(CONTRACTS / "bin" / "solc"), "--standard-json"],
        input=json.dumps(request), capture_output=True, text=True, cwd=CONTRACTS, check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"solc-js failed (exit {proc.returncode}): {proc.stderr.strip()}")
    output = json.loads(proc.stdout)
    errors = [e for e in output.get("errors", []) if e["severity"] == "error"]
    for e in output.get("errors", []):
        print(e["formattedMessage"], file=sys.stderr)
    if errors:
        raise SystemExit(f"{len(errors)} compile error(s)")
    version = subprocess.run(["node", str(CONTRACTS / "bin" / "solc"), "--version"], capture_output=True,
                             text=True, check=True).stdout.split("Version: ")[1].strip()
    artifacts = {}
    for stem, name in {**ARTIFACTS, **BENCH}.items():
        c = output["contracts"][f"{'bench' if stem in BENCH else 'src'}/{stem}.sol"][name]
        artifacts[stem] = {
            "contractName": name,
            "compiler": {"solc": version, "settings": {k: v for k, v in SETTINGS.items() if k != "outputSelection"}},
            "abi": c["abi"],
            "bytecode": "0x" + c["evm"]["bytecode"]["object"],
            "deployedBytecode": "0x" + c["evm"]["deployedBytecode"]["object"],
        }
    return artifacts


def render(artifact: dict) -> str:
    return json.dumps(artifact, indent=1, sort_keys=True) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if contracts/build differs from a fresh compile")
    args = parser.parse_args()
    artifacts = compile_all()
    stale = []
    for stem, artifact in artifacts.items():
        text = render(artifact)
        for path in (BUILD / f"{stem}.json",) + (() if stem in BENCH else (PACKAGED / f"{stem}.json",)):
            if args.check:
                if not path.exists() or path.read_text() != text:
                    stale.append(str(path.relative_to(ROOT)))
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                print(f"wrote {path.relative_to(ROOT)} ({len(artifact['deployedBytecode']) // 2 - 1} bytes deployed)")
    if stale:
        print("committed artifacts differ from a fresh compile: " + ", ".join(stale)
              + "\nrun `python scripts/compile_contracts.py` and commit contracts/build/ and atlas_swarm/chain/artifacts/", file=sys.stderr)
        return 1
    if args.check:
        print("contracts/build and atlas_swarm/chain/artifacts match a fresh compile")
    return 0


if __name__ == "__main__":
    sys.exit(main())
