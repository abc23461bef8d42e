"""Serving throughput: `python -m atlas_swarm.serve` under a bounded load beside a plain transformers generate() loop
that serves the same requests one at a time, on the same model and adapter, in one run. Prints JSON.

    .venv/bin/python scripts/bench_serve.py [--shape tiny|smol] [--clients 64] [--seconds 60] [--max-tokens 32]
                                            [--max-batch 64] [--device cpu|cuda] [--quantize none|nf4|int8]
                                            [--out FILE]

The load: --clients threads, each sending a completion request (greedy, exactly --max-tokens new tokens on both
sides, prompts from the chatterbot corpus) as soon as its previous one returns, for --seconds. The baseline: one
process, one request at a time (PEFT model, `generate()`), the same prompts, for --seconds. Both on a random Llama
of --shape (or the base of --run-spec); random weights of a given shape cost what real ones do. On a 2-core machine
the clients share the CPU with the server, as they would on a laptop; the baseline has the CPU to itself.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def prompts() -> list[str]:
    from atlas_swarm.train.builtin import chatterbot_topics

    return [row["text"][:80] for row in chatterbot_topics("train")][:512]


# SmolLM2-135M's shape (the shipped chat spec's base), random weights; the tiny BPE tokenizer (ids it lacks decode
# to nothing, so text is shorter than the token counts, which are what is measured)
SMOL = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True)


def build_model(workdir: Path, shape: str) -> Path:
    from atlas_swarm.devnet.tiny_model import build_tiny_model

    folder = build_tiny_model(workdir / "tiny", prompts())
    if shape == "smol":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig.from_pretrained(folder)
        for k, v in SMOL.items():
            setattr(config, k, v)
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


def prepare(workdir: Path, spec_path: str | None, shape: str = "tiny"):
    from atlas_swarm.config import RunSpec
    from atlas_swarm.model.lora import load_model, save_adapter

    if spec_path is None:
        model_dir = build_model(workdir, shape)
        spec_path = workdir / "spec.toml"
        spec_path.write_text(f'name = "bench-serve"\n[model]\nbase = "{model_dir}"\ntask = "causal-lm"\n'
                             f'max_length = 128\n[lora]\nr = 8\nalpha = 16\ntarget_modules = ["q_proj", "v_proj"]\n')
    spec = RunSpec.from_toml(spec_path)
    model, _ = load_model(spec)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return spec_path, spec, save_adapter(model, workdir / "adapter", {"epoch": 1})


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def summary(latencies: list[float], tokens: int, seconds: float) -> dict:
    return {"requests": len(latencies), "requests_per_s": round(len(latencies) / seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1), "p50_s": round(percentile(latencies, 0.5), 3),
            "p99_s": round(percentile(latencies, 0.99), 3),
            "mean_s": round(statistics.fmean(latencies), 3) if latencies else None}  # fmt: skip


def load_server(url: str, model: str, texts: list[str], clients: int, seconds: float, max_tokens: int) -> dict:
    host, port = url.split("//")[1].split(":")
    latencies, tokens, errors, lock = [], [0], [0], threading.Lock()
    end = time.monotonic() + seconds

    def client(i: int) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=300)
        k = i
        while time.monotonic() < end:
            body = json.dumps({"model": model, "prompt": texts[k % len(texts)], "max_tokens": max_tokens,
                               "temperature": 0, "ignore_eos": True})  # fmt: skip
            k += clients
            t0 = time.monotonic()
            try:
                conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
                r = conn.getresponse()
                data = json.loads(r.read())
            except (OSError, http.client.HTTPException, ValueError):
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=300)
                with lock:
                    errors[0] += 1
                continue
            with lock:
                if r.status == 200:
                    latencies.append(time.monotonic() - t0)
                    tokens[0] += data["usage"]["completion_tokens"]
                else:
                    errors[0] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = summary(latencies, tokens[0], time.monotonic() - began)
    out["errors"] = errors[0]
    return out


def baseline(spec, adapter: Path, texts: list[str], seconds: float, max_tokens: int, device: str = "cpu",
             quantize: str = "none") -> dict:
    from peft import PeftModel

    from atlas_swarm.model.lora import load_base

    base, tok = load_base(spec, quantize=quantize, device=device)  # the server's loader: the same weights and dtype
    if quantize == "none":
        base.to(device)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    latencies, tokens, k = [], 0, 0
    began = time.monotonic()
    with torch.inference_mode():
        while time.monotonic() - began < seconds:
            t0 = time.monotonic()
            ids = tok(texts[k % len(texts)], return_tensors="pt").to(device)
            out = model.generate(**ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            tokens += out.shape[1] - ids["input_ids"].shape[1]
            latencies.append(time.monotonic() - t0)
            k += 1
    return summary(latencies, tokens, time.monotonic() - began)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=64, help="the server's --max-batch")
    p.add_argument("--shape", choices=("tiny", "smol"), default="tiny",
                   help="tiny: the tests' 2-layer Llama; smol: SmolLM2-135M's shape (random weights)")
    p.add_argument("--run-spec", help="a causal-LM spec instead of --shape")
    p.add_argument("--device", default="cpu", help="both sides on this device (cpu, cuda)")
    p.add_argument("--quantize", default="none", choices=("none", "nf4", "int8"), help="both sides' base (CUDA)")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        spec_path, spec, adapter = prepare(work, args.run_spec, args.shape)
        texts = prompts()
        base = baseline(spec, adapter, texts, args.seconds, args.max_tokens, args.device, args.quantize)
        log = (work / "serve.log").open("w+")
        server = subprocess.Popen([sys.executable, "-m", "atlas_swarm.serve", "--run-spec", str(spec_path),
                                   "--adapter", str(adapter), "--http", "127.0.0.1:0", "--workdir", str(work / "w"),
                                   "--max-batch", str(args.max_batch), "--max-queue", str(4 * args.clients),
                                   "--device", args.device, "--quantize", args.quantize],
                                  stdout=log, stderr=subprocess.STDOUT, text=True, cwd=ROOT)  # fmt: skip
        try:
            deadline, url = time.monotonic() + 120, None
            while url is None and time.monotonic() < deadline and server.poll() is None:
                log.seek(0)
                found = re.search(r"listening on (http://\S+)/v1", log.read())
                url = found.group(1) if found else None
                time.sleep(0.2)
            if url is None:
                log.seek(0)
                raise SystemExit(f"the server did not start:\n{log.read()}")
            served = load_server(url, spec.run_id, texts, args.clients, args.seconds, args.max_tokens)
        finally:
            server.terminate()
            server.wait(30)
    result = {"clients": args.clients, "seconds": args.seconds, "max_tokens": args.max_tokens,
              "max_batch": args.max_batch,
              "base": spec.model.base if args.run_spec else f"random Llama, {args.shape} shape",
              "device": args.device, "quantize": args.quantize, "date": time.strftime("%Y-%m-%d"),
              "threads": torch.get_num_threads(), "server": served, "one_at_a_time": base,
              "tokens_per_s_ratio": round(served["tokens_per_s"] / base["tokens_per_s"], 2)}  # fmt: skip
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
