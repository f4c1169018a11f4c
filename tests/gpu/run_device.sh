#!/usr/bin/env bash
# Every GPU check in one device call (at most 9 minutes, inside one 10-minute command; not yet run):
# installs the wheels that tests/gpu/fetch_wheels.sh put into .whl/, runs the three CUDA checks and
# the GPU benchmark, and writes each log to $OUT. From the development machine:
#     tests/gpu/fetch_wheels.sh
#     device tool: run(command="bash tests/gpu/run_device.sh", carry=[".whl"], timeout_s=590)
# Each step has its own time limit, so a hang in one still leaves the others' logs; the exit
# status is 1 if any step failed.
set -uo pipefail
OUT=${OUT:-/tmp/imram-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda  # tests/conftest.py defaults it to cpu for the CPU suite
PY=${PYTHON:-python3}  # the GPU image's python3 holds torch
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "run_device.sh: installing .whl/ failed (run tests/gpu/fetch_wheels.sh first)"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD"
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
"$PY" -c 'import torch, triton, deepspeed, pydantic
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__,
      "deepspeed", deepspeed.__version__, "pydantic", pydantic.VERSION, torch.cuda.get_device_name(0))' \
    2>&1 | tee "$OUT/versions.txt"
status=0
step() {  # step NAME SECONDS COMMAND...: one check, its log in $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s)"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc"
    [ "$rc" = 0 ] || status=1
}
# 540 s of limits in all: the command's 600 s less the install and the transfers
step check_model_cuda 110 "$PY" -m pytest -q -p no:cacheprovider tests/gpu/check_model_cuda.py
step check_evaluate_cuda 60 "$PY" -m pytest -q -p no:cacheprovider tests/gpu/check_evaluate_cuda.py
step check_deepspeed_cuda 110 "$PY" -m pytest -q -p no:cacheprovider tests/gpu/check_deepspeed_cuda.py
# scoring and training in two processes, so that the scoring table comes back even if the
# training steps (and their compiles) run out of time
step bench_scoring_gpu 110 "$PY" benchmarks/bench_model_gpu.py --no-train
step bench_training_gpu 150 "$PY" benchmarks/bench_model_gpu.py --no-score
exit $status
