"""A restarted peer (same --out) keeps its PeerID and resumes from its last checkpoint."""

from __future__ import annotations

import json

import pytest

from tests.peers import killed_at_exit, start_peer

pytestmark = pytest.mark.integration


def test_restart_keeps_the_peer_id_and_resumes_from_the_checkpoint(tmp_path, tiny_spec, text_data):
    args = ["--run-spec", str(tiny_spec), "--data", str(text_data), "--batch-size", "8", "--max-steps", "12"]
    with killed_at_exit([]) as peers:
        # Prepare: a first session trains 12 steps (3 epochs of 32 samples) and stops
        first = start_peer(tmp_path, "peer", args)
        peers.append(first)
        assert first.wait_exit(120) == 0, first.tail()
        before = first.wait_event("stopped", 1)
        saved = json.loads((first.out / "adapter" / "atlas.json").read_text())
        # Execute: the same command again (same --out, so the same identity file and checkpoint)
        first.log_path.rename(first.out / "events-1.jsonl")
        second = start_peer(tmp_path, "peer", args)
        peers.append(second)
        assert second.wait_exit(120) == 0, second.tail()
        # Assert
        resumed = second.wait_event("resumed", 1)
        started = second.wait_event("started", 1)
        assert started["peer_id"] == before["peer_id"]
        assert resumed["epoch"] == saved["epoch"] == before["epoch"] >= 2
        assert second.wait_event("stopped", 1)["samples_total"] == before["samples_total"] + 12 * 8
