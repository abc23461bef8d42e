import json

import pytest

from atlas_swarm.config import RunSpec
from atlas_swarm.errors import DataError
from atlas_swarm.train.builtin import CHATTERBOT_TOPICS, chatterbot_topics, shard_non_iid
from atlas_swarm.train.data import Batches, load_examples

CLS = RunSpec.from_dict({"name": "c", "model": {"base": "m", "task": "sequence-classification", "labels": ["a", "b"]},
                         "lora": {"target_modules": ["q"]}})  # fmt: skip
LM = RunSpec.from_dict({"name": "l", "model": {"base": "m", "task": "causal-lm"}, "lora": {"target_modules": ["q"]}})


def test_jsonl_csv_txt(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "x", "label": "b"}\n\n{"text": "y", "label": 0}\n')
    assert [(e.text, e.label) for e in load_examples(str(tmp_path / "d.jsonl"), CLS)] == [("x", 1), ("y", 0)]
    (tmp_path / "d.csv").write_text("text,label\nhello,a\nbye,1\n")
    assert [e.label for e in load_examples(str(tmp_path / "d.csv"), CLS)] == [0, 1]
    (tmp_path / "d.txt").write_text("one\n\ntwo\n")
    assert [e.text for e in load_examples(str(tmp_path / "d.txt"), LM)] == ["one", "two"]


@pytest.mark.parametrize(
    "name, content, spec, message",
    [
        ("d.jsonl", '{"text": "x", "label": "zzz"}\n', CLS, "label 'zzz'"),
        ("d.jsonl", '{"text": "x", "label": 7}\n', CLS, "index below 2"),
        ("d.jsonl", "not json\n", LM, "d.jsonl:1 is not valid JSON"),
        ("d.jsonl", "[1, 2]\n", LM, "not a JSON object"),
        ("d.csv", "body\nhi\n", LM, "no string 'text' column (columns: body)"),
        ("d.txt", "hi\n", CLS, "has no labels"),
        ("d.parquet", "x", LM, "unknown format"),
        ("d.txt", "", LM, "holds no examples"),
    ],
)
def test_bad_data_is_named(tmp_path, name, content, spec, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_examples(str(tmp_path / name), spec)


def test_missing_file():
    with pytest.raises(DataError, match="does not exist"):
        load_examples("/no/such/file.jsonl", LM)


def test_builtin_splits_are_disjoint_and_shards_partition_the_train_split():
    train, heldout = chatterbot_topics("train"), chatterbot_topics("heldout")
    assert not {r["text"] for r in train} & {r["text"] for r in heldout}
    assert {r["label"] for r in train} == set(CHATTERBOT_TOPICS)
    shards = [shard_non_iid(train, 4, i) for i in range(4)]
    assert sum(len(s) for s in shards) == len(train)
    assert len({id(r) for s in shards for r in s}) == len(train)


def test_batches_pad_and_mask(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    batches = Batches(load_examples("builtin:chatterbot-topics", RunSpec.from_dict(
        {"name": "c", "model": {"base": "m", "task": "causal-lm"}, "lora": {"target_modules": ["q"]}})), tok, LM)
    b = batches.next(4)
    assert b["input_ids"].shape == b["attention_mask"].shape == b["labels"].shape
    assert (b["labels"][b["attention_mask"] == 0] == -100).all()


def test_causal_examples_of_one_token_are_left_out_and_counted(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    (tmp_path / "d.txt").write_text("a longer line of text\n```\nanother line with words\n")
    one_token = len(tok("```")["input_ids"])
    assert one_token == 1  # what makes the line useless for a causal LM: nothing to predict
    batches = Batches(load_examples(str(tmp_path / "d.txt"), LM), tok, LM)
    assert len(batches) == 2 and batches.skipped == 1
    for _ in range(3):  # no batch without a target token, so no NaN loss
        assert (batches.next(1)["labels"][:, 1:] != -100).any()
    (tmp_path / "short.txt").write_text("```\n```\n")
    with pytest.raises(DataError, match="nothing to train on"):
        Batches(load_examples(str(tmp_path / "short.txt"), LM), tok, LM)


def _labels_text(tok, ids, labels):
    """The trained tokens, decoded, and a check that labels are the ids or -100 everywhere."""
    assert len(ids) == len(labels)
    assert all(lab in (tok_id, -100) for tok_id, lab in zip(ids, labels))
    return tok.decode([t for t in labels if t != -100])


def test_chat_rows_train_only_the_assistant_turns_as_the_template_renders_them(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    chat = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi there"},
            {"role": "assistant", "content": "Hello friend"}, {"role": "user", "content": "bye"},
            {"role": "assistant", "content": "Goodbye"}]  # fmt: skip
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": chat}) + "\n")
    batches = Batches(load_examples(str(tmp_path / "chat.jsonl"), LM), tok, LM)
    ids, labels = batches.ids[0].tolist(), batches.targets[0].tolist()
    # the ids are the template's rendering, token for token
    assert ids == tok(tok.apply_chat_template(chat, tokenize=False), add_special_tokens=False)["input_ids"]
    # exactly the assistant turns are trained: content and end-of-turn marker, not their "<|im_start|>assistant\n"
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    trained = [i for i, lab in enumerate(labels) if lab != -100]
    first = tok("Hello friend", add_special_tokens=False)["input_ids"] + [end] + tok("\n", add_special_tokens=False)["input_ids"]
    second = tok("Goodbye", add_special_tokens=False)["input_ids"] + [end] + tok("\n", add_special_tokens=False)["input_ids"]
    assert [ids[i] for i in trained] == first + second
    assert ids[trained[0] - 1] != start and start not in [ids[i] for i in trained]
    assert _labels_text(tok, ids, labels) == "Hello friend<|im_end|>\nGoodbye<|im_end|>\n"
    # two runs of trained tokens, one per assistant turn
    runs = sum(1 for i in trained if i - 1 not in trained)
    assert runs == 2
    # a batch pads with -100
    b = batches.collate([0])
    assert b["labels"][0].tolist() == labels


def test_prompt_completion_rows_train_the_completion_and_its_end(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    (tmp_path / "pc.jsonl").write_text(json.dumps({"prompt": "Question: what is AI? Answer:", "completion": " a field"})
                                       + "\n" + json.dumps({"text": "plain text is trained on whole"}) + "\n")  # fmt: skip
    batches = Batches(load_examples(str(tmp_path / "pc.jsonl"), LM), tok, LM)
    prompt = tok("Question: what is AI? Answer:")["input_ids"]
    completion = tok(" a field", add_special_tokens=False)["input_ids"]
    assert batches.ids[0].tolist() == prompt + completion + [tok.eos_token_id]
    assert batches.targets[0].tolist() == [-100] * len(prompt) + completion + [tok.eos_token_id]
    assert batches.targets[1].tolist() == batches.ids[1].tolist() == tok("plain text is trained on whole")["input_ids"]
    b = batches.collate([0, 1])
    width = b["input_ids"].shape[1]
    assert b["labels"][1].tolist() == batches.ids[1].tolist() + [-100] * (width - len(batches.ids[1]))


def test_a_chat_cut_before_its_answer_by_max_length_is_left_out(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    short = RunSpec.from_dict({"name": "l", "model": {"base": "m", "task": "causal-lm", "max_length": 8},
                               "lora": {"target_modules": ["q"]}})  # fmt: skip
    long_question = {"messages": [{"role": "user", "content": "tell me everything about computers " * 4},
                                  {"role": "assistant", "content": "no"}]}  # fmt: skip
    fits = {"prompt": "hi", "completion": " there you are"}
    (tmp_path / "d.jsonl").write_text(json.dumps(long_question) + "\n" + json.dumps(fits) + "\n")
    batches = Batches(load_examples(str(tmp_path / "d.jsonl"), short), tok, short)
    assert len(batches) == 1 and batches.skipped == 1
    assert all(len(x) <= 8 for x in batches.ids)


@pytest.mark.parametrize(
    "row, message",
    [
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "non-empty list"),
        ({"messages": [{"role": "user", "content": 3}]}, "non-empty list"),
        ({"messages": "hi"}, "non-empty list"),
        ({"prompt": "hi"}, "needs both as strings"),
        ({"prompt": "hi", "completion": ""}, "needs both as strings"),
        ({"completion": ["x"]}, "needs both as strings"),
    ],
)
def test_bad_instruction_rows_are_named(tmp_path, row, message):
    (tmp_path / "d.jsonl").write_text('{"text": "fine"}\n' + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=f"d.jsonl:2: .*{message}"):
        load_examples(str(tmp_path / "d.jsonl"), LM)


def test_chat_rows_need_a_chat_template(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = None
    examples = load_examples("builtin:chatterbot-chat", LM)
    with pytest.raises(DataError, match="no chat template"):
        Batches(examples[:3], tok, LM)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
    with pytest.raises(DataError, match="prefix"):  # "A:" is not rendered in the longer chat: turns can't be told apart
        Batches(examples[:3], tok, LM)


def test_builtin_chat_is_the_topic_dialogs_as_messages():
    chat, topics = load_examples("builtin:chatterbot-chat", LM), chatterbot_topics("train")
    assert len(chat) == len(topics)
    assert all(e.messages[0][0] == "user" and e.messages[1][0] == "assistant" for e in chat)
    assert " ".join(c for _, c in chat[0].messages) == topics[0]["text"]
