"""Causal-LM instruction tuning through the CLI: the shipped chat spec, offline with --base-model, on chat rows."""

from __future__ import annotations

import dataclasses

import torch

from atlas_swarm.config import RunSpec
from atlas_swarm.model.lora import load_adapter_weights, load_model
from atlas_swarm.train.data import Batches, load_examples
from atlas_swarm.train.steps import evaluate
from tests.peers import start_peer

CHAT_SPEC = "atlas_swarm/specs/chat-smollm2-135m.toml"


def test_a_peer_tunes_the_shipped_chat_spec_offline_and_lowers_the_assistant_loss(tmp_path, tiny_model):
    # Prepare: the shipped spec names a hub model; this peer has only a local copy (the tiny Llama with ChatML)
    peer = start_peer(tmp_path, "chat", ["--run-spec", CHAT_SPEC, "--base-model", str(tiny_model),
                                         "--data", "builtin:chatterbot-chat", "--batch-size", "8", "--max-steps", "40"])
    # Execute
    try:
        assert peer.wait_exit(180) == 0, peer.tail()
    finally:
        peer.kill()
    # Assert: the run is the shipped spec's, and the held-out dialogs' assistant turns got likelier
    started = peer.events("started")[0]
    spec = RunSpec.from_toml(CHAT_SPEC)
    assert started["run_id"] == spec.run_id
    local = RunSpec.from_dict(dict(spec.to_dict(), model=dict(spec.to_dict()["model"], base=str(tiny_model))))
    model, tokenizer = load_model(local)
    heldout = Batches(load_examples("builtin:chatterbot-chat-heldout", local)[:64], tokenizer, local)
    assert all((t != -100).sum() < len(t) for t in heldout.targets)  # prompts are not trained on
    before = evaluate(model, heldout, "cpu", "causal-lm")["loss"]
    load_adapter_weights(model, peer.out / "adapter")
    after = evaluate(model, heldout, "cpu", "causal-lm")["loss"]
    print(f"held-out assistant loss {before:.3f} -> {after:.3f}")
    assert torch.isfinite(torch.tensor(after)) and after < before, (before, after)
    assert dataclasses.asdict(local.lora) == dataclasses.asdict(spec.lora)
