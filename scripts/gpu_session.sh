#!/usr/bin/env bash
# The project's open GPU work, on a lent GPU host with no network whose each call carries at most
# 64 MB (the checkout included) and whose /tmp and ignored folders outlive a call while it is warm.
# Everything it needs beyond the host's torch/transformers/peft/accelerate travels as bundles of
# wheels (scripts/wheelhouse.sh --bundle-mb) plus a copy of the data; results come back under $OUT.
#
#   here:   bash scripts/gpu_session.sh pack                    # .gpu/wh/bundle-NN (≤ 56 MB each), .gpu/data
#   there:  bash scripts/gpu_session.sh stage .gpu/wh/bundle-NN # one call per bundle, carrying that folder
#           bash scripts/gpu_session.sh go SECONDS              # carrying .gpu/data: install once, then the
#                                                               # work below until SECONDS have passed
# (The last, small bundle can travel with `go`: `stage .gpu/wh/bundle-05 && ... go 540`, carrying both.
# 251 MB in 5 bundles for flwr 1.42 / ray 2.55 and the 89 MB model wheel, session 12.)
#
# The work, most needed first (each step resumes from what an earlier warm call cached in runs/):
#   1. #12's dev search (configs/experiment-gpu.toml on the validation splits, seed 0, FedCoLLM),
#      seeded from the committed cache results/experiment-gpu/dev/cache so that it continues over
#      sessions; commit gpu-out/dev-gpu/cache (in $OUT/gpu-session.tgz) there afterwards.
#   2. #11's 3-round run on the whole ARC-Easy split, clients on the GPU, batch 32 (experiment-gpu.toml's).
#   3. #11's step profile, eager against model.compile, batch 32.
# $OUT/gpu-session.tgz holds each step's log and results, and nvidia-smi's utilisation and memory every 2 s.
set -euo pipefail
cd "$(dirname "$0")/.."
# The lent H200/H100 images: Python 3.12, and these preinstalled at versions pyproject.toml
# accepts. rich, protobuf and packaging are there too but newer than flwr allows: left out of
# this list, the wheelhouse carries flwr's versions.
HOST_HAS=${HOST_HAS:-"torch transformers peft accelerate numpy scipy pandas pyarrow"}
DEV_GRID=${DEV_GRID:-"client.lr+distill.lr=1e-3,3e-3,3e-4;client.local_epochs=1"}
# A session with less time leaves CommonsenseQA (4x ARC-Easy's training split) for a later one:
# a job cut by the budget is lost, a finished one is cached.
DEV_DATASETS=${DEV_DATASETS:-"commonsense_qa,openbookqa,arc_easy"}
DEV_JOBS=${DEV_JOBS:-6}
RESERVE_S=${RESERVE_S:-200}  # left after the dev search for the 3-round run (~90 s at batch 32, plus loading)

pack() {
  rm -rf .gpu/wh .gpu/data
  bash scripts/wheelhouse.sh .gpu/wh --python 3.12 --platform manylinux_2_28_x86_64 \
    --host-has "$HOST_HAS" --split-mb 50 --bundle-mb 56
  local data=${FEDCOLLM_DATA:-../shared/data}
  mkdir -p .gpu/data && cp -r "$data"/. .gpu/data/
  ls -d .gpu/wh/bundle-* | sed 's/^/stage: /'
  echo "then: go SECONDS, carrying .gpu/data ($(du -sh .gpu/data | cut -f1))"
}

stage() {
  [ -d "${1:-}" ] || { echo "gpu_session.sh stage: no folder ${1:-} (carry it with the call)" >&2; exit 2; }
  mkdir -p /tmp/wh && cp -r "$1" /tmp/wh/
  echo "staged $(du -sh /tmp/wh | cut -f1) in /tmp/wh"
}

go() {
  local budget=${1:?go SECONDS} t0 out=runs/gpu-out
  t0=$(date +%s)
  left() { echo $((budget - ($(date +%s) - t0))); }
  upto() { local s=$(( $(left) - $1 )); echo $(( s > 10 ? s : 10 )); }  # a timeout that leaves $1 s
  # $OUT returns at most 8 files, none deeper than 2 folders (the caches are deeper): everything
  # travels as one archive, rewritten after each step so that a call cut short still returns it.
  ship() { [ -z "${OUT:-}" ] || tar czf "$OUT/gpu-session.tgz" --warning=no-file-changed -C runs gpu-out || true; }  # nvsmi.log grows
  rm -rf "$out" && mkdir -p "$out"
  [ -x .venv/bin/fedcollm ] || bash scripts/setup.sh --offline /tmp/wh
  export FEDCOLLM_DATA=$PWD/.gpu/data PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 2 > "$out/nvsmi.log" 2>&1 &
  local smi=$!
  nvidia-smi > "$out/device.txt" 2>&1 || true
  .venv/bin/python -c "from importlib.metadata import version as v; print(*(f'{p} {v(p)}' for p in ('torch', 'transformers', 'peft', 'flwr', 'ray')), sep=', ')" \
    >> "$out/device.txt" 2>&1 || true

  # 1. Dev search: the largest dataset first (its jobs are the longest), 6 jobs at once. It spans
  #    sessions, and code changes between them: cells of another code version are kept, not
  #    recomputed (--allow-mixed-versions; dev.md names each version).
  mkdir -p runs/dev-gpu
  [ ! -d results/experiment-gpu/dev/cache ] || cp -rn results/experiment-gpu/dev/cache runs/dev-gpu/ || true
  timeout "$(upto "$RESERVE_S")" .venv/bin/fedcollm experiment --config configs/experiment-gpu.toml --seeds 0 \
    --jobs "$DEV_JOBS" --methods fedcollm --datasets "$DEV_DATASETS" --dev-grid "$DEV_GRID" \
    --allow-mixed-versions --out runs/dev-gpu > "$out/dev.log" 2>&1 || echo "dev search stopped: rc $?" >> "$out/dev.log"
  .venv/bin/ray stop --force > /dev/null 2>&1 || true  # actors of jobs that the timeout cut short
  mkdir -p "$out/dev-gpu" && cp -r runs/dev-gpu/cache "$out/dev-gpu/" 2>/dev/null || true
  cp runs/dev-gpu/dev.* "$out/dev-gpu/" 2>/dev/null || true
  ship

  # 2. Three rounds on the whole ARC-Easy split (summary.json says where the clients trained).
  if [ "$(left)" -gt 120 ] && [ ! -e runs/gpu-3round/summary.json ]; then
    timeout "$(upto 30)" .venv/bin/fedcollm run --set data.max_train_examples=0 --set data.eval_examples=0 \
      --set federation.rounds=3 --set model.device='"cuda"' --set client.batch_size=32 --set distill.batch_size=32 \
      --set run.progress=false --out runs/gpu-3round \
      > "$out/3round.log" 2>&1 || echo "3-round run stopped: rc $?" >> "$out/3round.log"
    .venv/bin/ray stop --force > /dev/null 2>&1 || true
  fi
  mkdir -p "$out/gpu-3round" && cp runs/gpu-3round/{summary.json,metrics.jsonl,report.md,config.toml} "$out/gpu-3round/" 2>/dev/null || true
  ship

  # 3. Eager against compiled steps.
  local c
  for c in false true; do
    [ "$(left)" -gt 90 ] || break
    timeout "$(upto 20)" .venv/bin/python benchmarks/step_profile.py --device cuda --batch-sizes 32 \
      --set "model.compile=$c" --out "$out/step_profile_compile_$c.json" > "$out/step_profile_compile_$c.log" 2>&1 || true
  done
  kill "$smi" 2>/dev/null || true
  echo "go: $(( $(date +%s) - t0 )) s of $budget" | tee -a "$out/device.txt"
  ship
}

case ${1:-} in
  pack) pack ;;
  stage) stage "${2:-}" ;;
  go) go "${2:-}" ;;
  *) echo "usage: $0 pack | stage BUNDLE_FOLDER | go SECONDS" >&2; exit 2 ;;
esac
