"""``Run.contribute()``: this machine trains as a peer of the run, in a separate OS process running
``python -m atlas_swarm.peer`` (exactly what a hobbyist runs; started by atlas_swarm.launch), so the notebook kernel
stays responsive and a crash or a stop in one cannot take the other down. Its JSON events are read back from a file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

from atlas_swarm.errors import ConfigError, DataError


def write_data(data, folder: Path) -> str:
    """A path is used as is; a list of strings or row dicts ({"text", "label"}, {"prompt", "completion"} or chat
    {"messages"}: train/data.py checks them) is written to a .jsonl file first."""
    if isinstance(data, (str, os.PathLike)):
        return str(data)
    if not isinstance(data, (list, tuple)) or not data:
        raise DataError("contribute(data=...) takes a file path, 'builtin:NAME', or a non-empty list of strings or "
                        "{'text': ..., 'label': ...} dicts (or prompt/completion or chat 'messages' dicts).")  # fmt: skip
    rows = [{"text": row} if isinstance(row, str) else row for row in data]
    if not all(isinstance(r, dict) and ({"text", "prompt", "messages"} & set(r)) for r in rows):
        raise DataError("Every row of contribute(data=[...]) must be a string or a dict with 'text' (or 'prompt' and "
                        "'completion', or chat 'messages').")  # fmt: skip
    try:
        lines = "".join(json.dumps(r) + "\n" for r in rows)
    except (TypeError, ValueError) as e:
        raise DataError(f"A row of contribute(data=[...]) is not JSON: {e}") from None
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "data.jsonl"
    path.write_text(lines)
    return str(path)


def peer_args(run_id: str, initial_peers: Sequence[str], data: str, batch_size: Optional[int],
              max_epochs: Optional[int], publish_every: int, base_model: Optional[str], threads: Optional[int],
              extra: Sequence[str]) -> list[str]:  # fmt: skip
    if not initial_peers:
        raise ConfigError("contribute() needs the run's swarm: call run.launch() or Run.attach(...) first.")
    args = ["--run", run_id, "--initial-peers", *initial_peers, "--data", data, "--publish-every", str(publish_every),
            "--host-maddrs", "/ip4/127.0.0.1/tcp/0" if all("/127.0.0.1/" in a for a in initial_peers)
            else "/ip4/0.0.0.0/tcp/0"]  # fmt: skip
    for flag, value in (("--batch-size", batch_size), ("--max-epochs", max_epochs), ("--base-model", base_model),
                        ("--threads", threads)):  # fmt: skip
        if value is not None:
            args += [flag, str(value)]
    return args + list(extra)
