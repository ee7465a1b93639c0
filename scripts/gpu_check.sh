#!/usr/bin/env bash
# Issue 19's GPU measurements and gpu-marked tests, in one run of under 8 minutes on one GPU.
#
# Two steps, the first here (with a package index), the second on the GPU machine:
#
#   bash scripts/gpu_check.sh fetch
#       copies this script to /work/main/.gpu/ and downloads the wheels the GPU machine lacks
#       (pydantic, webdataset, open_clip, open_flamingo and their small pure dependencies, for
#       CPython 3.12 x86-64) into /work/main/.gpu/whl; .gpu/ is ignored through
#       .git/info/exclude (about 7 MiB: well under the 64 MiB a run may carry).
#
#   device run, from the checkout's root, carry [".gpu"], timeout_s 560:
#       bash .gpu/gpu_check.sh
#       installs the wheels into /tmp/site, then, each stage under its own timeout so that a
#       slow one cannot take the others' time, writes to $OUT:
#         tests.log         pytest -m gpu tests/test_gpu.py, then the CPU step tests there
#         eager.log/.json   benchmarks/fsdp_step.py at the OpenFlamingo-3B shape, eager, with
#                           --sync-check (one step with any host sync but the one read raising)
#         compiled.log      the same, --compile
#         openflamingo.log  OpenFlamingo 2.0.1's train_one_epoch against ours, same weights and
#                           batches (the tokenizer-sized vocabulary: see fsdp_step.py)
#         results.jsonl     one JSON line per benchmark run (samples/s, tokens/s, MFU, memory)
#       LAION_BATCH and MMC4_BATCH (per GPU, default 64 and 16) set the batch sizes.
#
# Timings: tests 60 s, eager 100 s, compiled 170 s, OpenFlamingo 140 s (about 8 minutes with the
# install); the model of each run is built from configs (random weights, nothing downloaded).
set -u

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

fetch() {
    local repo=/work/main
    mkdir -p "$repo/.gpu/whl"
    grep -qx '/.gpu/' "$repo/.git/info/exclude" 2>/dev/null || echo '/.gpu/' >>"$repo/.git/info/exclude"
    cp "$0" "$repo/.gpu/gpu_check.sh"
    # versions as in this project's venv (pip list there), pure Python but pydantic_core
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$repo/.gpu/whl" \
        pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
        webdataset==1.0.2 braceexpand==0.1.7 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 \
        open-flamingo==2.0.1 einops-exts==0.0.4
    du -sh "$repo/.gpu"
}

if [ "${1:-}" = "fetch" ]; then
    fetch
    exit
fi

OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
if [ -z "${GPU_CHECK_SMOKE:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$HERE"/whl/*.whl || exit 1
fi
export PYTHONPATH="$PWD:/tmp/site"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)" >>"$OUT/gpu.txt" 2>&1

LAION="${LAION_BATCH:-64}"
MMC4="${MMC4_BATCH:-16}"
BENCH=(python3 benchmarks/fsdp_step.py --laion-batch "$LAION" --mmc4-batch "$MMC4" --json "$OUT/results.jsonl")
if [ -n "${GPU_CHECK_SMOKE:-}" ]; then  # a dry run of the script's flow on a CPU
    BENCH=(python3 benchmarks/fsdp_step.py --smoke --json "$OUT/results.jsonl")
fi

stage() {  # stage NAME SECONDS COMMAND...: one stage's log in $OUT/NAME.log, its time bounded
    local name=$1 seconds=$2
    shift 2
    local start=$SECONDS
    timeout --kill-after=10 "$seconds" "$@" >"$OUT/$name.log" 2>&1
    echo "$name: exit $? after $((SECONDS - start)) s" | tee -a "$OUT/stages.txt"
}

stage tests 60 python3 -m pytest -q -p no:cacheprovider -o addopts="" -m "gpu or not slow" \
    tests/test_gpu.py tests/test_step_sync.py tests/test_flops.py -rxXs
stage eager 100 "${BENCH[@]}" --sync-check
stage compiled 170 "${BENCH[@]}" --compile
stage openflamingo 140 "${BENCH[@]}" --openflamingo
cat "$OUT/stages.txt"
tail -n 5 "$OUT"/eager.log "$OUT"/compiled.log "$OUT"/openflamingo.log
