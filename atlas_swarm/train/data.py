"""This peer's local data: read it (jsonl / csv / txt / a `datasets.save_to_disk` folder), tokenize once, batch.

A causal-LM example is plain ``text`` (every token is trained), a ``prompt`` with its ``completion``, or chat
``messages`` rendered with the base tokenizer's chat template; in the last two the loss falls only on the
completion's / the assistant turns' tokens. Nothing here touches the network: a peer's examples never leave it.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from atlas_swarm.config import RunSpec
from atlas_swarm.errors import DataError

BUILTIN_PREFIX = "builtin:"


CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Example:
    text: str
    label: Optional[int] = None  # index into spec.model.labels (classification only)
    prompt: Optional[str] = None  # prompt/completion rows: ``text`` is the completion, trained on alone
    messages: Optional[tuple[tuple[str, str], ...]] = None  # chat rows: (role, content); ``text`` is unused


def load_examples(source: str, spec: RunSpec) -> list[Example]:
    """Read ``source`` into examples that fit ``spec``'s task; raise DataError naming the file, row and fix."""
    if source.startswith(BUILTIN_PREFIX):
        from atlas_swarm.train.builtin import load_builtin

        rows = load_builtin(source[len(BUILTIN_PREFIX) :])
    else:
        path = Path(source)
        if not path.exists():
            raise DataError(f"--data {source!r} does not exist. Give a .jsonl, .csv or .txt file, or a saved dataset.")
        rows = _read_rows(path, spec)
    classify = spec.model.task == "sequence-classification"
    label_index = {name: i for i, name in enumerate(spec.model.labels)}
    examples = []
    for where, row in rows:
        if not classify and ("messages" in row or "prompt" in row or "completion" in row):
            examples.append(_instruction_example(where, row))
            continue
        text = row.get("text")
        if not isinstance(text, str):
            columns = ", ".join(sorted(row)) or "none"
            raise DataError(
                f"{where} has no string 'text' column (columns: {columns}). Each example needs 'text'"
                + (" and 'label'." if classify else " (or 'prompt' and 'completion', or chat 'messages').")
            )
        if not classify:
            examples.append(Example(text))
            continue
        label = row.get("label")
        if isinstance(label, str) and label in label_index:
            examples.append(Example(text, label_index[label]))
        elif isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(label_index):
            examples.append(Example(text, label))
        else:
            raise DataError(
                f"{where} has label {label!r}, which is not one of this run's labels "
                f"({', '.join(spec.model.labels)}) nor an index below {len(label_index)}."
            )
    if not examples:
        raise DataError(f"--data {source!r} holds no examples.")
    return examples


def _instruction_example(where: str, row: dict) -> Example:
    """A prompt/completion or chat row, checked here so that a bad row is named before the peer joins."""
    if "messages" in row:
        messages = row["messages"]
        ok = isinstance(messages, list) and messages and all(
            isinstance(m, dict) and m.get("role") in CHAT_ROLES and isinstance(m.get("content"), str) for m in messages)
        if not ok:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{\"role\": one of "
                            f"{', '.join(CHAT_ROLES)}, \"content\": text}} objects.")  # fmt: skip
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: 'messages' has no assistant turn, so there is nothing to train on.")
        return Example("", messages=tuple((m["role"], m["content"]) for m in messages))
    prompt, completion = row.get("prompt"), row.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
        raise DataError(f"{where}: a prompt/completion row needs both as strings, the completion not empty.")
    return Example(completion, prompt=prompt)


def _read_rows(path: Path, spec: RunSpec):
    if path.is_dir():
        return _read_saved_dataset(path)
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json"):
            return list(_read_jsonl(path))
        if suffix == ".csv":
            with path.open(newline="") as f:
                return [(f"{path}:{i + 2}", _csv_row(r)) for i, r in enumerate(csv.DictReader(f))]
        if suffix == ".txt":
            if spec.model.task != "causal-lm":
                raise DataError(f"--data {str(path)!r}: a .txt file has no labels; classification needs .jsonl or .csv.")
            lines = path.read_text().splitlines()
            return [(f"{path}:{i + 1}", {"text": line}) for i, line in enumerate(lines) if line.strip()]
    except UnicodeDecodeError:
        raise DataError(f"--data {str(path)!r} is not UTF-8 text.") from None
    raise DataError(f"--data {str(path)!r}: unknown format {suffix!r}; use .jsonl, .csv, .txt or a saved dataset folder.")


def _read_jsonl(path: Path):
    with path.open() as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{i} is not valid JSON ({e}). Each line must be one JSON object.") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{i} is not a JSON object. Each line must look like {{\"text\": ...}}.")
            yield f"{path}:{i}", row


def _csv_row(row: dict) -> dict:
    label = row.get("label")
    if isinstance(label, str) and label.strip().isdigit():
        row = dict(row, label=int(label))
    return row


def _read_saved_dataset(path: Path):
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"--data {str(path)!r} is a folder; reading a saved Hugging Face dataset needs `pip install datasets`."
        ) from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"--data {str(path)!r} is not a dataset saved with save_to_disk: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"--data {str(path)!r} is a DatasetDict without a 'train' split (has {list(ds)}).")
        ds = ds["train"]
    return [(f"{path}[{i}]", dict(row)) for i, row in enumerate(ds)]


class Batches:
    """Tokenizes examples once, then yields padded batches forever, reshuffling each pass (seeded)."""

    def __init__(self, examples: Sequence[Example], tokenizer, spec: RunSpec, seed: int = 0):
        self.task = spec.model.task
        self.pad_id = tokenizer.pad_token_id
        limit = spec.model.max_length
        ids: list[list[int]] = [[] for _ in examples]
        targets: list[list[int]] = [[] for _ in examples]  # causal-LM labels: the token, or -100 where no loss falls
        plain = [i for i, e in enumerate(examples) if e.prompt is None and e.messages is None]
        if plain:
            enc = tokenizer([examples[i].text for i in plain], truncation=True, max_length=limit)["input_ids"]
            for i, x in zip(plain, enc):
                ids[i] = targets[i] = list(x)
        for i, e in enumerate(examples):
            if e.prompt is not None or e.messages is not None:
                ids[i], targets[i] = tokenize_instruction(e, tokenizer, limit)
        # a causal-LM example whose only trained token is its first has nothing to predict: alone in a batch it gives
        # a NaN loss (and counts as a sample while adding no gradient), so it is left out; a text file's "```" lines
        # are such examples, and so is a chat whose assistant turns were cut off by model.max_length
        keep = [i for i in range(len(examples)) if self.task != "causal-lm" or any(t != -100 for t in targets[i][1:])]
        self.skipped = len(examples) - len(keep)
        if not keep:
            raise DataError(f"None of the {len(examples)} examples has a token to predict after its first (one-token "
                            f"texts, or completions past model.max_length): there is nothing to train on.")
        self.ids = [torch.tensor(ids[i], dtype=torch.long) for i in keep]
        self.targets = [torch.tensor(targets[i], dtype=torch.long) for i in keep]
        self.labels = [examples[i].label for i in keep]
        self.rng = random.Random(seed)
        self.order: list[int] = []

    def __len__(self) -> int:
        return len(self.ids)

    def next(self, n: int) -> dict[str, torch.Tensor]:
        idx = []
        while len(idx) < n:
            if not self.order:
                self.order = list(range(len(self.ids)))
                self.rng.shuffle(self.order)
            idx.append(self.order.pop())
        return self.collate(idx)

    def collate(self, idx: Sequence[int]) -> dict[str, torch.Tensor]:
        seqs = [self.ids[i] for i in idx]
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            input_ids[row, : len(s)] = s
            mask[row, : len(s)] = 1
        if self.task == "sequence-classification":
            labels = torch.tensor([self.labels[i] for i in idx], dtype=torch.long)
        else:
            labels = torch.full((len(seqs), width), -100, dtype=torch.long)
            for row, i in enumerate(idx):
                labels[row, : len(self.targets[i])] = self.targets[i]
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    def all_batches(self, n: int) -> Iterator[dict[str, torch.Tensor]]:
        """Every example once, in order (for evaluation)."""
        for start in range(0, len(self.ids), n):
            yield self.collate(range(start, min(start + n, len(self.ids))))


def tokenize_instruction(example: Example, tokenizer, limit: int) -> tuple[list[int], list[int]]:
    """Token ids and labels of a prompt/completion or chat example: labels are -100 except on the completion (and
    the end-of-sequence token after it) or on each assistant turn as the chat template renders it (its end-of-turn
    marker included). Each piece is tokenized on its own, so a label never straddles a prompt/answer boundary."""
    if example.messages is None:
        pieces = [(example.prompt, False, True), (example.text, True, False)]
    else:
        pieces = [(text, trained, False) for text, trained in chat_pieces(example.messages, tokenizer)]
    ids: list[int] = []
    labels: list[int] = []
    for text, trained, special in pieces:
        piece = tokenizer(text, add_special_tokens=special)["input_ids"] if text else []
        ids += piece
        labels += piece if trained else [-100] * len(piece)
    if example.messages is None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)  # the model learns to stop after a completion
        labels.append(tokenizer.eos_token_id)
    return ids[:limit], labels[:limit]


def chat_pieces(messages: Sequence[tuple[str, str]], tokenizer) -> list[tuple[str, bool]]:
    """The rendered chat cut into (text, is an assistant turn) pieces, using the template's own rendering: an
    assistant turn is what rendering up to it adds to rendering the turns before it with the generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("The base model's tokenizer has no chat template, so 'messages' rows cannot be rendered. Use "
                        "a chat/instruct base model, or give 'prompt' and 'completion' rows.")
    turns = [{"role": role, "content": content} for role, content in messages]

    def render(upto: int, generation_prompt: bool) -> str:
        if upto == 0:
            return ""
        try:
            return tokenizer.apply_chat_template(turns[:upto], tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:  # a template may refuse some role orders (raise_exception in Jinja)
            raise DataError(f"The base model's chat template refused these messages: {e}") from None

    full = render(len(turns), False)
    pieces: list[tuple[str, bool]] = []
    done = 0
    for i, (role, _) in enumerate(messages):
        if role != "assistant":
            continue
        before, after = render(i, True), render(i + 1, False)
        if not (after.startswith(before) and full.startswith(after) and len(before) >= done):
            raise DataError("The base model's chat template does not render a chat as a prefix of its longer chats, "
                            "so its assistant turns cannot be told apart; give 'prompt' and 'completion' rows.")
        pieces += [(full[done : len(before)], False), (full[len(before) : len(after)], True)]
        done = len(after)
    pieces.append((full[done:], False))
    return [(text, trained) for text, trained in pieces if text]
