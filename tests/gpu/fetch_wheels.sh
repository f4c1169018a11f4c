#!/usr/bin/env bash
# Run on the development machine (it has pip's index) before a GPU run: puts into .whl/ (ignored
# by git) the packages that the GPU machine's image lacks, at the versions of this checkout's
# virtual environment. The image has torch, Triton, numpy, pyyaml, pytest and DeepSpeed's other
# needs (einops, msgpack, ninja, packaging, psutil, py-cpuinfo, tqdm); it cannot reach an index.
# DeepSpeed ships only as an sdist: its wheel is built here (pure Python; its ops build on use).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
pins=$("$PY" -c 'import importlib.metadata as m
print(" ".join(f"{n}=={m.version(n)}" for n in
      ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "hjson")))')
ds=$("$PY" -c 'import importlib.metadata as m; print(m.version("deepspeed"))')
rm -rf .whl.tmp && mkdir .whl.tmp
# the GPU image's python3 is CPython 3.12 on x86-64 (see the device tool's KINDS.md)
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl.tmp $pins
"$PY" -m pip wheel -q --no-deps -w .whl.tmp "deepspeed==$ds"
rm -rf .whl && mv .whl.tmp .whl  # a half-fetched set never sits under the name that a run carries
ls .whl
