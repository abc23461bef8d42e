"""`python -m atlas_swarm.serve` as a separate process on loopback, with the official `openai` client as the client:
the tiny random Llama (chat template) for completions and chat, the MiniLM demo spec for classify. Every answer is
checked against plain PEFT on the same base and adapter, one request at a time."""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atlas_swarm.config import RunSpec
from atlas_swarm.model.lora import load_base, load_model, save_adapter
from tests.conftest import write_spec
from tests.peers import run_together, wait_until

pytestmark = pytest.mark.integration
PROMPTS = ["hello there", "what is your favourite", "tell me a joke about computers and", "hi"]


def make_adapter(spec: RunSpec, folder: Path, epoch: int) -> Path:
    """The spec's seeded adapter with random B matrices (0 at init: the adapter would change nothing), seeded by
    ``epoch``: two epochs answer differently."""
    model, _ = load_model(spec)
    g = torch.Generator().manual_seed(epoch)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or ("modules_to_save" in name and p.requires_grad):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return save_adapter(model, folder, {"epoch": epoch})


class Server:
    def __init__(self, tmp: Path, args: list[str]):
        self.out = (tmp / "serve.out").open("w+")
        self.process = subprocess.Popen([sys.executable, "-m", "atlas_swarm.serve", "--http", "127.0.0.1:0",
                                         "--workdir", str(tmp / "serve"), *args],
                                        stdout=self.out, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        self.url = self._wait_for(r"listening on (http://\S+)/v1", 120).group(1)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=60)

    def output(self) -> str:
        self.out.seek(0)
        return self.out.read()

    def _wait_for(self, pattern: str, timeout: float):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.output())
            if found:
                return found
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited ({self.process.returncode}):\n{self.output()}")
            time.sleep(0.1)
        raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.output()}")

    def raw(self, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=body, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.out.close()


@pytest.fixture
def chat_run(tmp_path, tiny_model):
    spec_path = write_spec(tmp_path / "spec.toml", str(tiny_model))
    spec = RunSpec.from_toml(spec_path)
    return spec_path, spec, make_adapter(spec, tmp_path / "a1", 1), make_adapter(spec, tmp_path / "a2", 2)


def concurrently(calls: list) -> list:
    """The results of ``calls`` (callables), each run in its own thread, all started together."""
    results, lock = [], threading.Lock()

    def one(call):
        value = call()
        with lock:
            results.append(value)

    threads = [threading.Thread(target=one, args=(call,)) for call in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def at_once(count: int, call) -> list:
    return concurrently([call] * count)


def reference(spec: RunSpec, folder: Path, prompt: str, max_tokens: int, chat: bool = False,
              quantize: str = "none") -> str:  # fmt: skip
    """Greedy text from plain transformers generate() with PEFT, one request alone (``chat``: ``prompt`` is the
    template's rendering, special tokens included; ``quantize``: the base loaded so by bitsandbytes, on CPU)."""
    from peft import PeftModel

    base, tok = load_base(spec, quantize=quantize)
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    ids = tok(prompt, return_tensors="pt", add_special_tokens=not chat)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_completions_chat_and_streams_match_plain_peft_one_request_at_a_time(tmp_path, chat_run):
    spec_path, spec, a1, a2 = chat_run
    run = spec.run_id
    server = Server(tmp_path, ["--run-spec", str(spec_path), "--adapter", str(a1), "--adapter", str(a2)])
    try:
        c = server.client
        # models: both epochs; the bare run id is the newest
        assert sorted(m.id for m in c.models.list().data) == [f"{run}@1", f"{run}@2"]
        # Execute: concurrent requests of different lengths on two adapters, batched by the server
        def ask(prompt, epoch):
            return (prompt, epoch), c.completions.create(model=f"{run}@{epoch}", prompt=prompt, max_tokens=12,
                                                         temperature=0)  # fmt: skip

        results = dict(concurrently([functools.partial(ask, p, e) for p in PROMPTS for e in (1, 2)]))
        # Assert: each equals plain PEFT generate() of its own adapter, alone
        assert len(results) == 8
        for (prompt, epoch), r in results.items():
            assert r.model == f"{run}@{epoch}" and r.choices[0].finish_reason in ("length", "stop")
            assert r.choices[0].text == reference(spec, a1 if epoch == 1 else a2, prompt, 12), (prompt, epoch)
            assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 0
        assert results[(PROMPTS[0], 1)].choices[0].text != results[(PROMPTS[0], 2)].choices[0].text
        # streaming gives the same text, chunk by chunk
        whole = results[(PROMPTS[2], 1)].choices[0].text
        chunks = list(c.completions.create(model=f"{run}@1", prompt=PROMPTS[2], max_tokens=12, temperature=0,
                                           stream=True))  # fmt: skip
        assert "".join(ch.choices[0].text for ch in chunks) == whole and len(chunks) > 2
        assert chunks[-1].choices[0].finish_reason == "length"
        # stop strings cut the text before them
        if len(whole) > 3:
            stop = whole[2:4]
            r = c.completions.create(model=f"{run}@1", prompt=PROMPTS[2], max_tokens=12, temperature=0, stop=[stop])
            assert r.choices[0].text == whole[: whole.find(stop)] and r.choices[0].finish_reason == "stop"
        # a seed makes sampling repeatable
        sampled = [c.completions.create(model=run, prompt="hi", max_tokens=10, temperature=1.0, top_p=0.9, seed=7)
                   .choices[0].text for _ in range(2)]  # fmt: skip
        assert sampled[0] == sampled[1]
        # chat, through the base tokenizer's template, streamed and not
        messages = [{"role": "user", "content": "hi, how are you?"}]
        chat = c.chat.completions.create(model=run, messages=messages, max_tokens=8, temperature=0)
        assert chat.model == f"{run}@2" and chat.choices[0].message.role == "assistant"
        prompt = load_base(spec)[1].apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert chat.choices[0].message.content == reference(spec, a2, prompt, 8, chat=True)
        streamed = c.chat.completions.create(model=run, messages=messages, max_tokens=8, temperature=0, stream=True)
        assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == chat.choices[0].message.content
    finally:
        server.close()


def test_bad_requests_get_openai_errors_and_cost_only_themselves(tmp_path, chat_run):
    spec_path, spec, a1, _ = chat_run
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    server = Server(tmp_path, ["--run-spec", str(spec_path), "--adapter", str(a1), "--api-key-file", str(key),
                               "--max-body-kb", "4"])  # fmt: skip
    try:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError):
            server.client.models.list()  # the wrong key
        with pytest.raises(openai.NotFoundError) as e:
            c.completions.create(model="nope@1", prompt="hi", max_tokens=2)
        assert e.value.body["code"] == "model_not_found"
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model=spec.run_id, prompt="hi", max_tokens=100_000)
        assert e.value.body["param"] == "max_tokens"
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model=spec.run_id, prompt="hello " * 300, max_tokens=10)
        assert "tokens" in e.value.body["message"]
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model=spec.run_id, messages=[{"role": "user"}], max_tokens=2)
        auth = {"Authorization": "Bearer s3cret"}
        status, body = server.raw("/v1/completions", b"{not json", auth)
        assert status == 400 and body["error"]["type"] == "invalid_request_error"
        status, body = server.raw("/v1/completions", b"x" * 10_000, auth)
        assert status == 413 and "larger" in body["error"]["message"]
        status, body = server.raw("/v1/classify", json.dumps({"model": spec.run_id, "input": "hi"}).encode(), auth)
        assert status == 400 and "causal-lm" in body["error"]["message"]
        # and it still serves
        assert c.completions.create(model=spec.run_id, prompt="hi", max_tokens=2).choices[0].finish_reason
        assert server.raw("/health")[0] == 200
    finally:
        server.close()


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=5),
                    max_leaves=12)  # fmt: skip
FIELDS = st.fixed_dictionaries({}, optional={
    "model": st.sampled_from(["", "x", "RUN", "RUN@1", "RUN@latest", "RUN@-1"]) | JSON,
    "prompt": st.text(max_size=40) | JSON, "messages": JSON | st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "x"]) | JSON, "content": st.text(max_size=20) | JSON}),
        max_size=3),
    "max_tokens": st.integers(-5, 400) | JSON, "temperature": st.floats(allow_nan=True) | JSON,
    "top_p": st.floats(allow_nan=True) | JSON, "stop": JSON, "seed": st.integers() | JSON, "n": JSON,
    "stream": st.booleans() | JSON, "input": JSON})  # fmt: skip


def test_any_json_a_client_sends_gets_an_answer_and_never_a_500(tmp_path, chat_run):
    spec_path, spec, a1, _ = chat_run
    server = Server(tmp_path, ["--run-spec", str(spec_path), "--adapter", str(a1), "--max-tokens", "4"])
    try:
        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        @given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/classify"]), body=FIELDS)
        def post(path, body):
            if body.get("model") in ("RUN", "RUN@1", "RUN@latest", "RUN@-1"):
                body["model"] = body["model"].replace("RUN", spec.run_id)
            data = json.dumps(body).encode()
            req = urllib.request.Request(server.url + path, data=data)
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    status, raw = r.status, r.read()
            except urllib.error.HTTPError as e:
                status, raw = e.code, e.read()
            assert status in (200, 400, 404), (status, raw, body)
            if status != 200:
                assert set(json.loads(raw)["error"]) == {"message", "type", "param", "code"}

        post()
        assert server.process.poll() is None
        assert server.raw("/health")[0] == 200
    finally:
        server.close()


def test_a_flood_beyond_the_queue_gets_429_and_the_server_goes_on(tmp_path, chat_run):
    spec_path, spec, a1, _ = chat_run
    server = Server(tmp_path, ["--run-spec", str(spec_path), "--adapter", str(a1), "--max-queue", "2",
                               "--max-batch", "1"])  # fmt: skip
    try:
        def one():
            try:
                server.client.completions.create(model=spec.run_id, prompt="hello there", max_tokens=60,
                                                 temperature=0)  # fmt: skip
                return 200
            except openai.APIStatusError as e:
                return e.status_code, e.body["type"], e.body["code"]

        full = (429, "rate_limit_error", "queue_full")
        codes = [c if c == 200 else 429 if c == full else c for c in at_once(16, one)]
        # one runs, 2 wait: of 16 at once, most are turned away at once, and every admitted one is served
        assert set(codes) == {200, 429} and codes.count(429) >= 8 and codes.count(200) >= 3, codes
        metrics = urllib.request.urlopen(server.url + "/metrics", timeout=10).read().decode()
        assert f'atlas_serve_rejected_total{{reason="429"}} {float(codes.count(429))}' in metrics
        assert server.client.completions.create(model=spec.run_id, prompt="hi", max_tokens=2).choices
    finally:
        server.close()


def test_hot_swap_mid_stream_the_stream_ends_on_its_adapter_the_next_request_uses_the_new(tmp_path, chat_run):
    import shutil

    spec_path, spec, a1, a2 = chat_run
    live = tmp_path / "peer-out" / "adapter"  # what a peer rewrites after each epoch (atomically)
    shutil.copytree(a1, live)
    server = Server(tmp_path, ["--run-spec", str(spec_path), "--adapter", str(live), "--follow", "--poll", "0.2",
                               "--keep-old", "30", "--max-tokens", "200", "--max-batch", "1"])  # fmt: skip
    try:
        run, c = spec.run_id, server.client
        # Prepare: 12 requests of 200 tokens each ahead of the stream (one at a time: --max-batch 1)
        ahead = [threading.Thread(target=c.completions.create, kwargs=dict(
            model=run, prompt="tell me", max_tokens=200, temperature=0, extra_body={"ignore_eos": True}))
            for _ in range(12)]  # fmt: skip
        for t in ahead:
            t.start()
        chunks, arrived = [], []

        def stream():
            for ch in c.completions.create(model=run, prompt="hello there", max_tokens=40, temperature=0, stream=True):
                arrived.append(time.monotonic())
                chunks.append(ch)

        streamer = threading.Thread(target=stream)
        wait_until(lambda: server.raw("/health")[1]["queue"] >= 10, 30, "the 12 requests to queue")
        streamer.start()
        time.sleep(0.5)  # its model name is resolved (epoch 1) as it arrives; it then waits behind the others
        # Execute: the peer writes its next epoch while the stream holds epoch 1
        tmp = live.parent / ".new"
        shutil.copytree(a2, tmp)
        shutil.rmtree(live)
        tmp.rename(live)
        server._wait_for(rf"serving {run}@2", 30)
        swapped = time.monotonic()
        r = c.completions.create(model=run, prompt="hello there", max_tokens=12, temperature=0)
        streamer.join(120)
        for t in ahead:
            t.join(120)
        # Assert: the stream's text came after epoch 2 was serving, all of it from epoch 1
        assert arrived and arrived[0] > swapped, "the stream was not running across the swap"
        assert {ch.model for ch in chunks} == {f"{run}@1"}
        assert "".join(ch.choices[0].text for ch in chunks) == reference(spec, a1, "hello there", 40)
        # the request after the swap got epoch 2; both are listed for --keep-old
        assert r.model == f"{run}@2" and r.choices[0].text == reference(spec, a2, "hello there", 12)
        assert sorted(m.id for m in c.models.list().data) == [f"{run}@1", f"{run}@2"]
    finally:
        server.close()


def test_classify_serves_the_demo_adapter_like_plain_peft(tmp_path):
    from peft import PeftModel

    spec_path = Path(__file__).resolve().parents[2] / "atlas_swarm" / "specs" / "demo-minilm-topics.toml"
    spec = RunSpec.from_toml(spec_path)
    folder = make_adapter(spec, tmp_path / "minilm", 3)
    server = Server(tmp_path, ["--run-spec", str(spec_path), "--adapter", str(folder)])
    try:
        texts = ["what is the capital of france", "tell me a joke", "do you like football"]
        got = server.client.post("/classify", cast_to=object, body={"model": spec.run_id, "input": texts})
        base, tok = load_base(spec)
        model = PeftModel.from_pretrained(base, str(folder)).eval()
        with torch.no_grad():
            for i, text in enumerate(texts):
                probs = torch.softmax(model(**tok(text, return_tensors="pt")).logits[0], -1)
                row = got["data"][i]
                assert row["label"] == spec.model.labels[int(probs.argmax())]
                assert max(abs(row["probabilities"][lab] - float(p)) for lab, p in zip(spec.model.labels, probs)) < 1e-4
        assert got["model"] == f"{spec.run_id}@3"
    finally:
        server.close()


def test_cli_mistakes_are_one_line_errors(tmp_path, chat_run):
    spec_path, spec, a1, _ = chat_run
    cases = [(["--adapter", str(a1)], "--run-spec"),
             (["--run-spec", str(spec_path), "--adapter", str(tmp_path / "missing")], "error: "),
             (["--run-spec", str(spec_path), "--adapter", "bafy-not-a-cid"], "error: "),
             (["--run-spec", str(spec_path), "--adapter", str(a1), "--http", "nonsense"], "--http"),
             (["--run-spec", str(spec_path), "--adapter", str(a1), "--quantize", "int8"], "CUDA GPU")]  # fmt: skip
    # at once, each in its own --workdir
    done = run_together([[sys.executable, "-m", "atlas_swarm.serve", "--workdir", str(tmp_path / f"w{i}"), *args]
                         for i, (args, _) in enumerate(cases)])  # fmt: skip
    for (args, expect), out in zip(cases, done):
        assert out.returncode == 2 and expect in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)


def test_serving_a_live_run_follows_its_vouched_adapters_and_refuses_tampered_blocks(tmp_path, tiny_model):
    from atlas_swarm import Run
    from atlas_swarm.swarm import PeerStatus
    from atlas_swarm.swarm.records import PublishedAdapter
    from tests.integration.test_publish import _publisher

    # Prepare: honest peer A publishes epoch 1
    spec = Run.create(tiny_model, name="serve-test", lora={"r": 4}).spec
    a1, a2, a3 = (make_adapter(spec, tmp_path / f"adapter{e}", e) for e in (1, 2, 3))
    swarms, server = [], None

    def status(swarm, epoch):
        swarm.publish_status(spec.run_id, PeerStatus(peer_id=swarm.peer_id, device="cpu", precision="fp32",
                             client_mode=False, adapter_shapes="x", epoch=epoch, samples_total=64,
                             samples_per_second=1.0, loss=None, time=time.time()), wait=True)  # fmt: skip

    def publish(swarm, store, *adapters):
        swarm.publish_adapters(spec.run_id, [PublishedAdapter(epoch=e, cid=store.put_folder(f), adapter_hash=f"h{e}",
                                                              time=time.time()) for e, f in adapters])  # fmt: skip

    try:
        a, store_a = _publisher(tmp_path, "a", spec)
        swarms.append(a)
        publish(a, store_a, (1, a1))
        server = Server(tmp_path, ["--run", spec.run_id, "--initial-peers", a.visible_maddrs()[0], "--poll", "0.5",
                                   "--keep-old", "0", "--epoch", "1", "--epoch", "latest"])  # fmt: skip
        server._wait_for(rf"serving {spec.run_id}@1", 60)
        # Execute (attack): B publishes epoch 2 and serves a tampered block of it; A reached epoch 2, so the run
        # vouches for epoch 2 and B is its only publisher
        b, store_b = _publisher(tmp_path, "b", spec, a.visible_maddrs())
        swarms.append(b)
        cid2 = store_b.put_folder(a2)
        leaf = next(p for p in store_b.blocks.iterdir() if p.read_bytes() == b'{\n  "epoch": 2\n}')
        leaf.write_bytes(b'{\n  "epoch": 9\n}')
        b.publish_adapters(spec.run_id, [PublishedAdapter(epoch=2, cid=cid2, adapter_hash="h2", time=time.time())])
        status(a, 2)
        server._wait_for(rf"warning: no newer adapter this time: .*{b.peer_id}", 60)
        # Assert: epoch 1 still serves, and nothing of the tampered adapter was loaded
        assert [m.id for m in server.client.models.list().data] == [f"{spec.run_id}@1"]
        assert f"{spec.run_id}@2" not in server.output()
        metrics = urllib.request.urlopen(server.url + "/metrics", timeout=10).read().decode()
        assert float(re.search(r"^atlas_serve_adapter_fetch_failures (\S+)$", metrics, re.M).group(1)) >= 1
        # Execute: A and a third peer C reach epoch 3 and publish it: the server moves to it
        c, store_c = _publisher(tmp_path, "c", spec, a.visible_maddrs())
        swarms.append(c)
        publish(a, store_a, (1, a1), (3, a3))
        publish(c, store_c, (3, a3))
        status(a, 3)
        status(c, 3)
        server._wait_for(rf"serving {spec.run_id}@3", 60)
        r = server.client.completions.create(model=spec.run_id, prompt="hello there", max_tokens=12, temperature=0)
        assert r.model == f"{spec.run_id}@3" and r.choices[0].text == reference(spec, a3, "hello there", 12)
        # epoch 1 was asked for by number (--epoch 1): still served, though --keep-old is 0
        time.sleep(1.5)  # the engine sweeps retired adapters at least once a second
        assert sorted(m.id for m in server.client.models.list().data) == [f"{spec.run_id}@1", f"{spec.run_id}@3"]
        r = server.client.completions.create(model=f"{spec.run_id}@1", prompt="hello there", max_tokens=12,
                                             temperature=0)  # fmt: skip
        assert r.choices[0].text == reference(spec, a1, "hello there", 12)
    finally:
        if server is not None:
            server.close()
        for s in swarms:
            s.shutdown()


def test_an_adapter_by_cid_from_an_ipfs_daemon(tmp_path, chat_run):
    from atlas_swarm.devnet.ipfs import IpfsDaemon
    from atlas_swarm.storage import IpfsStore

    spec_path, spec, a1, _ = chat_run
    daemon, server = IpfsDaemon.start(tmp_path / "repo"), None
    try:
        cid = IpfsStore(daemon.api).put_folder(a1)
        server = Server(tmp_path, ["--run-spec", str(spec_path), "--adapter", cid, "--ipfs-api", daemon.api])
        r = server.client.completions.create(model=spec.run_id, prompt="hello there", max_tokens=12, temperature=0)
        assert r.model == f"{spec.run_id}@1" and r.choices[0].text == reference(spec, a1, "hello there", 12)
        assert (tmp_path / "serve" / "adapters" / cid).is_dir()  # kept, verified, under its CID
    finally:
        if server is not None:
            server.close()
        daemon.stop()


def test_timeouts_and_clients_that_leave_free_their_requests(tmp_path, chat_run):
    import socket

    spec_path, spec, a1, _ = chat_run
    server = Server(tmp_path, ["--run-spec", str(spec_path), "--adapter", str(a1), "--max-batch", "1",
                               "--request-timeout", "1", "--max-tokens", "200"])  # fmt: skip
    try:
        run = spec.run_id

        def one():
            try:
                server.client.completions.create(model=run, prompt="tell me", max_tokens=200, temperature=0,
                                                 extra_body={"ignore_eos": True})  # fmt: skip
                return 200
            except openai.APIStatusError as e:
                return e.status_code, e.body["type"]

        # Execute: 8 long requests one at a time, each allowed 1 s; then a stream whose client leaves at once
        codes = [c if c == 200 else 504 if c == (504, "timeout_error") else c for c in at_once(8, one)]
        host, port = server.url.split("//")[1].split(":")
        body = json.dumps({"model": run, "prompt": "hi", "max_tokens": 200, "stream": True, "ignore_eos": True})
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n{body}".encode())  # fmt: skip
            assert s.recv(64).startswith(b"HTTP/1.1 200")
        # Assert: the late ones timed out, and nothing stays held: every request released its adapter
        assert len(codes) == 8 and set(codes) == {200, 504}, codes
        wait_until(lambda: server.raw("/health")[1]["in_flight"] == {f"{run}@1": 0}, 30, "requests to be released")
        assert server.client.completions.create(model=run, prompt="hi", max_tokens=2).choices
    finally:
        server.close()


def test_a_4bit_base_serves_what_plain_peft_on_the_same_4bit_base_generates(tmp_path, chat_run):
    # bitsandbytes' real NF4 kernels (its CPU backend; on a GPU, the same flag fits a ~7B base on an 8 GB card)
    spec_path, spec, a1, a2 = chat_run
    server = Server(tmp_path, ["--run-spec", str(spec_path), "--adapter", str(a1), "--adapter", str(a2),
                               "--device", "cpu", "--quantize", "nf4"])  # fmt: skip
    try:
        def ask(prompt, epoch):
            return (prompt, epoch), server.client.completions.create(
                model=f"{spec.run_id}@{epoch}", prompt=prompt, max_tokens=8, temperature=0).choices[0].text

        got = dict(concurrently([functools.partial(ask, p, e) for p in PROMPTS[:2] for e in (1, 2)]))
        assert len(got) == 4
        for (prompt, epoch), text in got.items():
            assert text == reference(spec, a1 if epoch == 1 else a2, prompt, 8, quantize="nf4"), (prompt, epoch)
    finally:
        server.close()
