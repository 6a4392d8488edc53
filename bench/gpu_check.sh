#!/usr/bin/env bash
# The prepared GPU check: what a CPU cannot show, in one run of under 8 minutes on one GPU,
# every result under one folder.
#
#   bash bench/gpu_check.sh prepare        # here, where PyPI is reachable: fills .gpu/ (git-ignored)
#   bash bench/gpu_check.sh run [FOLDER]   # on the GPU host, from the repository root, .gpu/ beside it
#   PYTHON=.venv/bin/python INSTALL=0 bash bench/gpu_check.sh run /tmp/check   # a dry run on a CPU
#
# `prepare` downloads, as Python 3.12 wheels, the packages the project needs that a JAX
# GPU image usually lacks (the web stack, the openai SDK, gguf), and saves the default
# model's tokenizer (the model itself, 94 MB, stays behind: the serving run uses random
# weights of its shape). `run` uses the host's python3 with its own jax, jaxlib and CUDA
# plugin, and writes into FOLDER (default: $OUT if set, else bench/results/gpu-check-<stamp>):
#   environment.txt  jax, jaxlib, the CUDA plugin, the device, nvidia-smi
#   gpu-tests.txt    pytest -m gpu: the kernels against the gather path on the device, the kernel
#                    compiled through Triton (not interpreted), cuDNN's fused prefill, HIGH and
#                    ULTRA bitwise batch-invariant under XLA:GPU, numerics' error-free transformations
#   roofline.txt, roofline-*.json   bench.roofline: decode MBU and prefill MFU per shape and backend
#   roofline-int8.txt                 the same with int8 weights (float and per-token int8 activations)
#   serving.txt, serving-*.json     bench.serving at 1, 16 and 64 streams on SmolLM2's shape
#   server.log       the server's log
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(annotated-types faker gguf httpcore2 httpx2 jiter litestar litestar-htmx msgspec multipart openai
        polyfactory pydantic pydantic-core rich-click sniffio truststore typing-inspection uvicorn)

prepare() {
    local python=${PYTHON:-.venv/bin/python}
    rm -rf .gpu && mkdir -p .gpu/wheels
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .gpu/wheels "${WHEELS[@]}"
    "$python" -c "from checkpoints.loader import load_model; load_model().tokenizer.save(__import__('pathlib').Path('.gpu/tokenizer'))"
    du -sh .gpu
}

run() {
    local out=${1:-${OUT:-bench/results/gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}}
    mkdir -p "$out"
    out=$(cd "$out" && pwd)
    local python=${PYTHON:-python3}
    if [ "${INSTALL:-1}" = 1 ]; then
        "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .gpu/wheels/*.whl
        export PYTHONPATH=/tmp/site:$PWD
    else
        export PYTHONPATH=$PWD
    fi
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 BALANSIS_TOKENIZER=$PWD/.gpu/tokenizer

    { "$python" -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__); print(jax.devices()); print([d.device_kind for d in jax.devices()])"
      "$python" -m pip list 2>/dev/null | grep -Ei '^(jax|jaxlib|jax-cuda|flax|nvidia-cudnn|triton) ' || true
      nvidia-smi || true; } > "$out/environment.txt" 2>&1

    timeout 180 "$python" -m pytest -m gpu -q -p no:cacheprovider tests/gpu > "$out/gpu-tests.txt" 2>&1 || true
    timeout 140 "$python" -m bench.roofline --results-dir "$out" --steps 10 > "$out/roofline.txt" 2>&1 || true
    timeout 90 "$python" -m bench.roofline --results-dir "$out" --steps 5 --backends xla --batches 1 64 \
        --quantizations int8 int8-dynamic > "$out/roofline-int8.txt" 2>&1 || true

    "$python" -m bench.random_checkpoint --shape smollm2-135m --tokenizer .gpu/tokenizer --out /tmp/smollm2-random \
        > /dev/null
    local port=8011
    "$python" -m serving.cli serve --model /tmp/smollm2-random --port $port --no-warmup --no-access-log \
        --max-model-len 1024 > "$out/server.log" 2>&1 &
    local server=$!
    for _ in $(seq 240); do
        curl -sf "http://127.0.0.1:$port/ready" > /dev/null && break
        sleep 0.5
    done
    timeout 90 "$python" -m bench.serving --url "http://127.0.0.1:$port/v1" --concurrency 1 16 64 \
        --results-dir "$out" > "$out/serving.txt" 2>&1 || true
    kill -TERM $server; wait $server || true
    ls -l "$out"
}

case "${1:-}" in
    prepare) prepare ;;
    run) shift; run "$@" ;;
    *) echo "usage: bash bench/gpu_check.sh prepare | run [FOLDER]" >&2; exit 2 ;;
esac
