#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one run, within 8 minutes on one H100: the Llama-3-8B-shape QLoRA DRO step
# (N = 20, K = 5, m = 4, 2 questions per micro-batch) with a shared base and with separate bases, and the
# 3B-selector variant, each against the naive reference. Random weights of the real shapes; nothing is downloaded.
#
#   scripts/gpu_check.sh fetch     # here, once, where pip reaches a registry: the wheels the GPU image lacks -> .whl/
#   bash scripts/gpu_check.sh      # on the GPU machine (device tool: carry [".whl"], timeout_s 540)
#
# Writes gpu_check.jsonl (one JSON line per preset, as scripts/bench.py --output) and gpu_check.log to $OUT
# (default outputs/gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(trl==1.16.0 peft==0.21.2 transformers==5.24.0 bitsandbytes==0.50.2 datasets==5.2.0 dill==0.4.0
        multiprocess==0.70.18)
if [[ "${1:-}" == "fetch" ]]; then
    platforms=()
    for p in manylinux_2_24_x86_64 manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
        platforms+=(--platform "$p")
    done
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d .whl "${WHEELS[@]}"
fi

OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
if [[ -d .whl ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers, trl, peft, bitsandbytes as b; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'bitsandbytes', b.__version__)"
} 2>&1 | tee "$LOG"
status=0
for preset in llama3-8b-qlora llama3-3b-selector; do
    timeout 230 python3 scripts/bench.py --preset "$preset" --repeats 2 --output "$OUT/gpu_check.jsonl" 2>&1 \
        | grep -v "FutureWarning\|warnings.warn" | tee -a "$LOG"
    status=$((status | PIPESTATUS[0]))
done
exit $status
