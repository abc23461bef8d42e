"""The notebook API's checks that need no swarm: spec building, clear errors for calls made too early or without a
chain, data handed over as Python lists, and the text fallback of watch()."""

from __future__ import annotations

import io
import json

import pytest

from atlas_swarm import Run
from atlas_swarm.errors import ChainUnavailable, ConfigError, DataError, SpecError
from atlas_swarm.notebook.contribute import write_data
from atlas_swarm.notebook.display import Display, line, sparkline


def test_create_builds_a_valid_spec_with_default_lora_targets(tiny_model):
    run = Run.create(tiny_model, "causal-lm", name="nb-test", target_batch_size=64, lr=0.01)

    assert run.spec.lora.target_modules == ("q_proj", "v_proj")  # a Llama's attention projections
    assert run.spec.averaging.target_batch_size == 64
    assert run.run_id.startswith("nb-test-") and run.run_id == Run.create(
        tiny_model, "causal-lm", name="nb-test", target_batch_size=64, lr=0.01).run_id  # fmt: skip


@pytest.mark.parametrize("kwargs, field", [
    ({"lr": 5.0}, "optimizer.lr"),
    ({"target_batch_size": 0}, "averaging.target_batch_size"),
    ({"name": "Bad Name"}, "name"),
    ({"task": "translation"}, "model.task"),
    ({"lora": {"r": 0}}, "lora.r"),
    ({"matchmaking_time": 5.0, "averaging_timeout": 2.0}, "averaging.averaging_timeout"),
])  # fmt: skip
def test_create_names_the_bad_field(tiny_model, kwargs, field):
    with pytest.raises(SpecError, match=f"'{field}'"):
        Run.create(tiny_model, **kwargs)


def test_create_asks_for_targets_when_the_model_type_is_unknown(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mystery"}))
    with pytest.raises(SpecError, match="target_modules"):
        Run.create(tmp_path)


def test_calls_before_launch_and_without_a_chain_say_what_to_do(tiny_model, tmp_path):
    run = Run.create(tiny_model, workdir=tmp_path)
    for call in (run.status, run.watch, lambda: run.contribute(["hello"]), run.adapter, run.published):
        with pytest.raises(ConfigError, match="launch"):
            call()
    with pytest.raises(ChainUnavailable, match="connect_chain"):
        run.fund(1.0)
    with pytest.raises(ChainUnavailable, match="connect_chain"):
        run.rewards()


def test_attach_refuses_a_malformed_run_id():
    with pytest.raises(ConfigError, match="not a run id"):
        Run.attach("my run", ["/ip4/127.0.0.1/tcp/1/p2p/QmNiSiAxqzFuVVvNijw1W31SMsCxtKukPE7PYZhjEgqxbk"])


def test_data_lists_become_jsonl_and_bad_rows_are_refused(tmp_path):
    path = write_data(["first text", {"text": "second", "label": "x"}], tmp_path)
    assert [json.loads(x) for x in open(path)] == [{"text": "first text"}, {"text": "second", "label": "x"}]
    assert write_data("builtin:chatterbot-topics", tmp_path) == "builtin:chatterbot-topics"
    for bad in ([], [3], [{"label": "no text"}], 42, [{"text": "x", "when": object()}]):
        with pytest.raises(DataError):
            write_data(bad, tmp_path)


def test_a_causal_lm_run_takes_chat_and_prompt_completion_rows_from_the_notebook(tiny_model, tmp_path):
    from atlas_swarm.train.data import load_examples

    run = Run.create(tiny_model, "causal-lm", name="nb-chat")
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"prompt": "2+2=", "completion": "4"}, "plain text"]  # fmt: skip
    examples = load_examples(write_data(rows, tmp_path), run.spec)
    assert [e.messages is not None for e in examples] == [True, False, False]
    assert (examples[1].prompt, examples[1].text, examples[2].text) == ("2+2=", "4", "plain text")


def test_watch_degrades_to_text_lines_outside_jupyter():
    view = {"run_id": "r-0123456789abcdef", "epoch": 2, "peers": [{}, {}], "samples_per_second": 12.5,
            "samples": 10, "target": 32, "loss": 3.25, "history": [{"loss": 4.0}, {"loss": 3.5}, {"loss": 3.25}]}  # fmt: skip
    out = io.StringIO()
    display = Display(target_epoch=5, out=out)
    display.update(None)
    display.update(view)
    display.update(view)  # unchanged: no second line
    display.close()

    lines = out.getvalue().splitlines()
    assert lines[0].startswith("waiting")
    assert lines[1].startswith("epoch 2/5 | 2 peers | 12.5 samples/s | 10/32 samples this epoch | loss 3.2500 ")
    assert len(lines) == 2
    assert sparkline([4.0, 3.5, 3.25]) == "█▃▁" and line(view, None).startswith("epoch 2 |")


def test_create_takes_the_trust_section(tiny_model):
    run = Run.create(tiny_model, "causal-lm", trust={"admission": "allowlist", "allowlist": ["Qm" + "a" * 44]})
    assert run.spec.trust.admission == "allowlist" and run.spec.trust.rule == "mean"
