#!/usr/bin/env bash
# The real-model recipe reduced for a CPU (configs/hotpotqa_smollm2_cpu.yaml: SmolLM2-135M-Instruct, N = 4, K = 1,
# LoRA), from the HotpotQA files in ../shared/data to report.json — the closest real thing to
# scripts/gpu_real_model.sh on a machine without a GPU. About 75 minutes on a 2-core CPU, one thread per process
# (measured: docs/real_model.md, "A reduced recipe on CPU").
#     bash scripts/cpu_real_model.sh          # data in outputs/real_cpu/data, run in outputs/real_cpu/run,
#                                             # the console appended to outputs/real_cpu/run.log
# Extra arguments go to scripts/train_rl.py: `--resume_from_checkpoint true` continues an interrupted run (finished
# stages are reused), `--output_dir DIR` starts another run (its console goes to DIR.log), `--max_steps 5` a short one.
# The N = 4 files are the recipe's `dataset` / `eval_dataset`: written once from $SHARED_DATA (default
# ../shared/data) by scripts/hotpotqa_subset.py, then reused (they are a deterministic function of those files).
# OMP_NUM_THREADS defaults to 1: on a shared machine two threads per process were slower than one.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=outputs/real_cpu/data
SHARED=${SHARED_DATA:-../shared/data}
make -s install                       # the README's environment (.venv), set up if missing: no other step
PY=.venv/bin/python
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1

subset() {  # subset <input> <output> <rows>
    if [[ -f "$2" ]]; then
        echo "reusing $2"
    else
        "$PY" scripts/hotpotqa_subset.py --input "$1" --output "$2" --distractors 2 --rows "$3"
    fi
}
subset "$SHARED/hotpotqa_train300/hotpotqa_distractor_train300.jsonl" $DATA/train_n4.jsonl 0:250
subset "$SHARED/hotpotqa_train300/hotpotqa_distractor_train300.jsonl" $DATA/tune_n4.jsonl 250:300
subset "$SHARED/hotpotqa_dev300/hotpotqa_distractor_dev300.jsonl" $DATA/dev_n4.jsonl 0:100

run_dir=outputs/real_cpu/run          # the config's output_dir, unless the arguments name another
args=("$@")
for i in "${!args[@]}"; do
    case "${args[$i]}" in
        --output_dir) run_dir=${args[$((i + 1))]:-$run_dir} ;;
        --output_dir=*) run_dir=${args[$i]#*=} ;;
    esac
done
mkdir -p "$(dirname "$run_dir")"
echo "training: $run_dir (console also in $run_dir.log)"
"$PY" scripts/train_rl.py --config configs/hotpotqa_smollm2_cpu.yaml "$@" 2>&1 | tee -a "$run_dir.log"
