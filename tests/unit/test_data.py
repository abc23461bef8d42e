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
    with pytest.raises(DataError, match="two tokens"):
        Batches(load_examples(str(tmp_path / "short.txt"), LM), tok, LM)
