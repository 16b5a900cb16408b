#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_check.sh needs on the GPU device into .whl/ (git-ignored).
#
#   benchmarks/fetch_gpu_wheels.sh
#
# The device image (Python 3.12, torch 2.11, transformers 5.17, einops, msgpack, ninja, psutil,
# py-cpuinfo, numpy, packaging, tqdm, pyyaml, tensorboard) lacks DeepSpeed and the parts of its
# Requires-Dist it does not have: hjson and pydantic (+ pydantic-core for cp312 manylinux,
# annotated-types, typing-inspection, and a typing-extensions new enough for them). Versions are the
# ones this repo's CPU .venv runs. The registry has deepspeed 0.19.8 as a source archive only, so it is
# built here into a pure-Python py3-none-any wheel (DS_BUILD_OPS=0: no compiled ops; the trainer uses
# torch optimizers, so none is needed; setup.py imports torch, hence .venv's Python and no isolation). Carry the folder: the device tool's `carry: [".whl"]`; gpu_check.sh
# installs them with pip --no-index --target when `import deepspeed` fails there.
set -euo pipefail
# It takes no arguments: --help prints the header above; anything else is refused before any download
# (it was ignored, so `--help` built and downloaded every wheel).
case "${1-}" in
  "") ;;
  -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "usage: benchmarks/fetch_gpu_wheels.sh" >&2
     echo "fetch_gpu_wheels.sh: error: unexpected argument '$1' (it takes none; see --help)" >&2; exit 2 ;;
esac
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$repo/.whl"
mkdir -p "$dest"
py="${PYTHON:-$repo/.venv/bin/python}"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$dest" deepspeed==0.19.8
for req in hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
           typing-inspection==0.4.5 typing-extensions==4.16.0; do
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$dest" "$req"
done
# What each wheel needs, for checking against the device's package list (skip `extra ==` lines).
for whl in "$dest"/*.whl; do
  echo "$(basename "$whl"): $(unzip -p "$whl" '*/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' \
    | sed 's/Requires-Dist: //' | tr '\n' ' ')"
done
du -sh "$dest"
