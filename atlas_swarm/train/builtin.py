"""Built-in offline data for the demo: topic classification of the English chatterbot-corpus dialogs (PyPI package).

``--data builtin:chatterbot-topics`` (train split) and ``builtin:chatterbot-topics-heldout`` (every 5th dialog);
``builtin:chatterbot-chat`` and ``builtin:chatterbot-chat-heldout``: the same dialogs of two turns or more as chat
``messages`` (user and assistant taking turns), for causal-LM instruction tuning.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from atlas_swarm.errors import DataError

# 20 topics: every English corpus file except health.yml (1 dialog).
CHATTERBOT_TOPICS = (
    "ai", "botprofile", "coding", "computers", "conversations", "emotion", "food", "gossip", "greetings", "history",
    "humor", "literature", "money", "movies", "politics", "psychology", "science", "sports", "tech_support", "trivia",
)  # fmt: skip


def chatterbot_topics(split: str = "train") -> list[dict]:
    """Rows {"text", "label"}; a dialog is held out iff a hash of its text says so, so splits are stable."""
    return [{"text": " ".join(turns), "label": topic} for topic, turns in _dialogs(split)]


def chatterbot_chat(split: str = "train") -> list[dict]:
    """Rows {"messages"}: the dialogs of two turns or more, user first (the same split as chatterbot_topics)."""
    return [{"messages": [{"role": ("user", "assistant")[i % 2], "content": turn} for i, turn in enumerate(turns)]}
            for _, turns in _dialogs(split) if len(turns) >= 2]  # fmt: skip


def _dialogs(split: str) -> list[tuple[str, list[str]]]:
    try:
        import chatterbot_corpus
        import yaml
    except ImportError:
        raise DataError("builtin:chatterbot-topics needs `pip install chatterbot-corpus pyyaml`.") from None
    root = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's: the same documents, 0.3 s less start-up
    rows = []
    for topic in CHATTERBOT_TOPICS:
        doc = yaml.load((root / f"{topic}.yml").read_text(), Loader=loader)
        for dialog in doc.get("conversations", []):
            turns = [str(turn) for turn in dialog]
            heldout = int(hashlib.sha256(" ".join(turns).encode()).hexdigest(), 16) % 5 == 0
            if heldout == (split == "heldout"):
                rows.append((topic, turns))
    return rows


def shard_non_iid(rows: list[dict], num_shards: int, index: int, home_share: float = 0.7, seed: int = 0) -> list[dict]:
    """Disjoint, label-skewed shards: each label has a "home" shard that gets ``home_share`` of its rows."""
    rng = random.Random(seed)
    out = []
    for i, row in enumerate(rows):
        home = CHATTERBOT_TOPICS.index(row["label"]) % num_shards if row["label"] in CHATTERBOT_TOPICS else 0
        shard = home if rng.random() < home_share else rng.randrange(num_shards)
        if shard == index:
            out.append(row)
    return out


def load_builtin(name: str) -> list[tuple[str, dict]]:
    if name == "chatterbot-topics":
        rows = chatterbot_topics("train")
    elif name == "chatterbot-topics-heldout":
        rows = chatterbot_topics("heldout")
    elif name == "chatterbot-chat":
        rows = chatterbot_chat("train")
    elif name == "chatterbot-chat-heldout":
        rows = chatterbot_chat("heldout")
    else:
        raise DataError(f"Unknown built-in data {name!r}; known: chatterbot-topics, chatterbot-topics-heldout, "
                        f"chatterbot-chat, chatterbot-chat-heldout.")
    return [(f"builtin:{name}[{i}]", row) for i, row in enumerate(rows)]
