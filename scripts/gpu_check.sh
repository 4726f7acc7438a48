#!/usr/bin/env bash
# The prepared check for a GPU machine (NVIDIA driver, Python with torch; no Rust needed):
# unpacks the carried CUDA `train` binary and prints one table:
#   1. the quickstart on cuda: wall time and final loss (the CPU run's: 0.0103)
#   2. SIGKILL + resume on cuda: largest weight difference against an uninterrupted run
#   3. data parallelism at world size 1 through NCCL (`run.devices = ["cuda:0"]`)
#   4. without a usable device index: the error text (no panic)
# Sized for about 6 minutes on one H200.
#
# Prepare on the build machine (scripts/setup-cuda-build.sh first):
#   CARGO_TARGET_DIR=~/.cache/difftrain-target-cuda cargo build --release --features cuda --bin train
#   strip -o gpu/train ~/.cache/difftrain-target-cuda/release/train && xz -T0 -6 gpu/train
# then on the GPU machine, from the repository root:
#   scripts/gpu_check.sh gpu/train.xz
set -uo pipefail
cd "$(dirname "$0")/.."
PACKED="${1:-gpu/train.xz}"
PYTHON="${PYTHON:-python3}"
WORK="${OUT:-$(mktemp -d)}"
BIN="$WORK/train"
"$PYTHON" -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" "$PACKED" "$BIN"
chmod +x "$BIN"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

declare -a ROWS
row() { ROWS+=("| $1 | $2 | $3 |"); echo "$1: $2 ($3)" >&2; }
final_loss() { grep -o 'final loss [0-9.e+-]*' "$1" | tail -1 | awk '{print $3}'; }

# 1. The quickstart on cuda.
start=$(date +%s.%N)
"$BIN" --config configs/quickstart.toml --set run.device='"cuda"' --set run.output_dir="\"$WORK/qs\"" > "$WORK/qs.log" 2>&1
rc=$?
secs=$(echo "$(date +%s.%N) - $start" | bc)
row "quickstart on cuda" "rc $rc, ${secs%.*} s, final loss $(final_loss "$WORK/qs.log")" "CPU: 146 s, 0.0103"

# 2. SIGKILL + resume: 300 steps uninterrupted vs killed after checkpoint-100 and resumed.
common=(--set run.device='"cuda"' --set train.max_steps=300 --set checkpoint.every_steps=100 --set logging.sample_every=0)
"$BIN" --config configs/quickstart.toml "${common[@]}" --set run.output_dir="\"$WORK/a\"" > "$WORK/a.log" 2>&1
"$BIN" --config configs/quickstart.toml "${common[@]}" --set train.max_steps=100000 --set run.output_dir="\"$WORK/b\"" > "$WORK/b.log" 2>&1 &
pid=$!
for _ in $(seq 600); do [ -f "$WORK/b/latest" ] && break; sleep 0.5; done
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
row "SIGKILL + resume on cuda" "max |diff| ${diff:-n/a}" "bitwise on CPU (0)"

# 3. Data parallelism through NCCL at world size 1.
"$BIN" --config configs/quickstart.toml --set 'run.devices=["cuda:0"]' --set train.max_steps=50 \
  --set logging.sample_every=0 --set run.output_dir="\"$WORK/dp\"" > "$WORK/dp.log" 2>&1
row "NCCL, world size 1" "rc $?, final loss $(final_loss "$WORK/dp.log")" "50 steps"

# 4. A device index that does not exist: a clear error.
msg=$("$BIN" --config configs/quickstart.toml --set run.device='"cuda:63"' --check 2>&1 | tail -1)
row "cuda:63 --check" "$msg" "a clear error, no panic"

echo
echo "| check | result | reference |"
echo "| --- | --- | --- |"
printf '%s\n' "${ROWS[@]}"
echo "(logs in $WORK)"
