"""This peer's local data: read it (jsonl / csv / txt / a `datasets.save_to_disk` folder), tokenize once, batch.

Nothing here touches the network: a peer's examples never leave its machine.
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


@dataclass(frozen=True)
class Example:
    text: str
    label: Optional[int] = None  # index into spec.model.labels (classification only)


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
        text = row.get("text")
        if not isinstance(text, str):
            columns = ", ".join(sorted(row)) or "none"
            raise DataError(
                f"{where} has no string 'text' column (columns: {columns}). Each example needs 'text'"
                + (" and 'label'." if classify else ".")
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
        enc = tokenizer([e.text for e in examples], truncation=True, max_length=spec.model.max_length)
        # a causal-LM example of one token has nothing to predict: alone in a batch it gives a NaN loss (and counts
        # as a sample while adding no gradient), so it is left out; a text file's "```" lines are such examples
        keep = [i for i, x in enumerate(enc["input_ids"]) if self.task != "causal-lm" or len(x) >= 2]
        self.skipped = len(examples) - len(keep)
        if not keep:
            raise DataError(f"None of the {len(examples)} examples has two tokens or more: there is nothing to train on.")
        self.ids = [torch.tensor(enc["input_ids"][i], dtype=torch.long) for i in keep]
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
            labels = input_ids.masked_fill(mask == 0, -100)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    def all_batches(self, n: int) -> Iterator[dict[str, torch.Tensor]]:
        """Every example once, in order (for evaluation)."""
        for start in range(0, len(self.ids), n):
            yield self.collate(range(start, min(start + n, len(self.ids))))
