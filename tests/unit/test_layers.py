"""The package's layers, strictly downward: each part imports only parts listed before it (and itself), at module
level or inside a function alike, and nothing outside ``swarm/`` imports hivemind. README "Layout" draws the map."""

import ast
from pathlib import Path

import atlas_swarm

ROOT = Path(atlas_swarm.__file__).parent

# bottom first: pure definitions, then the pieces that know one thing each, then the network, then what composes them
LAYERS = [
    "errors", "encoding", "majority", "config",    # definitions: no atlas imports but errors/config
    "admission",                                   # who may train, which claims to follow (pure)
    "identity", "proofs", "model", "train", "storage",  # one concern each, no network
    "devnet",                                      # local services for demo/tests/benchmarks
    "swarm",                                       # the only hivemind user
    "cli", "peer_args",                            # the entry points' shared wrapper (quiets hivemind); peer flags
    "checkpoints", "chain",                        # publish/keep adapters; the staking contract
    "ui", "stopping", "launch", "gatekeeper",      # what a peer's user sees; how it stops; starting peers; admission
    "monitor", "notebook", "peer_state", "peer", "bootstrap",  # what users run (peer_state: the peer's shared state)
    "serve",                                       # serving a run's adapters (uses the notebook's Run)
    "__init__",
]


def _part(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name


def test_every_import_goes_down():
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        part = _part(path)
        assert part in LAYERS, f"{path}: add {part!r} to LAYERS (where it sits in the map)"
        for line, module in _imports(path):
            if not module.startswith("atlas_swarm."):
                continue
            target = module.split(".")[1]
            if target != part and LAYERS.index(target) > LAYERS.index(part):
                wrong.append(f"{path.relative_to(ROOT)}:{line} ({part}) imports {module} ({target}, a layer above)")
    assert not wrong, "\n".join(wrong)


def test_hivemind_only_in_swarm():
    outside = [f"{path.relative_to(ROOT)}:{line}" for path in sorted(ROOT.rglob("*.py")) if _part(path) != "swarm"
               for line, module in _imports(path) if module.split(".")[0] == "hivemind"]  # fmt: skip
    assert not outside, outside
