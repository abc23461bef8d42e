"""The example notebook, executed headless in a real Jupyter kernel (nbclient): launch, contribute, watch, fetch the
published adapter (verified by CID), evaluate. The executed copy is kept in test-artifacts/ for inspection."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def outputs_of(cell) -> str:
    return "\n".join(o.get("text", "") or o.get("data", {}).get("text/plain", "") for o in cell.get("outputs", []))


def test_quickstart_notebook_runs_end_to_end(tmp_path, tiny_model, monkeypatch):
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    monkeypatch.setenv("ATLAS_WORKDIR", str(tmp_path))
    monkeypatch.setenv("ATLAS_BASE_MODEL", str(tiny_model))
    monkeypatch.setenv("ATLAS_EPOCHS", "10")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    client = NotebookClient(nb, timeout=400, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()  # raises CellExecutionError (with the cell's traceback) if any cell fails
    finally:
        artifacts = ROOT / "test-artifacts"
        artifacts.mkdir(exist_ok=True)
        nbformat.write(nb, artifacts / "quickstart.executed.ipynb")

    code = [c for c in nb.cells if c.cell_type == "code"]
    by_source = {c.source.split("\n")[0]: c for c in code}
    launch = outputs_of(by_source['print(run.launch(host_maddrs=["/ip4/127.0.0.1/tcp/0"]))'])
    assert "python -m atlas_swarm.peer --initial-peers /ip4/127.0.0.1/" in launch and "--run notebook-demo-" in launch

    watch = by_source["view = run.watch(until_epoch=EPOCHS, timeout=300, every=0.5)"]
    kinds = {k for o in watch.outputs for k in o.get("data", {})}
    assert "application/vnd.jupyter.widget-view+json" in kinds  # the tqdm.notebook bar
    assert "image/png" in kinds  # the matplotlib loss plot, updated in place

    status = by_source["run.status()"].outputs[0]["data"]
    assert "text/html" in status  # a pandas DataFrame
    assert " 10 " in status["text/plain"]  # the peer reached epoch 10 (and is leaving, or has left)
    assert " left " in status["text/plain"] or " training " in status["text/plain"]

    published = ast.literal_eval(outputs_of(by_source["run.published()[:3]"]))
    assert published and published[0]["epoch"] == 10 and published[0]["cid"].startswith("bafy")
    assert "PeftModelForCausalLM" in outputs_of(by_source["model = run.adapter()  # a ready PeftModel; run.adapter(load=False) gives the folder instead"])

    scores = ast.literal_eval(outputs_of(by_source[next(s for s in by_source if s.startswith("scores ="))]))
    assert scores["epoch"] == 10 and scores["examples"] == 80
    assert scores["after"]["loss"] < scores["before"]["loss"]

    assert "ChainUnavailable - Not available without a chain" in outputs_of(by_source["try:"])
    # the adapter is kept in the notebook's own store, verified: its folder hashes to the published CID
    from atlas_swarm.storage import cid_of_folder

    fetched = tmp_path / "run" / "adapters" / published[0]["cid"]
    assert cid_of_folder(fetched) == published[0]["cid"]
    assert not [p for p in os.listdir(tmp_path / "run" / "peers" / "peer-0") if p.startswith(".")]
