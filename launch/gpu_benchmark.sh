#!/usr/bin/env bash
# One prepared benchmark for a single-GPU machine, finished within 8 minutes:
#   - DenseNet-121 training steps at 224 px (batch 64) and 512 px (batch 16), bfloat16 and float32,
#     in JAX and in PyTorch (`python -m cxr_jax.benchmark --torch`, 10 warm-up + 20 timed steps),
#   - the input pipeline with every core (`python -m cxr_jax.data.throughput`) on 512 px phantom
#     shards generated here, cropped to 224 and 512.
# Every result is one JSON line in ${OUT:-$PWD}/gpu_benchmark.jsonl; each command's log goes to
# gpu_benchmark.log beside it. A run that fails, times out or no longer fits the time budget
# leaves a JSON line with "error" instead; the script always exits 0 after the summary table.
#
# Usage, from anywhere (it runs in the repository root):
#   launch/gpu_benchmark.sh
#   WHEELS=.whl launch/gpu_benchmark.sh            # first pip-install the wheels in .whl
#   GPU_BENCHMARK_SMOKE=1 launch/gpu_benchmark.sh  # every command at tiny size on CPU (~2-3 min)
# Environment: OUT (results folder), PYTHON (default python3), BUDGET_S (default 465: the whole
# script's seconds), RUN_CAP_S (default 180: the most one training-step setting may take).
#
# Wheels. GPU images usually have jax, flax, optax, orbax, chex and torch but not grain,
# ml-collections and tensorflow-datasets. Download what is missing here (for Python 3.12, without
# dependencies, so nothing else is fetched; 17 wheels, about 11 MB) and point WHEELS at the folder.
# They are installed with --no-deps into a private --target folder put first on PYTHONPATH, so the
# machine's jax and torch are never replaced:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     grain==0.2.18 ml-collections==1.1.0 tensorflow-datasets==4.9.10 array-record==0.8.6 \
#     dm-tree==0.1.10 immutabledict==4.3.1 simple-parsing==0.1.9 docstring-parser==0.18.0 \
#     tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0 termcolor==3.3.0 \
#     toml==0.10.2 portpicker==1.6.0 crc32c==2.9.post0 importlib-resources==7.1.0 \
#     tensorboardX==2.6.5
#   python3 -m pip wheel --no-deps promise==2.3 -w .whl   # pure Python, published as sdist only
# (versions from constraints.txt; `python3 -c "import cxr_jax.benchmark"` there names anything
# still missing).
set -euo pipefail

OUT_DIR=$(realpath -m "${OUT:-$PWD}")
WHEELS=${WHEELS:+$(realpath "$WHEELS")}
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
RESULTS=$OUT_DIR/gpu_benchmark.jsonl
LOG=$OUT_DIR/gpu_benchmark.log
BUDGET_S=${BUDGET_S:-465}
RUN_CAP_S=${RUN_CAP_S:-180}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT_DIR"
: >"$RESULTS"
: >"$LOG"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=1

if [[ -n "${WHEELS:-}" ]]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" "$WHEELS"/*.whl
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi

NPROC=$(nproc)
if [[ -n "${GPU_BENCHMARK_SMOKE:-}" ]]; then
  # Same commands, tiny: the smoke DenseNet on CPU, 2 sizes, 2 dtypes, a few phantom patients.
  export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=
  CONFIG="configs/nih/densenet121.py:smoke"
  SETTINGS=("64 8 bfloat16" "64 8 float32" "96 8 bfloat16" "96 8 float32")
  STEP_ARGS=(--steps 2 --warmup 1)
  PATIENTS=12 SOURCE_SIZE=128 PIPELINE=("64 8" "96 8") BATCHES=4
else
  CONFIG="configs/nih/densenet121.py"
  SETTINGS=("224 64 bfloat16" "224 64 float32" "512 16 bfloat16" "512 16 float32")
  STEP_ARGS=(--steps 20 --warmup 10)
  PATIENTS=200 SOURCE_SIZE=512 PIPELINE=("224 64" "512 16") BATCHES=40
fi
PIPELINE_RESERVE_S=90  # data generation + both pipeline runs, kept back from the model runs

remaining() { echo $((BUDGET_S - SECONDS)); }

# record_failure NAME STATUS: one JSON line saying what did not run, with the log's last lines.
record_failure() {
  "$PYTHON" - "$1" "$2" "$LOG" >>"$RESULTS" <<'EOF'
import json, sys
name, status, log = sys.argv[1:]
with open(log, errors="replace") as f:
  tail = f.read().splitlines()[-15:]
print(json.dumps({"benchmark": name, "error": status, "log_tail": tail}))
EOF
}

# run NAME SECONDS CMD...: runs CMD with a timeout; the JSON lines it prints on stdout go to the
# results, everything else to the log.
run() {
  local name=$1 limit=$2 rc=0
  shift 2
  if ((limit < 20)); then
    echo "skipping $name: $(remaining) s left of the budget" | tee -a "$LOG"
    record_failure "$name" "skipped: out of time budget"
    return 0
  fi
  echo "=== $name (limit ${limit}s, $(remaining)s left): $*" | tee -a "$LOG"
  timeout -k 5 "$limit" "$@" >"$WORK/stdout" 2>>"$LOG" || rc=$?
  cat "$WORK/stdout" >>"$LOG"
  grep '^{' "$WORK/stdout" >>"$RESULTS" || true
  if ((rc != 0)); then
    local status="exit $rc"
    if ((rc == 124 || rc == 137)); then
      status="timeout after ${limit}s"
    fi
    echo "$name failed: $status" | tee -a "$LOG"
    record_failure "$name" "$status"
  fi
}

run environment 60 "$PYTHON" - <<'EOF'
import json, os
import jax, torch
print(json.dumps(dict(
    benchmark="environment", jax=jax.__version__, jax_devices=[str(d) for d in jax.devices()],
    torch=torch.__version__, torch_cuda=torch.version.cuda,
    gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    cpu_count=os.cpu_count(), xla_flags=os.environ.get("XLA_FLAGS", ""))))
EOF

for setting in "${SETTINGS[@]}"; do
  read -r size batch dtype <<<"$setting"
  limit=$(($(remaining) - PIPELINE_RESERVE_S))
  if ((limit > RUN_CAP_S)); then
    limit=$RUN_CAP_S
  fi
  run "train_step ${size}px batch $batch $dtype" "$limit" \
    "$PYTHON" -m cxr_jax.benchmark --config "$CONFIG" --image_size "$size" --batch "$batch" \
    --dtype "$dtype" "${STEP_ARGS[@]}" --torch
done

run "phantom ${SOURCE_SIZE}px" "$(($(remaining) - 30))" \
  "$PYTHON" -m data_prep.phantom --out "$WORK/phantom" --num-patients "$PATIENTS" \
  --image-size "$SOURCE_SIZE" --workers "$NPROC"
run "nih shards ${SOURCE_SIZE}px" "$(($(remaining) - 25))" \
  "$PYTHON" -m data_prep.nih --src "$WORK/phantom" --out "$WORK/shards" \
  --image-size "$SOURCE_SIZE" --workers "$NPROC"
for setting in "${PIPELINE[@]}"; do
  read -r size batch <<<"$setting"
  if [[ -f "$WORK/shards/cxr_manifest.json" ]]; then
    run "input_pipeline ${size}px" "$(($(remaining) - 5))" \
      "$PYTHON" -m cxr_jax.data.throughput --data_dir "$WORK/shards" --image_size "$size" \
      --batch "$batch" --batches "$BATCHES" --workers "$NPROC"
  else
    record_failure "input_pipeline ${size}px" "skipped: no shards"
  fi
done

"$PYTHON" - "$RESULTS" <<'EOF'
import json, sys
print(f"\n{sys.argv[1]}:")
for line in open(sys.argv[1]):
  r = json.loads(line)
  if "error" in r:
    print(f"  {r['benchmark']}: {r['error']}")
  elif r["benchmark"] == "train_step":
    j, t = r["jax"], r["torch"]
    print(f"  {r['image_size']}px b{r['global_batch']} {r['dtype']}: jax {j['images_per_s']} img/s "
          f"(compile {j['compile_s']} s, mfu {j['mfu']}, peak {j['peak_memory_bytes']} B), torch "
          f"{t['images_per_s']} img/s (peak {t['peak_memory_bytes']} B), jax/torch {r['jax_over_torch']}")
  elif r["benchmark"] == "input_pipeline":
    print(f"  pipeline {r['source_size']}->{r['image_size']}px, {r['workers']} workers: "
          f"{r['images_per_s']} img/s")
EOF
echo "total ${SECONDS}s"
