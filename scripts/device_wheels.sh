#!/usr/bin/env bash
# Wheels for running the GPU checks (scripts/gpu_check.py) on an offline CUDA machine that has its own Python 3.12,
# torch, numpy, scipy, accelerate, huggingface_hub, tokenizers, safetensors, msgpack, uvloop, protobuf and the like,
# but not our other dependencies. Writes them to ${1:-.whl}; bitsandbytes keeps only its CPU and CUDA 13 libraries
# (43 MB -> 7 MB). On that machine, from the repository's root:
#   python3 -m pip install --no-index --no-deps --target .site .whl/*.whl && chmod +x .site/hivemind/hivemind_cli/p2pd
#   PYTHONPATH=$PWD/.site:$PWD HF_HUB_OFFLINE=1 python3 scripts/gpu_check.py --checks qlora,card --qlora-shapes 1b,7b
# Versions are this project's pins (setup.cfg) and what its .venv resolved on 2026-12-04.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$(realpath -m "${1:-$root/.whl}")"
mkdir -p "$out"
binary=(hivemind==1.1.12 bitsandbytes==0.50.2 transformers==5.24.0 peft==0.21.2 cryptography==50.0.2 cffi==2.1.1
        pycparser==3.12 pydantic==2.14.4 pydantic_core==2.50.5 typing_extensions==4.16.0 typing-inspection==0.4.5
        annotated-types==0.8.0 base58==2.1.1 configargparse==1.9.0 netaddr==1.3.0 py-cid==0.5.0 py-multibase==2.0.0
        py-multicodec==1.0.0 py-multihash==3.0.0 mmh3==5.3.1 blake3==1.0.11)
plat=()
for p in manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 \
         manylinux_2_5 manylinux1; do plat+=(--platform "${p}_x86_64"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
    -d "$out" "${binary[@]}"
# sdists only: pure Python, built here
python3 -m pip wheel -q --no-deps -w "$out" prefetch_generator==1.0.3 varint==1.0.2 morphys==1.0 \
    python-baseconv==1.2.2 chatterbot-corpus==1.3.3
bnb=$(ls "$out"/bitsandbytes-*.whl)
tmp=$(mktemp -d)
(cd "$tmp" && python3 -m zipfile -e "$bnb" . \
    && find bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda13*.so' -delete \
    && sed -i '/libbitsandbytes_\(cuda1[12]\|rocm\|xpu\)/d' bitsandbytes-*.dist-info/RECORD \
    && rm "$bnb" && python3 -m zipfile -c "$bnb" ./*)
rm -rf "$tmp"
du -sh "$out"
