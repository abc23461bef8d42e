"""OpenAI-compatible HTTP over the engine (aiohttp), and the server's own endpoints.

    GET  /v1/models              the adapters a request may name: RUN_ID@EPOCH (RUN_ID alone: the newest)
    POST /v1/completions         causal-LM runs; "stream": true sends server-sent events
    POST /v1/chat/completions    causal-LM runs, through the base tokenizer's chat template
    POST /v1/classify            sequence-classification runs: {"model", "input": str | [str]} -> labels, probabilities
    GET  /health                 200 {"status": "ok", ...} once an adapter serves, else 503
    GET  /metrics                Prometheus text format

Every error is OpenAI's shape, {"error": {"message", "type", "param", "code"}}, and costs only its own request.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
import uuid
from typing import Any, Optional

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from atlas_swarm.serve.engine import Adapter, BadRequest, Busy, Engine, Request

log = logging.getLogger(__name__)
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "server_error", 504: "timeout_error"}  # fmt: skip
MAX_ITEMS = 64  # classify inputs per request
MAX_STOPS = 4  # as OpenAI's API


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}  # fmt: skip
    return web.json_response(body, status=status)


class Metrics:
    def __init__(self, engine: Engine):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("atlas_serve_requests", "Requests by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)  # fmt: skip
        self.latency = Histogram("atlas_serve_latency_seconds", "Time from request to its last byte",
                                 ["endpoint"], registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))  # fmt: skip
        self.first_token = Histogram("atlas_serve_time_to_first_token_seconds", "Time to the first streamed text",
                                     registry=r, buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))  # fmt: skip
        self.tokens = Counter("atlas_serve_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("atlas_serve_prompt_tokens", "Prompt tokens read", registry=r)
        self.rejected = Counter("atlas_serve_rejected", "Requests refused, by reason", ["reason"], registry=r)
        Gauge("atlas_serve_queue_depth", "Requests waiting for the engine", registry=r).set_function(
            engine.queue_depth)
        Gauge("atlas_serve_last_batch_rows", "Rows in the last batch", registry=r).set_function(
            lambda: engine.stats.last_batch)
        Gauge("atlas_serve_adapter_fetch_failures", "Looks for a newer adapter that found none or refused one "
              "(a corrupt block, publishers gone)", registry=r).set_function(lambda: engine.stats.fetch_failures)
        self.epoch = Gauge("atlas_serve_adapter_epoch", "Newest epoch served per run", ["run"], registry=r)
        self.adapters = Gauge("atlas_serve_adapters", "Adapters a request may name", registry=r)
        self.engine = engine

    def render(self) -> bytes:
        serving = self.engine.serving()
        self.adapters.set(len(serving))
        for a in serving:
            self.epoch.labels(run=a.run_id).set(max(x.epoch for x in serving if x.run_id == a.run_id))
        return generate_latest(self.registry)


class Api:
    def __init__(self, engine: Engine, api_key: Optional[str] = None, request_timeout: float = 300.0,
                 max_body: int = 1 << 20):  # fmt: skip
        self.engine, self.api_key, self.timeout = engine, api_key, request_timeout
        self.metrics = Metrics(engine)
        self.app = web.Application(client_max_size=max_body, middlewares=[self._errors])
        self.app.add_routes([
            web.get("/v1/models", self.models), web.post("/v1/completions", self.completions),
            web.post("/v1/chat/completions", self.chat), web.post("/v1/classify", self.classify),
            web.get("/health", self.health), web.get("/metrics", self.metrics_page),
        ])  # fmt: skip

    # --- plumbing ---------------------------------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        endpoint, began = request.path if request.path.startswith("/v1/") else "other", time.monotonic()
        try:
            if self.api_key and request.path.startswith("/v1/"):
                given = request.headers.get("Authorization", "").encode("utf-8", "replace")
                if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                    raise ApiError(401, "Missing or wrong API key (Authorization: Bearer KEY).", code="invalid_api_key")
            response = await handler(request)
        except ApiError as e:
            response = error_response(e.status, e.message, e.param, e.code)
        except web.HTTPRequestEntityTooLarge:
            response = error_response(413, f"The request body is larger than {self.app._client_max_size} bytes.")
        except web.HTTPException as e:  # aiohttp's own: 404, 405
            if e.status < 400:
                raise
            response = error_response(e.status, e.reason or "error", code=str(e.status))
        except (asyncio.CancelledError, ConnectionResetError):
            raise  # the client went away
        except Exception:  # a bug: this request fails with 500, the server goes on
            log.exception("request failed")
            response = error_response(500, "Internal error while serving this request (see the server's log).")
        if response.status >= 400:
            self.metrics.rejected.labels(reason=str(response.status)).inc()
        self.metrics.requests.labels(endpoint=endpoint, status=str(response.status)).inc()
        self.metrics.latency.labels(endpoint=endpoint).observe(time.monotonic() - began)
        return response

    async def _body(self, request: web.Request) -> dict:
        try:
            body = await request.json(loads=json.loads)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "The request body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object.")
        return body

    def _acquire(self, body: dict, task: str) -> Adapter:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "'model' is required: one of GET /v1/models' ids.", "model")
        if self.engine.task != task:
            raise ApiError(400, f"This server serves a {self.engine.task} run; this endpoint is for {task}.", "model")
        try:
            return self.engine.acquire(model)
        except KeyError:
            known = ", ".join(a.name for a in self.engine.serving()) or "none yet"
            raise ApiError(404, f"The model '{model}' does not exist here (serving: {known}).", "model",
                           "model_not_found") from None  # fmt: skip

    def _sampling(self, body: dict) -> dict:
        max_tokens = _number(body, "max_tokens", int, 16, 1, self.engine.max_tokens)
        if "max_completion_tokens" in body:
            max_tokens = _number(body, "max_completion_tokens", int, 16, 1, self.engine.max_tokens)
        stop = body.get("stop")
        stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop):
            raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOPS} non-empty strings.", "stop")
        if body.get("n", 1) != 1:
            raise ApiError(400, "Only n=1 is supported.", "n")
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63):
            raise ApiError(400, "'seed' must be a non-negative integer.", "seed")
        ignore_eos = body.get("ignore_eos", False)  # vLLM's extension: exactly max_tokens (benchmarks)
        if not isinstance(ignore_eos, bool):
            raise ApiError(400, "'ignore_eos' must be true or false.", "ignore_eos")
        return {"max_tokens": max_tokens, "temperature": _number(body, "temperature", float, 1.0, 0.0, 2.0),
                "top_p": _number(body, "top_p", float, 1.0, 0.0, 1.0), "stop": tuple(stop), "seed": seed,
                "ignore_eos": ignore_eos}

    # --- endpoints --------------------------------------------------------------------------------------------

    async def models(self, request: web.Request):
        data = [{"id": a.name, "object": "model", "created": int(a.loaded), "owned_by": "atlas-swarm",
                 "run": a.run_id, "epoch": a.epoch} for a in self.engine.serving()]  # fmt: skip
        return web.json_response({"object": "list", "data": data})

    async def health(self, request: web.Request):
        serving = self.engine.serving()
        body = {"status": "ok" if serving else "loading", "adapters": [a.name for a in serving],
                "in_flight": {a.name: a.in_flight for a in serving}, "queue": self.engine.queue_depth()}
        return web.json_response(body, status=200 if serving else 503)

    async def metrics_page(self, request: web.Request):
        return web.Response(body=self.metrics.render(), content_type="text/plain", charset="utf-8")

    async def classify(self, request: web.Request):
        body = await self._body(request)
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not (isinstance(texts, list) and 0 < len(texts) <= MAX_ITEMS and all(isinstance(t, str) for t in texts)):
            raise ApiError(400, f"'input' must be a string or a list of 1 to {MAX_ITEMS} strings.", "input")
        adapter = self._acquire(body, "sequence-classification")
        try:
            rows = await self._run(Request("classify", adapter, None, texts=texts), expect="labels")
        finally:
            self.engine.release(adapter)
        data = [dict(row, index=i) for i, row in enumerate(rows)]
        return web.json_response({"object": "list", "model": adapter.name, "data": data})

    async def completions(self, request: web.Request):
        body = await self._body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, "'prompt' must be a string (one prompt per request).", "prompt")
        return await self._generate(request, body, prompt, chat=False)

    async def chat(self, request: web.Request):
        body = await self._body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):  # fmt: skip
            raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects with string "
                                "content.", "messages")  # fmt: skip
        try:
            prompt = self.engine.chat_prompt([{"role": m["role"], "content": m["content"]} for m in messages])
        except BadRequest as e:
            raise ApiError(400, str(e), "messages") from None
        return await self._generate(request, body, prompt, chat=True)

    async def _generate(self, http: web.Request, body: dict, prompt: str, chat: bool):
        sampling = self._sampling(body)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "'stream' must be true or false.", "stream")
        adapter = self._acquire(body, "causal-lm")
        try:
            try:
                ids = self.engine.encode_prompt(prompt, sampling["max_tokens"], chat)
            except BadRequest as e:
                raise ApiError(400, str(e), "messages" if chat else "prompt", "context_length_exceeded") from None
            self.metrics.prompt_tokens.inc(len(ids))
            req = Request("generate", adapter, None, prompt_ids=ids, **sampling)
            rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
            if stream:
                return await self._stream(http, req, rid, chat)
            text, info = [], {}
            async for kind, value in self._events(req):
                if kind == "text":
                    text.append(value)
                else:
                    info = value
            self.metrics.tokens.inc(info["completion_tokens"])
            choice = ({"index": 0, "message": {"role": "assistant", "content": "".join(text)}} if chat
                      else {"index": 0, "text": "".join(text), "logprobs": None})  # fmt: skip
            choice["finish_reason"] = info["finish_reason"]
            return web.json_response({
                "id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": adapter.name, "choices": [choice], "usage": _usage(info)})  # fmt: skip
        finally:
            self.engine.release(adapter)

    async def _stream(self, http: web.Request, req: Request, rid: str, chat: bool):
        created, began = int(time.time()), time.monotonic()
        kind_name = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: Optional[str], finish: Optional[str], first: bool = False) -> bytes:
            if chat:
                delta = ({"role": "assistant", "content": ""} if first else {} if text is None else {"content": text})
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            data = {"id": rid, "object": kind_name, "created": created, "model": req.adapter.name, "choices": [choice]}
            return b"data: " + json.dumps(data).encode() + b"\n\n"

        events = self._events(req)
        first_event = await events.__anext__()  # errors before the first byte are still proper HTTP errors
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(http)
        try:
            if chat:
                await response.write(chunk(None, None, first=True))
            seen_text = False
            kind, value = first_event
            while True:
                if kind == "text":
                    if not seen_text:
                        self.metrics.first_token.observe(time.monotonic() - began)
                        seen_text = True
                    await response.write(chunk(value, None))
                else:
                    self.metrics.tokens.inc(value["completion_tokens"])
                    await response.write(chunk(None, value["finish_reason"]))
                    break
                try:
                    kind, value = await events.__anext__()
                except ApiError as e:  # mid-stream: the HTTP status is sent already; say it in the stream
                    err = {"error": {"message": e.message, "type": ERROR_TYPES.get(e.status, "server_error"),
                                     "param": None, "code": e.code}}  # fmt: skip
                    await response.write(b"data: " + json.dumps(err).encode() + b"\n\n")
                    break
            await response.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            req.cancelled = True  # the engine drops the row at its next token
            raise
        finally:
            await events.aclose()
        return response

    async def _events(self, req: Request):
        """The engine's events for ``req`` as they come; ApiError on its error or after the request timeout."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        req.emit = lambda kind, value: loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
        try:
            self.engine.submit(req)
        except Busy as e:
            raise ApiError(429, str(e), code="queue_full") from None
        deadline = time.monotonic() + self.timeout
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(queue.get(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    raise ApiError(504, f"The request took over {self.timeout:.0f} s (--request-timeout).") from None
                if kind == "error":
                    raise ApiError(503 if "shutting down" in value else 500, value)
                yield kind, value
                if kind in ("done", "labels"):
                    return
        finally:
            req.cancelled = True  # a no-op once it finished; otherwise the engine stops spending on it

    async def _run(self, req: Request, expect: str):
        async for kind, value in self._events(req):
            if kind == expect:
                return value
        raise ApiError(500, "The engine ended the request without a result.")


def _number(body: dict, name: str, kind: type, default, low, high):
    value = body.get(name, default)
    if value is None:
        value = default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok or not low <= value <= high:
        raise ApiError(400, f"'{name}' must be a{'n integer' if kind is int else ' number'} from {low} to {high}.",
                       name)  # fmt: skip
    return kind(value)


def _usage(info: dict[str, Any]) -> dict:
    return {"prompt_tokens": info["prompt_tokens"], "completion_tokens": info["completion_tokens"],
            "total_tokens": info["prompt_tokens"] + info["completion_tokens"]}  # fmt: skip
