"""One swarm peer alone vs a plain PyTorch + PEFT loop: same model (all-MiniLM-L6-v2 + the demo's LoRA), data, batch
and thread count, side by side in one run. Writes JSON.

Both run as separate processes at the same time, but only one of them runs at any moment: the bench stops one
(SIGSTOP to its whole process group: the peer with its DHT, averagers and p2pd) and continues the other, swapping
every --window-s seconds, ABBA order. Each one's samples/s is its samples over the time it was allowed to run. Why:
this shared VM's speed drifts by up to 2x within a minute (a fixed matmul loop measured 0.64-1.31x of its median in
40 s), so two runs made one after the other compare the host's moods, not the code (3 alternating runs of each
gave ratios from 0.84 to 0.98 for the same code). Windows of a few seconds see nearly the same host. While the peer
is stopped its helpers are stopped too, so none of its background work lands in the plain loop's time.

    python scripts/bench_peer.py [--batch-size 8] [--threads 2] [--windows 24] [--window-s 3]
                                 [--out bench-out/bench_peer.json]

Consumer GPUs (issue 21): ``--shape 1b|7b --quantize nf4 --device cuda`` runs both on a random-weight Llama of that
shape (TinyLlama-1.1B's or Llama-2-7B's; random weights of the real shape measure memory and speed honestly),
sequences of ``--seq-len`` tokens, LoRA r=16 on q/k/v/o. The baseline is then the QLoRA recipe written with
transformers, bitsandbytes and peft alone (no atlas code but the data); each side also reports its peak GPU memory.
``--shape tiny`` checks the same path on a CPU (bitsandbytes' CPU backend) in a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

SPEC = Path(__file__).resolve().parent.parent / "atlas_swarm" / "specs" / "demo-minilm-topics.toml"
WARMUP = 5  # steps before measuring (first steps allocate, and the peer's DHT starts up)
SHAPES = {  # LlamaConfig fields: TinyLlama-1.1B, Llama-2-7B, and the tests' tiny model for a CPU check
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
}  # fmt: skip


def build_shape(shape: str, folder: Path, seq_len: int) -> tuple[Path, Path, Path]:
    """A random-weight Llama of ``shape`` (bf16, built on the GPU when there is one), a tokenizer trained on the
    corpus, a causal-lm spec for it, and a .txt file whose every line fills ``seq_len`` tokens."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from atlas_swarm.devnet.tiny_model import build_tiny_model
    from atlas_swarm.train.builtin import chatterbot_topics

    texts = [r["text"] for r in chatterbot_topics("train")]
    model_dir = folder / f"llama-{shape}"
    if not (model_dir / "config.json").exists() or not any(model_dir.glob("*.safetensors")):
        build_tiny_model(model_dir, texts)  # the tokenizer (and a tiny model, replaced below unless shape is tiny)
        if shape != "tiny":
            config = LlamaConfig(vocab_size=32000, max_position_embeddings=max(seq_len, 256), **SHAPES[shape],
                                 pad_token_id=0, eos_token_id=1, bos_token_id=1)  # fmt: skip
            device = "cuda" if torch.cuda.is_available() else "cpu"
            with torch.device(device):
                model = LlamaForCausalLM(config).to(torch.bfloat16)
            for f in model_dir.glob("*.safetensors"):
                f.unlink()
            model.save_pretrained(model_dir, safe_serialization=True)
            del model
    spec = folder / f"llama-{shape}.toml"
    spec.write_text(f'''name = "bench-{shape}"
[model]
base = "{model_dir}"
task = "causal-lm"
max_length = {seq_len}
[lora]
r = 16
alpha = 32
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj"]
[averaging]
target_batch_size = 100000
''')
    data = folder / f"long-{seq_len}.txt"
    long_line = " ".join(texts)[: seq_len * 8]  # far more than seq_len tokens: every example is cut to seq_len
    data.write_text("\n".join([long_line] * 64) + "\n")
    return spec, model_dir, data


def step_and_report(opt, done: int, device: str) -> int:
    """The optimizer step, then one JSON line: samples so far and the peak GPU memory (None off a GPU)."""
    import torch

    opt.step()
    opt.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    print(json.dumps({"event": "step", "time": round(time.time(), 3), "local_samples": done, "gpu_peak_gb": peak}),
          flush=True)  # fmt: skip
    return done


def qlora_worker(spec_path: Path, data: str, batch_size: int, device: str, quantize: str) -> None:
    """The baseline on a GPU: the QLoRA recipe as its tutorials write it (transformers + bitsandbytes + peft)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from atlas_swarm.config import RunSpec
    from atlas_swarm.train.data import Batches, load_examples

    spec = RunSpec.from_toml(spec_path)
    compute = torch.bfloat16
    q = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=compute) if quantize == "nf4" else BitsAndBytesConfig(load_in_8bit=True))
    model = AutoModelForCausalLM.from_pretrained(spec.model.base, quantization_config=q, device_map={"": device},
                                                 dtype=compute)  # fmt: skip
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})  # fmt: skip
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=spec.lora.r, lora_alpha=spec.lora.alpha,
                                             target_modules=list(spec.lora.target_modules)))  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(spec.model.base)
    batches = Batches(load_examples(data, spec), tokenizer, spec)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.optimizer.lr)
    model.train()
    done = 0
    while True:
        batch = {k: v.to(device) for k, v in batches.next(batch_size).items()}
        with torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=compute):
            loss = model(**batch).loss
        loss.backward()
        done = step_and_report(opt, done + batch_size, device)


def plain_worker(spec_path: Path, data: str, batch_size: int, threads: int, device: str) -> None:
    """The baseline: the training step every PEFT tutorial writes, one JSON line per step, until killed."""
    import torch

    from atlas_swarm.config import RunSpec
    from atlas_swarm.model.lora import adapter_parameters, load_model
    from atlas_swarm.train.data import Batches, load_examples
    from atlas_swarm.train.steps import Precision, accumulate_gradients

    torch.set_num_threads(threads)
    spec = RunSpec.from_toml(spec_path)
    model, tokenizer = load_model(spec, device=device)
    model.train()
    batches = Batches(load_examples(data, spec), tokenizer, spec)
    opt = torch.optim.AdamW([p for _, p in adapter_parameters(model)], lr=spec.optimizer.lr)
    precision = Precision.for_device(device)
    done = 0
    while True:
        accumulate_gradients(model, batches.next, batch_size, batch_size, device, precision)
        done = step_and_report(opt, done + batch_size, device)


class Contender:
    """A process group whose JSON lines (with "time" and "local_samples") go to a file."""

    def __init__(self, name: str, cmd: list[str], log: Path):
        self.name, self.log = name, log
        self.windows: list[tuple[float, float]] = []
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)  # fmt: skip

    def peak_gb(self):
        """The last peak GPU memory it reported (None off a GPU)."""
        peaks = [json.loads(line).get("gpu_peak_gb") for line in self.log.read_text().splitlines()
                 if line.startswith("{")]  # fmt: skip
        peaks = [x for x in peaks if x is not None]
        return round(peaks[-1], 2) if peaks else None

    def points(self) -> list[tuple[float, int]]:
        out = []
        for line in self.log.read_text().splitlines():
            if line.startswith("{"):
                e = json.loads(line)
                if e["event"] in ("step", "progress"):
                    out.append((e["time"], e["local_samples"]))
        return out

    def wait_for_samples(self, samples: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(s >= samples for _, s in self.points()):
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                tail = self.log.read_text()[-3000:]
                raise SystemExit(f"{self.name} did no {samples} samples in {timeout:.0f} s:\n{tail}")
            time.sleep(0.2)

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def run_for(self, seconds: float) -> None:
        self.signal(signal.SIGCONT)
        t0 = time.time()
        time.sleep(seconds)
        self.signal(signal.SIGSTOP)
        self.windows.append((t0, time.time()))

    def active_before(self, t: float) -> float:
        return sum(max(0.0, min(b, t) - a) for a, b in self.windows)

    def rate(self, since: float, until: float) -> tuple[float, int]:
        """Samples per second of running time, between its first and last report in [since, until]."""
        pts = [(t, s) for t, s in self.points() if since <= t <= until]
        (t0, s0), (t1, s1) = pts[0], pts[-1]
        return (s1 - s0) / (self.active_before(t1) - self.active_before(t0)), s1 - s0

    def stop(self, grace: float) -> None:
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--windows", type=int, default=24, help="running windows per contender")
    ap.add_argument("--window-s", type=float, default=3.0, help="seconds per window")
    ap.add_argument("--out", default="bench-out/bench_peer.json")
    ap.add_argument("--shape", default="minilm", choices=["minilm", *SHAPES], help="minilm: the demo's model and "
                    "data; else a random-weight Llama of that shape on sequences of --seq-len tokens")  # fmt: skip
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--quantize", default="none", choices=["none", "nf4", "int8"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--plain-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--spec", default=str(SPEC), help=argparse.SUPPRESS)
    ap.add_argument("--data", default="builtin:chatterbot-topics", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain_worker:
        if args.quantize != "none":
            qlora_worker(Path(args.spec), args.data, args.batch_size, args.device, args.quantize)
        else:
            plain_worker(Path(args.spec), args.data, args.batch_size, args.threads, args.device)
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    spec, data = SPEC, "builtin:chatterbot-topics"
    if args.shape != "minilm":
        spec, _, data = build_shape(args.shape, out.parent / "shapes", args.seq_len)
        data = str(data)
    same = ["--batch-size", str(args.batch_size), "--threads", str(args.threads), "--device", args.device,
            "--quantize", args.quantize]  # fmt: skip
    peer_dir = out.parent / "bench_peer-peer"
    shutil.rmtree(peer_dir, ignore_errors=True)  # a fresh peer (an old --out would be resumed)
    warm = WARMUP * args.batch_size
    plain = Contender("plain loop", [sys.executable, __file__, "--plain-worker", "--spec", str(spec), "--data", data,
                                     *same], out.parent / "bench_peer-plain.log")  # fmt: skip
    peer = None
    try:
        plain.wait_for_samples(warm, 300)
        plain.signal(signal.SIGSTOP)
        peer = Contender("swarm peer", [
            sys.executable, "-m", "atlas_swarm.peer", "--run-spec", str(spec), "--data", data, *same, "--log-format", "json",
            "--out", str(peer_dir), "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
        ], out.parent / "bench_peer-peer.log")  # fmt: skip
        peer.wait_for_samples(warm, 300)
        peer.signal(signal.SIGSTOP)
        begin = time.time()
        for i in range(args.windows):
            first, second = (plain, peer) if i % 2 == 0 else (peer, plain)  # ABBA: neither always goes first
            first.run_for(args.window_s)
            second.run_for(args.window_s)
        end = time.time()
        (plain_rate, plain_n), (peer_rate, peer_n) = plain.rate(begin, end), peer.rate(begin, end)
        # the same ratio per pair of adjacent windows, to show the spread the alternation leaves
        pairs = []
        for (a0, a1), (b0, b1) in zip(plain.windows, peer.windows):
            try:
                pairs.append(peer.rate(b0, b1)[0] / plain.rate(a0, a1)[0])
            except (IndexError, ZeroDivisionError):
                pass  # a window without two reports
    finally:
        plain.stop(5)
        if peer is not None:
            peer.stop(20)
    quart = statistics.quantiles(pairs, n=4) if len(pairs) >= 2 else [float("nan")] * 3
    result = {
        "plain_peft_samples_per_s": round(plain_rate, 2),
        "swarm_peer_samples_per_s": round(peer_rate, 2),
        "ratio": round(peer_rate / plain_rate, 3),
        "samples_measured": {"plain": plain_n, "peer": peer_n},
        "window_pair_ratio_quartiles": [round(q, 3) for q in quart],
        "gpu_peak_gb": {"plain": plain.peak_gb(), "peer": peer.peak_gb()},
        "shape": args.shape, "seq_len": args.seq_len if args.shape != "minilm" else None, "quantize": args.quantize,
        "device": args.device,
        "windows": args.windows, "window_s": args.window_s, "batch_size": args.batch_size, "threads": args.threads,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {version('torch')}",
        "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    out.write_text(json.dumps(result, indent=2))
    print(f"plain PEFT loop {plain_rate:.2f} samples/s | swarm peer {peer_rate:.2f} samples/s | ratio "
          f"{peer_rate / plain_rate:.3f} ({plain_n} and {peer_n} samples in {args.windows} windows of "
          f"{args.window_s:g} s each; per window pair: quartiles {result['window_pair_ratio_quartiles']})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
