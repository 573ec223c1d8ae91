#!/bin/bash
# Stage 2 on one GPU in one go: benchmark rows (eager and --compile, data on the device and on the host, a
# profile) and a real stage-1 + 20-loop stage-2 run with --compile, in priority order within DEADLINE seconds
# (a row whose estimate no longer fits is skipped and named). Each row is one line of $OUT/rows.jsonl. The `tuned`
# row times stage 3's cells as experiments/tuned_suite.toml runs them (32 px, bs 64, 5 epochs, 10% of MNIST): its
# summary's `cost` times the study's cell count is what that study costs on this GPU.
#
#   DATA=datasets bash bench/gpu_check.sh                       # DATA: a --data_root with FashionMNIST and MNIST
#   ROWS="r18 r50 caf" DEADLINE=300 OUT=/tmp/gpu bash bench/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-bench/results/gpu_check}; DATA=${DATA:-datasets}; PY=${PY:-python3}
DEADLINE=${DEADLINE:-530}; SIZE=${SIZE:-224}; STEPS=${STEPS:-50}; LOOPS=${LOOPS:-3}; DEV=${DEV:-cuda}
ROWS=${ROWS:-r18 r50 r18c real tuned caf r18host r50c prof}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
START=$(date +%s)
left() { echo $(( DEADLINE - ($(date +%s) - START) )); }

row() {  # row ESTIMATED_SECONDS KEY BENCH_ARGS...
  local est=$1 key=$2 l; shift 2; l=$(left)
  if (( l < est )); then echo "SKIP $key $* (${l}s left, needs ~${est}s)"; return; fi
  echo "=== $key $* (${l}s left)"
  local t0; t0=$(date +%s)
  timeout "$l" $PY bench/bench_stage2.py --device "$DEV" --image_size "$SIZE" --adaptation_steps "$STEPS" \
    --loops "$LOOPS" --memory_steps none "$@" --out "$OUT/row.json" &&
    $PY -c "import json, sys; print(json.dumps({'key': sys.argv[2], **json.load(open(sys.argv[1]))}))" \
      "$OUT/row.json" "$key" >>"$OUT/rows.jsonl"
  echo "=== $key rc=$? $(( $(date +%s) - t0 ))s"
}

real() {  # stage 1 (2 epochs) and a 20-loop stage 2 with --compile on Fashion-MNIST -> MNIST
  local l; l=$(left)
  if (( l < 110 )); then echo "SKIP real (${l}s left, needs ~110s)"; return; fi
  echo "=== real (${l}s left)"
  local t0 run; t0=$(date +%s); run=$(mktemp -d)
  local data=(--data_root "$DATA" --device "$DEV" --image_size "$SIZE" --subset 5000 --test_subset 1000)
  timeout "$l" $PY sophon_orig/stage1_pretrain/train.py "${data[@]}" --orig_dataset FashionMNIST --init scratch \
    --epochs 2 --channels_last --out_dir "$run/stage1" || { echo "=== real: stage 1 failed"; return; }
  timeout "$(left)" $PY sophon_orig/stage2_train/algo.py "${data[@]}" --model_path "$run/stage1" --dataset MNIST \
    --preset robust --total_loop 20 --eval_interval 10 --test_interval 0 --final_finetune_epochs 0 \
    --min_orig_acc 0 --compile --channels_last --out_dir "$run/stage2"
  echo "=== real rc=$? $(( $(date +%s) - t0 ))s"
  cp "$run/stage2/metrics.csv" "$OUT/stage2_metrics.csv"; cp "$run/stage2/summary.json" "$OUT/stage2_summary.json"
  rm -rf "$run"
}

tuned() {  # one family of the tuned suite (8 sweep lrs + 10 seeds, two starts) on a 1-epoch 32 px stage 1
  local l; l=$(left)
  if (( l < 90 )); then echo "SKIP tuned (${l}s left, needs ~90s)"; return; fi
  echo "=== tuned (${l}s left)"
  local t0 run; t0=$(date +%s); run=$(mktemp -d)
  local data=(--data_root "$DATA" --device "$DEV" --image_size 32)
  timeout "$l" $PY sophon_orig/stage1_pretrain/train.py "${data[@]}" --subset 5000 --test_subset 1000 \
    --orig_dataset FashionMNIST --init scratch --epochs 1 --out_dir "$run/stage1" ||
    { echo "=== tuned: stage 1 failed"; return; }
  timeout "$(left)" $PY sophon_orig/stage3_eval/finetune_test.py "${data[@]}" --suite tuned --path "$run/stage1" \
    --dataset MNIST --start sophon,scratch --optimizers adam --strategies initfc_all --schedules constant \
    --epochs 5 --bs 64 --test_subset 500 --out_dir "$run/tuned"
  echo "=== tuned rc=$? $(( $(date +%s) - t0 ))s"
  [[ -f $run/tuned/summary.json ]] && $PY -c "import json, sys; c = json.load(open(sys.argv[1]))['cost']; print(json.dumps({'key': 'tuned', **c, \
's_per_cell': c['cell_seconds'] / max(c['cells_timed'], 1)}))" "$run/tuned/summary.json" | tee -a "$OUT/rows.jsonl"
  rm -rf "$run"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
for r in $ROWS; do
  case $r in
    r18) row 50 r18 --arch resnet18 --channels_last --memory_steps 5,20 ;;
    r50) row 45 r50 --arch resnet50 --channels_last ;;
    r18c) row 120 r18c --arch resnet18 --compile ;;
    real) real ;;
    tuned) tuned ;;
    caf) row 130 caf --arch caformer --channels_last --loops 1 ;;
    r18host) row 35 r18host --arch resnet18 --channels_last --data_on_device off ;;
    r50c) row 170 r50c --arch resnet50 --compile ;;
    prof) row 40 prof --arch resnet18 --channels_last --profile --loops 1 ;;
    *) echo "unknown row $r (r18 r50 r18c real tuned caf r18host r50c prof)"; exit 2 ;;
  esac
done
echo "=== done in $(( $(date +%s) - START ))s; rows in $OUT/rows.jsonl"
