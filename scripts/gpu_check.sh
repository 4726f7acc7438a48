#!/usr/bin/env bash
# The prepared check for a GPU machine (NVIDIA driver, Python with torch; no Rust needed):
# unpacks the carried CUDA `train` binary and prints one table:
#   1. the quickstart on cuda: wall time and final loss (the CPU run's: 0.0103)
#   2. SIGKILL + resume on cuda: largest weight difference against an uninterrupted run
#   3. data parallelism at world size 1 through NCCL (`run.devices = ["cuda:0"]`)
#   4. without a usable device index: the error text (no panic)
#   5. mixed precision: 300 quickstart steps in bf16 and fp16 against f32 (time, final loss)
#   6. when gpu/bench.xz was carried too: scripts/bench.sh DEVICE=cuda against PyTorch eager
#      (tutorial128, unet2d32, and ldm_quickstart, whose GEGLU and GELU run as burn's own
#      operations on CUDA; share of the H200's 67 TFLOP/s f32 peak), installing a carried
#      diffusers wheel (gpu/*.whl) if the machine lacks diffusers
# Sized for about 6 minutes on one H200.
#
# Prepare on the build machine (scripts/setup-cuda-build.sh first):
#   CARGO_TARGET_DIR=~/.cache/difftrain-target-cuda cargo build --release --features cuda --bin train
#   strip -o gpu/train ~/.cache/difftrain-target-cuda/release/train && xz -T0 -9 gpu/train
#   (optionally the same for `--bin bench` as gpu/bench.xz, and `pip download --no-deps
#   diffusers -d gpu/`; mind the 64 MiB carry limit: with xz -9 train.xz is 30.0 MB, bench.xz
#   28.5 MB, the diffusers wheel ~4 MB)
# then on the GPU machine, from the repository root:
#   scripts/gpu_check.sh gpu/train.xz
set -uo pipefail
cd "$(dirname "$0")/.."
PACKED="${1:-gpu/train.xz}"
PYTHON="${PYTHON:-python3}"
# DEVICE=cpu runs the same checks on the CPU (a dry run of this script on a build machine).
DEVICE="${DEVICE:-cuda}"
WORK="${OUT:-$(mktemp -d)}"
mkdir -p "$WORK"
BIN="$WORK/train"
"$PYTHON" -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" "$PACKED" "$BIN"
chmod +x "$BIN"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# burn's LLVM/NVPTX compiler links CUDA's libdevice.10.bc for math functions, from
# $CUDA_PATH/nvvm/libdevice/ or /usr/local/cuda, /opt/cuda, /usr/lib/cuda, /usr: when none has
# it, look in the toolkit folders and in Python's nvidia-* packages and point CUDA_PATH there.
if [ "$DEVICE" = cuda ] && [ -z "${CUDA_PATH:-}" ] && ! ls /usr/local/cuda/nvvm/libdevice /opt/cuda/nvvm/libdevice \
     /usr/lib/cuda/nvvm/libdevice /usr/nvvm/libdevice > /dev/null 2>&1; then
  site=$("$PYTHON" -c "import site; print(' '.join(site.getsitepackages()))" 2> /dev/null)
  found=$(find /usr/local /opt $site -name libdevice.10.bc -path '*nvvm/libdevice/*' 2> /dev/null | head -1)
  if [ -n "$found" ]; then
    export CUDA_PATH="${found%/nvvm/libdevice/libdevice.10.bc}"
    echo "CUDA_PATH=$CUDA_PATH (libdevice.10.bc)" >&2
  else
    echo "warning: no libdevice.10.bc found; kernels calling math functions will fail" >&2
  fi
fi

declare -a ROWS
row() { ROWS+=("| $1 | $2 | $3 |"); echo "$1: $2 ($3)" >&2; }
final_loss() { grep -o 'final loss [0-9.e+-]*' "$1" | tail -1 | awk '{print $3}'; }

# 1. The quickstart on cuda.
start=$(date +%s)
"$BIN" --config configs/quickstart.toml --set run.device="\"$DEVICE\"" --set run.output_dir="\"$WORK/qs\"" > "$WORK/qs.log" 2>&1
rc=$?
secs=$(( $(date +%s) - start ))
row "quickstart on $DEVICE" "rc $rc, $secs s, final loss $(final_loss "$WORK/qs.log")" "CPU: 146 s, 0.0103"

# 2. SIGKILL + resume: 300 steps uninterrupted vs the same run killed once a checkpoint exists
#    and resumed (the same max_steps: the cosine schedule depends on it).
common=(--set run.device="\"$DEVICE\"" --set train.max_steps=300 --set checkpoint.every_steps=100 --set logging.sample_every=0)
start=$(date +%s)
"$BIN" --config configs/quickstart.toml "${common[@]}" --set run.output_dir="\"$WORK/a\"" > "$WORK/a.log" 2>&1
f32_secs=$(( $(date +%s) - start ))
"$BIN" --config configs/quickstart.toml "${common[@]}" --set run.output_dir="\"$WORK/b\"" > "$WORK/b.log" 2>&1 &
pid=$!
for _ in $(seq 600); do [ -f "$WORK/b/latest" ] && break; kill -0 "$pid" 2> /dev/null || break; sleep 0.5; done
kill -9 "$pid" 2> /dev/null; wait "$pid" 2> /dev/null
"$BIN" --config configs/quickstart.toml "${common[@]}" --set run.output_dir="\"$WORK/b\"" --resume latest > "$WORK/b2.log" 2>&1
diff=$("$PYTHON" - "$WORK" <<'PY'
import sys
from safetensors.numpy import load_file
w = sys.argv[1]
a = load_file(f"{w}/a/checkpoint-300/model.safetensors")
b = load_file(f"{w}/b/checkpoint-300/model.safetensors")
print(max(float(abs(a[k] - b[k]).max()) for k in a))
PY
)
row "SIGKILL + resume on $DEVICE" "max |diff| ${diff:-n/a}" "bitwise on CPU (0)"

# 3. Data parallelism through NCCL at world size 1.
"$BIN" --config configs/quickstart.toml --set "run.devices=[\"$DEVICE:0\"]" --set train.max_steps=50 \
  --set logging.sample_every=0 --set run.output_dir="\"$WORK/dp\"" > "$WORK/dp.log" 2>&1
row "data parallel (NCCL on cuda), world size 1" "rc $?, final loss $(final_loss "$WORK/dp.log")" "50 steps"

# 4. A device index that does not exist: a clear error.
msg=$("$BIN" --config configs/quickstart.toml --set run.device='"cuda:63"' --check 2>&1 | tail -1)
row "cuda:63 --check" "$msg" "a clear error, no panic"

# 5. Mixed precision: check 2's uninterrupted 300 steps in bf16 and fp16, against f32.
for p in bf16 fp16; do
  start=$(date +%s)
  "$BIN" --config configs/quickstart.toml "${common[@]}" --set train.mixed_precision="\"$p\"" \
    --set run.output_dir="\"$WORK/$p\"" > "$WORK/$p.log" 2>&1
  rc=$?
  row "300 steps in $p on $DEVICE" "rc $rc, $(( $(date +%s) - start )) s, final loss $(final_loss "$WORK/$p.log")" \
    "f32: $f32_secs s, $(final_loss "$WORK/a.log")"
done

# 6. The training-step benchmark on the GPU, when its binary was carried.
if [ -f gpu/bench.xz ]; then
  "$PYTHON" -c "import lzma, shutil; shutil.copyfileobj(lzma.open('gpu/bench.xz'), open('$WORK/bench', 'wb'))"
  chmod +x "$WORK/bench"
  if ! "$PYTHON" -c "import diffusers" 2> /dev/null; then
    "$PYTHON" -m pip install --quiet --no-deps gpu/*.whl 2> /dev/null || true
  fi
  BENCH_BIN="$WORK/bench" PYTHON="$PYTHON" DEVICE=cuda PEAK_TFLOPS=67 CASES="tutorial128 unet2d32 ldm_quickstart" \
    WARMUP=3 STEPS=10 OUT="$WORK/bench.jsonl" scripts/bench.sh > "$WORK/bench.txt" 2>&1
  row "bench.sh DEVICE=cuda" "rc $?, table below" "PyTorch eager, same GPU"
fi

echo
echo "| check | result | reference |"
echo "| --- | --- | --- |"
printf '%s\n' "${ROWS[@]}"
[ -f "$WORK/bench.txt" ] && { echo; grep -E '^\||TFLOP' "$WORK/bench.txt"; }
echo "(logs in $WORK)"
