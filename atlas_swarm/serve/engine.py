"""One base model, several adapters over it, and one thread that runs every forward pass.

Requests wait in a bounded queue; the engine thread takes every waiting request of one kind (generate or classify, up
to ``max_batch``) and runs them as one batch: concurrent requests share forward passes (dynamic batching), each row
on its own adapter (PEFT's mixed-adapter batches). Requests that arrive while a batch runs form the next one.
Adapters are loaded and deleted by the same thread, between batches, so a batch never sees the set change under it;
a request holds its adapter from the moment its model name is resolved until it finishes (hot swap: serve/api.py).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from atlas_swarm.config import RunSpec
from atlas_swarm.errors import AtlasError

log = logging.getLogger(__name__)
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")  # chat templates' turn ends, where present


class Busy(AtlasError):
    """The queue is full (HTTP 429)."""


class BadRequest(AtlasError):
    """A request this server cannot run (HTTP 400)."""


@dataclass(eq=False)
class Adapter:
    name: str  # RUN_ID@EPOCH: what clients pass as `model`
    run_id: str
    epoch: int
    path: Path
    loaded: float = field(default_factory=time.time)
    in_flight: int = 0
    retire_at: Optional[float] = None  # time.time() after which no new request gets it; deleted once unused


@dataclass(eq=False)
class Request:
    kind: str  # "generate" or "classify"
    adapter: Adapter
    emit: Callable[[str, object], None]  # ("text", delta) ... ("done", info) | ("labels", rows) | ("error", message)
    texts: list[str] = field(default_factory=list)  # classify
    prompt_ids: list[int] = field(default_factory=list)  # generate
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: Optional[int] = None
    ignore_eos: bool = False
    cancelled: bool = False


@dataclass
class Stats:
    last_batch: int = 0  # rows
    fetch_failures: int = 0  # looks for a newer adapter that found none or refused one (serve/__main__.py)


class Engine:
    def __init__(self, spec: RunSpec, base_model: Optional[str] = None, device: str = "cpu", max_batch: int = 32,
                 max_queue: int = 256, max_tokens: int = 512, max_prompt_tokens: Optional[int] = None,
                 quantize: str = "none"):  # fmt: skip
        from atlas_swarm.model.lora import load_base

        self.spec, self.device, self.max_batch, self.max_queue = spec, device, max_batch, max_queue
        self.task, self.quantize = spec.model.task, quantize
        self.base, self.tokenizer = load_base(spec, base_model, quantize, device)  # a quantized base is placed
        if quantize == "none":
            self.base.to(device)
        self.base.eval()
        # generation appends to every row at the right end; a classifier (absolute positions, BERT) pads on the right
        self.tokenizer.padding_side = "left" if self.task == "causal-lm" else "right"
        context = getattr(self.base.config, "max_position_embeddings", None) or 2048
        self.context = context
        self.max_tokens = min(max_tokens, context - 1)
        self.max_prompt_tokens = min(max_prompt_tokens or context, context - 1)
        self.end_ids = self._end_ids()
        self.model = None  # the PeftModel, made with the first adapter
        self.adapters: dict[str, Adapter] = {}
        self.stats = Stats()
        self._queue: collections.deque[Request] = collections.deque()
        self._ops: list[Callable[[], None]] = []  # adapter loads/deletes, run by the engine thread between batches
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="atlas-serve-engine", daemon=True)
        self._thread.start()

    def _end_ids(self) -> set[int]:
        tok, ids = self.tokenizer, set()
        if tok.eos_token_id is not None:
            ids.add(tok.eos_token_id)
        eos = getattr(getattr(self.base, "generation_config", None), "eos_token_id", None)
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        for t in END_OF_TURN:
            if t in tok.all_special_tokens:
                ids.add(tok.convert_tokens_to_ids(t))
        return ids

    # --- adapters ---------------------------------------------------------------------------------------------

    def add_adapter(self, run_id: str, epoch: int, path: Path, timeout: float = 120.0) -> Adapter:
        """Load the adapter in ``path`` beside the others (on the engine thread); returns it once it serves."""
        name = f"{run_id}@{epoch}"
        with self._cond:
            if name in self.adapters:
                return self.adapters[name]
        adapter, done, failed = Adapter(name, run_id, epoch, Path(path)), threading.Event(), []

        def load() -> None:
            try:
                self._load(adapter)
                self.adapters[name] = adapter
            except Exception as e:  # a corrupt or mismatched folder: that adapter only
                failed.append(e)
            finally:
                done.set()

        self._run_op(load)
        if not done.wait(timeout):
            raise AtlasError(f"Loading adapter {name} took over {timeout:.0f} s.")
        if failed:
            raise AtlasError(f"Could not load adapter {name} from {str(path)!r}: {str(failed[0]).splitlines()[0]}")
        return adapter

    def _load(self, adapter: Adapter) -> None:
        import warnings

        from peft import PeftModel

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if self.model is None:
                self.model = PeftModel.from_pretrained(self.base, str(adapter.path), adapter_name=adapter.name)
            else:
                self.model.load_adapter(str(adapter.path), adapter_name=adapter.name)
        if self.quantize == "none":
            self.model.to(self.device)
        else:  # the base stays where bitsandbytes put it; only the adapter's weights move
            for name, param in self.model.named_parameters():
                if adapter.name in name and param.device != self.base.device:
                    param.data = param.data.to(self.base.device)
        self.model.eval()

    def retire(self, name: str, after: float = 0.0) -> None:
        """No new request gets ``name`` after ``after`` s; it is deleted once the last request on it finishes."""
        with self._cond:
            if name in self.adapters:
                self.adapters[name].retire_at = time.time() + after
                self._cond.notify()

    def _run_op(self, op: Callable[[], None]) -> None:
        with self._cond:
            self._ops.append(op)
            self._cond.notify()

    def _sweep(self) -> None:  # engine thread, between batches
        now = time.time()
        for a in list(self.adapters.values()):
            if a.retire_at is not None and a.retire_at <= now and a.in_flight == 0 and len(self.adapters) > 1:
                self.model.delete_adapter(a.name)
                with self._cond:
                    del self.adapters[a.name]
                log.info("retired adapter %s", a.name)

    def serving(self) -> list[Adapter]:
        """The adapters a new request may name, newest epoch last."""
        now = time.time()
        with self._cond:
            live = [a for a in self.adapters.values() if a.retire_at is None or a.retire_at > now]
        return sorted(live, key=lambda a: (a.run_id, a.epoch))

    def acquire(self, model: str) -> Adapter:
        """The adapter a request names (``RUN_ID@EPOCH``; ``RUN_ID`` or ``RUN_ID@latest``: the newest), held by the
        request until it finishes (``release``); KeyError if none."""
        run_id, _, epoch = model.partition("@")
        with self._cond:
            live = [a for a in self.serving() if a.run_id == run_id]
            if epoch in ("", "latest"):
                chosen = max(live, key=lambda a: a.epoch, default=None)
            else:
                chosen = next((a for a in live if str(a.epoch) == epoch), None)
            if chosen is None:
                raise KeyError(model)
            chosen.in_flight += 1
            return chosen

    def release(self, adapter: Adapter) -> None:
        with self._cond:
            adapter.in_flight -= 1
            self._cond.notify()

    # --- requests ---------------------------------------------------------------------------------------------

    def encode_prompt(self, prompt: str, max_tokens: int, chat: bool = False) -> list[int]:
        """Token ids of a prompt; a chat prompt is the template's rendering, which carries its own special tokens
        (a BOS added again would be a second one)."""
        ids = self.tokenizer(prompt, add_special_tokens=not chat)["input_ids"]
        if not ids:
            raise BadRequest("The prompt is empty after tokenization.")
        if len(ids) > self.max_prompt_tokens:
            raise BadRequest(f"The prompt has {len(ids)} tokens; this server takes at most {self.max_prompt_tokens}.")
        if len(ids) + max_tokens > self.context:
            raise BadRequest(f"The prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                             f"context of {self.context} tokens.")  # fmt: skip
        return ids

    def chat_prompt(self, messages: list[dict]) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise BadRequest("This base model's tokenizer has no chat template; use /v1/completions.")
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # a template that refuses these messages (roles it does not know, say)
            raise BadRequest(f"The chat template refused these messages: {str(e).splitlines()[0]}") from None

    def submit(self, request: Request) -> None:
        with self._cond:
            if self._stopping:
                raise Busy("The server is shutting down.")
            if len(self._queue) >= self.max_queue:
                raise Busy(f"The server has {len(self._queue)} requests waiting (--max-queue); try again shortly.")
            self._queue.append(request)
            self._cond.notify()

    def queue_depth(self) -> int:
        return len(self._queue)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            waiting, self._queue = list(self._queue), collections.deque()
            self._cond.notify()
        for r in waiting:
            r.emit("error", "The server is shutting down.")
        self._thread.join(timeout=30)

    # --- the engine thread ------------------------------------------------------------------------------------

    def _take(self) -> tuple[list[Callable[[], None]], list[Request]]:
        """Adapter operations due, and the next batch: every waiting request of the oldest one's kind."""
        with self._cond:
            if not self._stopping and not self._queue and not self._ops:
                self._cond.wait(timeout=1.0)  # at least once a second: retired adapters are swept
            ops, self._ops = self._ops, []
            if not self._queue:
                return ops, []
            kind = self._queue[0].kind
            batch = [r for r in self._queue if r.kind == kind][: self.max_batch]
            for r in batch:
                self._queue.remove(r)
            return ops, batch

    def _loop(self) -> None:
        while True:
            ops, batch = self._take()
            for op in ops:
                op()
            if self._stopping and not batch:
                return
            self._sweep()
            live = [r for r in batch if not r.cancelled]
            if not live:
                continue
            try:
                with torch.inference_mode():
                    if live[0].kind == "classify":
                        self._classify(live)
                    else:
                        self._generate(live)
            except Exception as e:  # a bug or an exhausted device: these requests fail, the server goes on
                log.exception("batch failed")
                for r in live:
                    r.emit("error", f"The batch failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            self.stats.last_batch = len(live)

    def _classify(self, batch: list[Request]) -> None:
        texts = [t for r in batch for t in r.texts]
        names = [r.adapter.name for r in batch for _ in r.texts]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.spec.model.max_length,
                             return_tensors="pt").to(self.device)  # fmt: skip
        probs = torch.softmax(self.model(**enc, adapter_names=names).logits.float(), dim=-1).cpu()
        labels, i = self.spec.model.labels, 0
        for r in batch:
            rows = []
            for _ in r.texts:
                p = probs[i].tolist()
                rows.append({"label": labels[max(range(len(p)), key=p.__getitem__)],
                             "probabilities": dict(zip(labels, p))})  # fmt: skip
                i += 1
            r.emit("labels", rows)

    def _generate(self, batch: list[Request]) -> None:
        n, pad = len(batch), self.tokenizer.pad_token_id
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in batch], device=self.device)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in batch],
                            device=self.device)  # fmt: skip
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        names = [r.adapter.name for r in batch]
        gens = [torch.Generator().manual_seed(r.seed if r.seed is not None else int(time.time_ns()) + i)
                for i, r in enumerate(batch)]  # fmt: skip
        rows = [_Row(r, self.tokenizer) for r in batch]
        past = None
        for _ in range(max(r.max_tokens for r in batch)):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past,
                             use_cache=True, adapter_names=names)  # fmt: skip
            past = out.past_key_values
            logits = out.logits[:, -1, :].float().cpu()
            nxt = []
            for i, row in enumerate(rows):
                if row.finished is None:
                    token = _sample(logits[i], row.request, gens[i])
                    row.add(token, token in self.end_ids and not row.request.ignore_eos)
                nxt.append(row.last if row.last is not None else pad)
            if all(row.finished is not None for row in rows):
                break
            ids = torch.tensor(nxt, device=self.device)[:, None]
            mask = torch.cat([mask, torch.ones(n, 1, dtype=mask.dtype, device=self.device)], dim=1)
            positions = positions[:, -1:] + 1
        for row in rows:
            row.finish("length")


class _Row:
    """One request's generation: the tokens so far, the text sent, the stop strings."""

    def __init__(self, request: Request, tokenizer):
        self.request, self.tokenizer = request, tokenizer
        self.tokens: list[int] = []
        self.sent = 0  # characters of text emitted
        self.last: Optional[int] = None
        self.finished: Optional[str] = None
        self.hold = max((len(s) for s in request.stop), default=1) - 1  # a stop string may still be forming

    def add(self, token: int, end: bool) -> None:
        self.last = token
        if self.request.cancelled:
            return self.finish("cancelled")
        if end:
            return self.finish("stop")
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.request.stop) if i >= 0), default=-1)
        if cut >= 0:
            return self.finish("stop", text[:cut])
        if len(self.tokens) >= self.request.max_tokens:
            return self.finish("length", text)
        safe = len(text) - self.hold
        while safe > self.sent and text[safe - 1] == "\ufffd":  # half of a multi-byte character
            safe -= 1
        if safe > self.sent:
            self.request.emit("text", text[self.sent:safe])
            self.sent = safe

    def finish(self, reason: str, text: Optional[str] = None) -> None:
        if self.finished is not None:
            return
        self.finished = reason
        if text is None:
            text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if len(text) > self.sent:
            self.request.emit("text", text[self.sent:])
        self.request.emit("done", {"finish_reason": reason, "completion_tokens": len(self.tokens),
                                   "prompt_tokens": len(self.request.prompt_ids)})  # fmt: skip


def _sample(logits: torch.Tensor, r: Request, gen: torch.Generator) -> int:
    if r.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / r.temperature, dim=-1)
    if r.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < r.top_p  # the smallest set whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))
