"""Shared fixtures: a tiny random Llama built once per session, run specs that use it, and peer cleanup."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import psutil
import pytest

from atlas_swarm.devnet.tiny_model import build_tiny_model
from atlas_swarm.train.builtin import chatterbot_topics

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return [row["text"] for row in chatterbot_topics("train")]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, corpus) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), corpus)


def write_spec(path: Path, base: str, trainer: str = "", trust: dict | None = None, **averaging) -> Path:
    # matchmaking_time: on a loaded 2-core machine peers reach an epoch boundary up to ~1 s apart
    avg = {"target_batch_size": 32, "matchmaking_time": 2.0, "averaging_timeout": 15.0, "average_state_every": 2}
    avg.update(averaging)
    path.write_text(
        """name = "tiny-test"
"""
        + (f'trainer = "{trainer}"\n' if trainer else "")
        + f"""[model]
base = "{base}"
task = "causal-lm"
max_length = 48
[lora]
r = 4
alpha = 8
target_modules = ["q_proj", "v_proj"]
[optimizer]
name = "adamw"
lr = 0.01
[averaging]
"""
        + "\n".join(f"{k} = {v!r}" for k, v in avg.items())
        + "\n"
        + ("[trust]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in trust.items()) if trust else "")
    )
    return path


@pytest.fixture
def tiny_spec(tmp_path, tiny_model) -> Path:
    return write_spec(tmp_path / "spec.toml", str(tiny_model))


@pytest.fixture
def text_data(tmp_path, corpus) -> Path:
    path = tmp_path / "data.txt"
    path.write_text("\n".join(corpus[:600]))
    return path


@pytest.fixture(autouse=True)
def no_stray_p2pd():
    """Fail a test that leaves p2pd daemons behind (and kill them, so the next test starts clean)."""
    before = {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "p2pd"}
    yield
    deadline = time.monotonic() + 10
    while True:
        stray = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "p2pd" and p.pid not in before]
        if not stray or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for p in stray:
        try:
            p.kill()
        except psutil.Error:
            pass
    assert not stray, f"stray p2pd processes left behind: {[(p.pid, _owner(p)) for p in stray]}"


def _owner(p: psutil.Process) -> str:
    """Who started a stray p2pd (its parent's command line), for the failure message."""
    try:
        parent = psutil.Process(p.info.get("ppid") or p.ppid())
        return " ".join(parent.cmdline())[-120:]
    except psutil.Error:
        return "its parent is gone (the DHT process was terminated the hard way)"
