#!/usr/bin/env bash
# One stage of the GPU measurement plan, on a machine prepared as docs/gpu.md describes
# (registry GGUF chunks copied to $PARTS, the gguf wheel in .gpu/wheels, data in .gpu/data).
#
#   bash tools/gpu_stage.sh STAGE [SECONDS]   (from any folder: it runs in the repository root)
#
# Every stage keeps its resumable state in $WORK/<stage> (outside the returned folder) and
# ends, whatever happened, by packing that folder into $OUT/<stage>.tgz: a stage cut off by
# SECONDS (default 540) resumes when it is run again on the same machine, and one archive
# comes back per stage. Programs compiled by earlier stages of the same machine are reused
# through JAX's persistent compilation cache.
#
# Stages (rough H200 minutes, cold compile included):
#   setup      install gguf, reassemble and verify the registry files          (~0.5)
#   kernels    the Pallas attention kernel's GPU tests and its benchmark        (~8)
#   projections the fused projection kernels' GPU tests, their benchmark (1.5B and 0.5B shapes,
#              R = 1 and 8), then autoregressive speed of the 1.5B model, batch 1 and 8, with and
#              without the kernels (decoding.Options(projections="pallas")), one process      (~8)
#   profile    experiments.profile_step on the 1.5B and 0.5B models            (~2)
#   profile_split  the 1.5B loop profiled with stacked and with split layer weights
#              (decoding.model.split_layers), both programs' optimized HLO returned gzipped, then
#              both layouts' tokens/s at batch 1 and 8 in one process                       (~7)
#   ar         autoregressive speed, 1.5B and 0.5B, XLA and Pallas attention,
#              transformers eager beside                                       (~12, two runs)
#   peer       autoregressive speed of the 1.5B model, batch 1 and 8, beside transformers' compiled
#              static-cache generate (the fair peer), same process                   (~6)
#   sharding   no mesh vs a 1-device mesh (decoding.sharding), ar and the 0.5B chain, reference16,
#              batch 1, one process (experiments.sharding_check)                  (~4)
#   multi_gpu  on every GPU `nvidia-smi -L` lists (N): the 1.5B model and the 0.5B chain
#              tensor parallel over 2 (4, 8) GPUs ($MESHES overrides: 1x2,1x4,1x8 up to N), batch 1
#              and 8, each beside one GPU (no mesh) in one process, reference16, the collectives'
#              share of the largest mesh's step from a profile (experiments.sharding_check); then
#              DistillSpec 0.5B <- 1.5B data parallel on 1, 2, ... N GPUs, tokens/s per GPU and a
#              checkpoint saved on N restored on 1 (experiments.train_scaling); resumable: run it
#              again until it says done            (~15 on 2 GPUs, ~45 on 8: several commands)
#   heads      feature drafters (experiments.feature_drafters; rows $HEAD_ROWS, default eagle) trained
#              $HEAD_MINUTES (default 5) minutes each on stored ShareGPT + GSM8K-train answers, tuned
#              on the held-out tuning split, then Spec-Bench reference16 at batch 1; resumable:
#              run it again until it says done                                 (~15, two commands)
#   ht         hidden transfer (experiments.hidden_transfer; rows $HT_ROWS, default maps at layer 14 for
#              4 positions and Medusa heads at the same budget) trained $HT_MINUTES (default 5)
#              minutes each on stored answers, tuned, then Spec-Bench reference16 at batch 1 (needs
#              ../shared/data linked to the data, docs/gpu.md); resumable            (~20, three commands)
#   graphs     autoregressive speed, 1.5B and 0.5B, batch 1 and 8, with and without the decode
#              loop as a CUDA graph (decoding.Options(command_buffers="while")), same process (~6)
#   graphs_b1  Spec-Bench reference16, batch 1: ar and spec, each with and without the decode loop
#              as a CUDA graph (method option graphs=while), one process             (~6)
#   ref16_b1   Spec-Bench reference16, batch 1: ar spec tree pld layerskip + transformers
#              ar / assisted, with the phase-time split                        (~12, resumable)
#   tuned_b1   reference16, batch 1: ar and the tree shape `autotune` chose, one process  (~3)
#   tree_sweep reference16, batch 1: ar and tree shapes around the tuned one, one process   (~6)
#   chain_sweep reference16, batch 1: ar and chains that stop drafting below a draft confidence (a
#              loop of draft steps, also as a CUDA graph), one process                   (~8)
#   attn_b1    reference16, batch 1: ar, the best tree and spec, each with XLA's attention and with the
#              Pallas kernel (method option attention=pallas), one process                 (~9)
#   ref16_b8   the same at batch 8 (batches filled across categories), our methods (~6)
#   all_b8     all of Spec-Bench (560 turns), batch 8, our methods ($METHODS overrides the list;
#              ~25 for all five, resumable; continues the committed rows of
#              experiments/results/specbench/all_b8_<card>, if any)
#   all_b1     all of Spec-Bench, batch 1: ar, the best measured tree shape, spec, pld, layerskip ($METHODS
#              overrides; ~8 for ar, resumable; continues experiments/results/specbench/all_b1_<card>)
#   fp32       float32 greedy equality of spec / tree with ar, batch 8         (~4)
#   autotune   gamma (chain) and tree shape from calibration + the cost model; each method is
#              skipped once done, so a cut-off stage finishes when run again      (~8)
#   nudging    Gemma-3-270M nudged by SmolLM2, GSM8K + AlpacaEval, judged      (~10, resumable)
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 2
stage=${1:?usage: gpu_stage.sh STAGE [SECONDS]}
limit=${2:-540}
export DECODING_CACHE_DIR=${DECODING_CACHE_DIR:-/root/models/cache}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.6}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/root/jaxcache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-2}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
# The commit this tree was made from (the machine's .git may be an older one): written where the
# tree was sent from, `git rev-parse HEAD > .gpu/source_commit` (and `echo 1 > .gpu/source_dirty`
# for uncommitted changes), carried with the command; results record it (experiments.environment).
if [ -f .gpu/source_commit ]; then
  export DECODING_SOURCE_COMMIT=$(cat .gpu/source_commit)
  [ -f .gpu/source_dirty ] && export DECODING_SOURCE_DIRTY=$(cat .gpu/source_dirty)
fi
PARTS=${PARTS:-/root/models/parts}
WORK=${WORK:-/root/work}
OUT=${OUT:-$WORK/out}
Q=.gpu/data/spec_bench/question.jsonl
mkdir -p "$WORK/$stage" "$OUT"
dir=$WORK/$stage
sb() { timeout "$limit" python3 -m experiments.specbench --questions "$Q" --max-new-tokens 256 --no-progress "$@"; }
# The methods of all of Spec-Bench at batch 1: the baseline, the tree shape measured best on the
# reference prompts (tree_sweep), the chain, prompt lookup and layer-skip.
ALL_B1_METHODS=ar,tree:depth=5:top_k=4:nodes=32,spec,pld,layerskip
# Continue the committed rows of experiments/results/specbench/<name>_<card> (a run resumes only
# on the same kind of card: the run's identity names it), unless this machine has started already.
seed_from() {
  local card seed
  card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep -o 'H[0-9]\+' | head -1 | tr A-Z a-z)
  seed=experiments/results/specbench/$1_${card:-none}
  if [ ! -f "$dir/results.jsonl" ] && [ -f "$seed/results.jsonl" ]; then
    cp "$seed/results.jsonl" "$seed/run.json" "$dir/" && cp "$seed/events.jsonl" "$dir/" 2>/dev/null
    echo "continuing the committed rows of $seed"
  fi
}

case $stage in
  setup)
    # Once per machine: later commands of the same machine find the marker and skip it.
    if [ -f "$dir/done" ]; then echo "setup: already done on this machine"; exit 0; fi
    # Tokenizer files saved here (.gpu/tok/tokenizers.tgz, if carried): some transformers versions
    # build a wrong tokenizer from a GGUF (the loader refuses it: decoding.loading.check_tokenizer).
    mkdir -p "$DECODING_CACHE_DIR/converted"
    [ -f .gpu/tok/tokenizers.tgz ] && tar xzf .gpu/tok/tokenizers.tgz -C "$DECODING_CACHE_DIR/converted"
    python3 -m pip install -q --no-deps .gpu/wheels/gguf-*.whl &&
      python3 tools/gpu_chunks.py reassemble "$PARTS" "$DECODING_CACHE_DIR" | tee "$dir/reassemble.txt" &&
      touch "$dir/done" ;;
  kernels)
    # pytest may be missing on the GPU machine: its wheels travel in .gpu/wheels with gguf's.
    python3 -c "import pytest" 2>/dev/null || python3 -m pip install -q --no-deps .gpu/wheels/pytest-*.whl \
      .gpu/wheels/pluggy-*.whl .gpu/wheels/iniconfig-*.whl
    # The GPU test compiles 24 Triton kernels per dtype: on an H100 a 100 s limit ended it before
    # the first dtype finished. The benchmark saves its JSON and Markdown after every case, so a
    # cut-off run keeps what it measured.
    timeout $((limit * 3 / 5)) python3 -m pytest -v -m gpu tests/test_kernels.py 2>&1 | tee "$dir/pytest.txt"
    timeout $((limit * 2 / 5)) python3 -m experiments.bench_kernels --out "$dir/kernels" 2>&1 | tee "$dir/bench_kernels.txt" ;;
  projections)
    python3 -c "import pytest" 2>/dev/null || python3 -m pip install -q --no-deps .gpu/wheels/pytest-*.whl \
      .gpu/wheels/pluggy-*.whl .gpu/wheels/iniconfig-*.whl
    timeout $((limit / 5)) python3 -m pytest -v -m gpu tests/test_kernels_projection.py 2>&1 | tee "$dir/pytest.txt"
    timeout $((limit / 4)) python3 -m experiments.bench_kernels --kernel projection --out "$dir/projections" 2>&1 |
      tee "$dir/bench_projections.txt"
    [ -f "$dir/qwen2.5-coder-1.5b-instruct.json" ] || timeout $((limit / 2)) python3 -m experiments.bench_autoregressive \
      --models qwen2.5-coder-1.5b-instruct --batch-sizes 1,8 --projections xla,pallas --questions "$Q" \
      --out "$dir/qwen2.5-coder-1.5b-instruct" ;;
  profile)
    # $PROFILE_MODELS overrides the pair; the 1.5B model needs about 3 minutes (two compilations).
    for m in ${PROFILE_MODELS:-qwen2.5-coder-1.5b-instruct qwen2.5-coder-0.5b-instruct}; do
      [ -f "$dir/${m}_b1.json" ] || timeout $((limit / 2)) python3 -m experiments.profile_step --model $m --out "$dir"
    done ;;
  profile_split)
    # The 1.5B loop with stacked and with split layer weights (decoding.model.split_layers), each
    # profiled with its optimized HLO kept (gzipped), split first.
    for lw in split stacked; do
      stem=qwen2.5-coder-1.5b-instruct_b1; [ $lw = split ] && stem=${stem}_split
      [ -f "$dir/$stem.json" ] || timeout $((limit / 2)) python3 -m experiments.profile_step \
        --model qwen2.5-coder-1.5b-instruct --layer-weights $lw --hlo-dump "$dir/$stem.hlo" --out "$dir"
      [ -f "$dir/$stem.hlo" ] && gzip -f "$dir/$stem.hlo"
    done
    # then the speed of both layouts, batch 1 and 8, in one process
    [ -f "$dir/layer_weights.json" ] || timeout $((limit / 2)) python3 -m experiments.bench_autoregressive \
      --models qwen2.5-coder-1.5b-instruct --batch-sizes 1,8 --layer-weights stacked,split --questions "$Q" \
      --out "$dir/layer_weights" ;;
  ar)
    for m in qwen2.5-coder-1.5b-instruct qwen2.5-coder-0.5b-instruct; do
      [ -f "$dir/$m.json" ] || timeout "$limit" python3 -m experiments.bench_autoregressive --models $m \
        --batch-sizes 1,8 --attention xla,pallas --hf --questions "$Q" --out "$dir/$m"
    done ;;
  peer)
    [ -f "$dir/qwen2.5-coder-1.5b-instruct.json" ] || timeout "$limit" python3 -m experiments.bench_autoregressive \
      --models qwen2.5-coder-1.5b-instruct --batch-sizes 1,8 --hf --hf-modes static --hf-batch-sizes 1,8 \
      --questions "$Q" --out "$dir/qwen2.5-coder-1.5b-instruct" ;;
  sharding)
    timeout "$limit" python3 -m experiments.sharding_check --questions "$Q" --out "$dir/sharding_check" ;;
  multi_gpu)
    n=$(nvidia-smi -L | wc -l)
    meshes=${MESHES:-}; sizes=1
    for m in 2 4 8; do
      [ "$m" -le "$n" ] || continue
      [ -n "${MESHES:-}" ] || meshes=${meshes:+$meshes,}1x$m
      sizes=$sizes,$m
    done
    [ -n "$meshes" ] || { echo "multi_gpu: $n GPU(s) visible; it needs 2 or more" >&2; exit 2; }
    t0=$SECONDS
    timeout $((limit * 3 / 4)) python3 -m experiments.sharding_check --questions "$Q" --meshes "$meshes" \
      --batch 1,8 --profile-collectives "$dir/traces" --profile-tokens 16 --out "$dir/sharding_check"
    rc=$?
    left=$((limit - (SECONDS - t0)))
    if [ $rc -eq 0 ]; then
      rc=124
      [ $left -gt 60 ] && { timeout $left python3 -m experiments.train_scaling --data-dir .gpu/data --data "$sizes" \
        --out "$dir/train_scaling"; rc=$?; }
    fi
    [ $rc -eq 0 ] && echo "multi_gpu: done" || echo "multi_gpu: cut off or failed (exit $rc); run it again to resume"
    (exit $rc) ;;
  heads)
    timeout "$limit" python3 -m experiments.feature_drafters --out "$dir" --rows "${HEAD_ROWS:-eagle}" \
      --stored-answers --limit-per-source 3000 --train-conversations 0 --seq-len 1024 --batch-size 4 \
      --accumulate 4 --steps 100000 --warmup 30 --max-minutes "${HEAD_MINUTES:-5}" --eval-every -1 \
      --gammas 4 --trees 6x8x48 --tune-prompts 16 --eval-batch 8 --specbench-batch 1 \
      --specbench-subset reference16 --questions "$Q" --no-progress ;;
  ht)
    timeout "$limit" python3 -m experiments.hidden_transfer --out "$dir" --rows "${HT_ROWS:-ht:layer=14:k=4,medusa:k=4}" \
      --stored-answers --limit-per-source 3000 --train-conversations 0 --steps 100000 \
      --max-minutes "${HT_MINUTES:-5}" --eval-every 0 --shapes g3,4-2-2 --tune-prompts 16 --specbench-batch 1 \
      --specbench-subset reference16 --no-progress ;;
  graphs)
    for m in qwen2.5-coder-1.5b-instruct qwen2.5-coder-0.5b-instruct; do
      [ -f "$dir/$m.json" ] || timeout $((limit / 2)) python3 -m experiments.bench_autoregressive --models $m \
        --batch-sizes 1,8 --command-buffers default,while --questions "$Q" --out "$dir/$m"
    done ;;
  ref16_b1)
    sb --subset reference16 --batch-size 1 --prompt-bucket 1024 --phase-times \
       --methods ar,spec,tree,pld,layerskip,hf_ar,hf_assisted --out "$dir" ;;
  graphs_b1)
    sb --subset reference16 --batch-size 1 --prompt-bucket 1024 \
       --methods ar,spec,ar:graphs=while,spec:graphs=while --out "$dir" ;;
  ref16_b8)
    sb --subset reference16 --batch-size 8 --batching mixed --prompt-bucket 1024 \
       --methods ar,spec,tree,pld,layerskip --out "$dir" ;;
  tuned_b1)
    sb --subset reference16 --batch-size 1 --prompt-bucket 1024 \
       --methods ar,tree:depth=5:top_k=8:nodes=64,spec --out "$dir" ;;
  tree_sweep)
    sb --subset reference16 --batch-size 1 --prompt-bucket 1024 --methods \
       ar,tree:depth=5:top_k=8:nodes=48,tree:depth=6:top_k=8:nodes=64,tree:depth=5:top_k=4:nodes=32,tree:depth=4:top_k=8:nodes=32 \
       --out "$dir" ;;
  chain_sweep)
    sb --subset reference16 --batch-size 1 --prompt-bucket 1024 --methods \
       ar,spec:gamma=5,spec:gamma=6:confidence=0.3,spec:gamma=6:confidence=0.5,spec:gamma=6:confidence=0.5:graphs=while \
       --out "$dir" ;;
  attn_b1)
    sb --subset reference16 --batch-size 1 --prompt-bucket 1024 --methods \
       ar,ar:attention=pallas,tree:depth=5:top_k=4:nodes=32,tree:depth=5:top_k=4:nodes=32:attention=pallas,spec,spec:attention=pallas \
       --out "$dir" ;;
  all_b8)
    seed_from all_b8
    sb --subset all --batch-size 8 --prompt-bucket 2048 --methods "${METHODS:-ar,spec,tree,pld,layerskip}" \
       --out "$dir" ;;
  all_b1)
    seed_from all_b1
    sb --subset all --batch-size 1 --prompt-bucket 2048 --methods "${METHODS:-$ALL_B1_METHODS}" --out "$dir" ;;
  fp32)
    sb --subset reference16 --batch-size 8 --batching mixed --prompt-bucket 1024 --dtype float32 --methods ar,spec,tree \
       --profile none --out "$dir" ;;
  autotune)
    # 256 new tokens and the 1024 bucket: the autoregressive baseline is ref16_b1's program.
    t0=$SECONDS; rc=0
    for m in spec tree; do
      [ -f "$dir/$m/autotune.json" ] && continue
      left=$((limit - (SECONDS - t0))); [ $left -gt 30 ] || { rc=124; break; }
      timeout $left python3 -m experiments.autotune --method $m --questions "$Q" --max-new-tokens 256 \
        --prompt-bucket 1024 --out "$dir/$m" || rc=$?
    done
    (exit $rc) ;;
  nudging)
    # Continue the committed run (rows are keyed; a resumed run refuses other settings).
    if [ ! -f "$dir/results.jsonl" ] && [ -f experiments/results/nudging/results.jsonl ]; then
      cp experiments/results/nudging/results.jsonl experiments/results/nudging/run.json "$dir/"
    fi
    timeout "$limit" python3 -m experiments.nudging --limit 100 --data-dir .gpu/data --out "$dir" ;;
  *)
    echo "unknown stage $stage" >&2; exit 2 ;;
esac
rc=$?
# Training data, checkpoints, weight files and profiler traces stay on the machine (they would not
# fit the 16 MiB a returned file may have); their summaries and metrics come back.
tar czf "$OUT/$stage.tgz" --exclude="$stage/data" --exclude="$stage/*/ckpt" --exclude="*.safetensors" \
  --exclude="$stage/*/data" --exclude="$stage/traces" -C "$WORK" "$stage"
echo "stage $stage: exit $rc; packed $OUT/$stage.tgz"
exit $rc
