"""Benchmark content addressing, each figure side by side with its physical baseline on the same bytes:

1. CID of a file (UnixFS chunking, CIDv1 raw leaves) vs hashlib.sha256 of the same file: hashing is the floor.
2. Publish + fetch of an adapter folder on the embedded store (every block written, then read back and verified)
   vs shutil.copytree of the same folder.
3. The same fetch from another peer over p2p (two real DHT nodes on loopback) vs the local fetch.

    python scripts/bench_storage.py [--file-mb 256] [--adapter-mb 32] [--repeat 3] [--json bench-out/storage.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atlas_swarm.storage import LocalStore, cid_of_file  # noqa: E402


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def make_adapter(folder: Path, mb: int) -> Path:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    torch.manual_seed(0)
    n = mb * (1 << 20) // 4 // 16
    save_file({f"layer{i}.lora_A.weight": torch.randn(n // 64, 64) for i in range(16)},
              str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps({"r": 16, "target_modules": ["q_proj", "v_proj"]}))
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--file-mb", type=int, default=256)
    p.add_argument("--adapter-mb", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-p2p", action="store_true", help="skip the two-node fetch")
    p.add_argument("--json", default="bench-out/storage.json")
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    result: dict = {"machine": f"{os.cpu_count()} CPUs", "repeat": a.repeat}
    try:
        # 1. CID vs sha256 of the same file
        path = tmp / "blob"
        with open(path, "wb") as f:
            for _ in range(a.file_mb):
                f.write(os.urandom(1 << 20))
        sha_s = best(lambda: sha256_file(path), a.repeat)
        cid_s = best(lambda: cid_of_file(path, 1), a.repeat)
        result["cid"] = {"mb": a.file_mb, "sha256_mb_s": round(a.file_mb / sha_s, 1),
                         "cid_mb_s": round(a.file_mb / cid_s, 1), "ratio_vs_sha256": round(sha_s / cid_s, 3)}  # fmt: skip
        print(f"CID of {a.file_mb} MB: {a.file_mb / cid_s:.0f} MB/s; sha256 of the same bytes {a.file_mb / sha_s:.0f} "
              f"MB/s; ratio {sha_s / cid_s:.3f}")  # fmt: skip

        # 2. publish + verified fetch of an adapter on the embedded store vs copytree
        adapter = make_adapter(tmp / "adapter", a.adapter_mb)
        size_mb = sum(f.stat().st_size for f in adapter.iterdir()) / (1 << 20)
        counter = iter(range(10**6))

        def copy():
            shutil.copytree(adapter, tmp / f"copy{next(counter)}")

        def round_trip():
            i = next(counter)
            store = LocalStore(tmp / f"store{i}")
            store.fetch_folder(store.put_folder(adapter), tmp / f"out{i}")

        copy_s = best(copy, a.repeat)
        rt_s = best(round_trip, a.repeat)
        result["adapter_round_trip"] = {"mb": round(size_mb, 1), "copytree_s": round(copy_s, 4),
                                        "publish_fetch_s": round(rt_s, 4), "ratio_vs_copytree": round(copy_s / rt_s, 3)}  # fmt: skip
        print(f"publish + verified fetch of a {size_mb:.0f} MB adapter: {rt_s * 1000:.0f} ms; copytree "
              f"{copy_s * 1000:.0f} ms; ratio {copy_s / rt_s:.3f}")  # fmt: skip

        # 3. fetch from another peer over p2p vs the local fetch
        if not a.no_p2p:
            result["p2p_fetch"] = bench_p2p(tmp, adapter, size_mb, a.repeat)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


def bench_p2p(tmp: Path, adapter: Path, size_mb: float, repeat: int) -> dict:
    from atlas_swarm.identity import Identity
    from atlas_swarm.storage.dag import fetch_blocks, parse_cid
    from atlas_swarm.swarm import Swarm, quiet_hivemind

    quiet_hivemind()
    store = LocalStore(tmp / "served")
    cid = store.put_folder(adapter)
    server = Swarm.join(Identity.load_or_create(tmp / "a.key"), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    client = None
    try:
        server.serve_blocks(store.get_blocks)
        client = Swarm.join(Identity.load_or_create(tmp / "b.key"), server.visible_maddrs(), ["/ip4/127.0.0.1/tcp/0"])
        remote = client.blocks_from(server.peer_id)
        local_s = best(lambda: fetch_blocks(store.get_blocks, parse_cid(cid)), repeat)
        p2p_s = best(lambda: fetch_blocks(remote, parse_cid(cid)), repeat)
    finally:
        if client is not None:
            client.shutdown()
        server.shutdown()
    print(f"verified fetch of {size_mb:.0f} MB from a peer over p2p: {p2p_s * 1000:.0f} ms ({size_mb / p2p_s:.0f} MB/s); "
          f"from the local store {local_s * 1000:.0f} ms; ratio {local_s / p2p_s:.3f}")  # fmt: skip
    return {"mb": round(size_mb, 1), "local_s": round(local_s, 4), "p2p_s": round(p2p_s, 4),
            "p2p_mb_s": round(size_mb / p2p_s, 1), "ratio_vs_local": round(local_s / p2p_s, 3)}  # fmt: skip


if __name__ == "__main__":
    main()
