#!/usr/bin/env bash
# Training-step throughput, difftrain (burn) against PyTorch, same machine, same models, same
# batch, same thread count, same optimizer, one after the other. Prints a table with the ratio.
#
#   scripts/bench.sh                 # all cases
#   CASES="tutorial128" scripts/bench.sh
#   PYTHON=.venv/bin/python THREADS=2 WARMUP=3 STEPS=10 SPLIT=1 scripts/bench.sh
#   DEVICE=cuda PEAK_TFLOPS=67 scripts/bench.sh   # burn-cuda against PyTorch eager on the GPU
#   BENCH_BIN=path/to/bench PYTHON=python3 DEVICE=cuda scripts/bench.sh   # prebuilt binary
#   SD=1 scripts/bench.sh            # then the Stable Diffusion 1.5 cases (scripts/bench_sd.sh:
#                                    # U-Net step, text to image, loading, LoRA step at 256/512)
#
# DEVICE=cuda builds `bench` with the `cuda` feature and runs both sides on the GPU. Both sides
# report achieved TFLOP/s from the model's training FLOPs per step (counted by PyTorch's
# FlopCounterMode on the same model); with PEAK_TFLOPS (the device's peak for the precision
# used: f32 here) the table adds each side's share of it.
#
# Needs a Python with torch and diffusers (see docs/benchmarks.md). Results are appended as JSON
# lines to bench-results.jsonl (override with OUT=...).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/difftrain-target}"
PYTHON="${PYTHON:-.venv/bin/python}"
THREADS="${THREADS:-$(nproc)}"
WARMUP="${WARMUP:-3}"
STEPS="${STEPS:-10}"
OUT="${OUT:-bench-results.jsonl}"
CASES="${CASES:-tutorial128 tutorial512 unet2d32 unet2d64 ldm_quickstart}"
# SPLIT=N: our side splits each batch over N replica threads (docs/benchmarks.md, attempts).
SPLIT="${SPLIT:-1}"
DEVICE="${DEVICE:-cpu}"
export PEAK_TFLOPS="${PEAK_TFLOPS:-}"

# BENCH_BIN=path: use a prebuilt `bench` (a GPU machine without a Rust toolchain) instead of
# building one here.
if [ -n "${BENCH_BIN:-}" ]; then
  BENCH="$BENCH_BIN"
else
  features=()
  [ "$DEVICE" = cpu ] || features=(--features cuda)
  cargo build --release --quiet "${features[@]}" --bin bench
  BENCH="$CARGO_TARGET_DIR/release/bench"
fi
# burn's CPU backend uses rayon's global pool; give both sides the same number of threads.
export RAYON_NUM_THREADS="$THREADS"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rows="$tmp/rows.jsonl"
for case in $CASES; do
  extra=()
  case "$case" in
    tutorial128) config=configs/bench_tutorial_unet.toml; batch=128 ;;
    tutorial512) config=configs/bench_tutorial_unet.toml; batch=512 ;;
    unet2d32) config=configs/bench_unet2d_32.toml; batch=32 ;;
    unet2d64) config=configs/bench_unet2d_64.toml; batch=8 ;;
    # The LDM quickstart's conditional U-Net alone (random latents and text context; its
    # autoencoder and text encoder are left out on both sides): 8x8 latents of 32 px images.
    ldm_quickstart) config=configs/ldm_quickstart.toml; batch=32; extra=(--latent 8) ;;
    *) echo "unknown case $case" >&2; exit 2 ;;
  esac
  echo "== $case ($config, batch $batch, $THREADS threads)" >&2
  ours=$("$BENCH" --config "$config" --set "train.batch_size=$batch" --set "run.device=$DEVICE" \
    --warmup "$WARMUP" --steps "$STEPS" --split "$SPLIT" "${extra[@]}")
  "$BENCH" --config "$config" --diffusers-config "$tmp/unet.json" 2>/dev/null || true
  theirs=$("$PYTHON" scripts/bench_torch.py --config "$config" --batch "$batch" \
    --threads "$THREADS" --warmup "$WARMUP" --steps "$STEPS" --diffusers-config "$tmp/unet.json" \
    --device "$DEVICE" "${extra[@]}")
  echo "{\"case\": \"$case\", \"ours\": $ours, \"theirs\": $theirs}" | tee -a "$OUT" >> "$rows"
done

"$PYTHON" - "$rows" <<'PY'
import json, os, platform, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}; threads {rows[0]['ours']['threads']}; device {os.environ.get('DEVICE', 'cpu')}")
print("| case | params (ours / torch) | batch | ours ms/step | torch ms/step | ours img/s | torch img/s | ours/torch speed | peak RSS MiB ours / torch |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for r in rows:
    o, t = r["ours"], r["theirs"]
    ratio = o["images_per_sec"] / t["images_per_sec"]
    print(f"| {r['case']} | {o['params']:,} / {t['params']:,} | {o['batch']} | {o['median_ms']:.0f} | {t['median_ms']:.0f} "
          f"| {o['images_per_sec']:.1f} | {t['images_per_sec']:.1f} | {ratio:.2f}x | {o['peak_rss_mib']:.0f} / {t['peak_rss_mib']:.0f} |")
    if o["params"] != t["params"]:
        print(f"  PARAMETER COUNTS DIFFER for {r['case']}: the models are not the same", file=sys.stderr)
peak = float(os.environ["PEAK_TFLOPS"]) if os.environ.get("PEAK_TFLOPS") else None
print()
for r in rows:
    o, t = r["ours"], r["theirs"]
    flops = t.get("flops_per_step")
    if not flops:
        continue
    rate = lambda ms: flops / (ms / 1e3) / 1e12
    share = lambda ms: f" ({100 * rate(ms) / peak:.1f}% of {peak:g} peak)" if peak else ""
    print(f"{r['case']}: {flops / 1e9:.1f} GFLOP per step (forward + backward, PyTorch's FlopCounterMode); "
          f"ours {rate(o['median_ms']):.3f} TFLOP/s{share(o['median_ms'])}, torch {rate(t['median_ms']):.3f} TFLOP/s{share(t['median_ms'])}")
PY

if [ "${SD:-0}" = 1 ]; then
  scripts/bench_sd.sh
fi
