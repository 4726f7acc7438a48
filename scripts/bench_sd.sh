#!/usr/bin/env bash
# Stable Diffusion 1.5-architecture benchmarks, difftrain against diffusers on PyTorch, same
# machine, same thread count, random weights (nothing is downloaded), one after the other:
#   unet:    the U-Net's forward + backward at 32x32 latents, batch 1 (what fine-tuning costs)
#   txt2img: text to image, 512x512, 20 DDIM steps, guidance 7.5 (U-Net, VAE decoder, CLIP)
#   load:    loading a 4 GB SD 1.5 folder: peak resident memory against the weights' size
#   lora256, lora512: a LoRA training step (rank 8 on to_q/to_k/to_v/to_out.0, base frozen,
#            AdamW on the adapters; PyTorch side: diffusers + peft) at 256 and 512 px, batch 1
#   lora256_bf16, lora256_fp16, lora512_bf16, lora512_fp16: the same under mixed precision
#            (base in half, adapters f32; PyTorch side: torch.autocast, GradScaler for fp16)
#
#   scripts/bench_sd.sh                      # all
#   CASES="unet" THREADS=2 scripts/bench_sd.sh
#
# Needs a Python with torch, diffusers and transformers (docs/benchmarks.md). Appends JSON lines
# to bench-results.jsonl (OUT=...).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/difftrain-target}"
PYTHON="${PYTHON:-.venv/bin/python}"
THREADS="${THREADS:-$(nproc)}"
OUT="${OUT:-bench-results.jsonl}"
CASES="${CASES:-unet txt2img load lora256 lora512}"
export RAYON_NUM_THREADS="$THREADS"
cargo build --release --quiet --bin bench_sd
BENCH="$CARGO_TARGET_DIR/release/bench_sd"

for case in $CASES; do
  echo "== $case ($THREADS threads)" >&2
  case "$case" in
    unet)
      ours=$("$BENCH" unet --latent 32 --batch 1 --warmup 1 --steps 3)
      theirs=$("$PYTHON" scripts/bench_sd_torch.py unet --latent 32 --batch 1 --warmup 1 --steps 3 --threads "$THREADS")
      ;;
    txt2img)
      ours=$("$BENCH" txt2img --size 512 --steps 20)
      theirs=$("$PYTHON" scripts/bench_sd_torch.py txt2img --size 512 --steps 20 --threads "$THREADS")
      ;;
    lora256|lora512|lora256_bf16|lora512_bf16|lora256_fp16|lora512_fp16)
      px=${case#lora}; px=${px%%_*}
      precision=no; [[ $case == *_* ]] && precision=${case##*_}
      latent=$(( px / 8 ))
      ours=$("$BENCH" lora --latent "$latent" --warmup 1 --steps 3 --precision "$precision")
      theirs=$("$PYTHON" scripts/bench_sd_torch.py lora --latent "$latent" --warmup 1 --steps 3 --threads "$THREADS" --precision "$precision")
      ;;
    load)
      dir=$(mktemp -d)
      "$BENCH" write --out "$dir" > /dev/null
      ours=$("$BENCH" load --folder "$dir")
      theirs=null
      rm -rf "$dir"
      ;;
    *) echo "unknown case $case" >&2; exit 2 ;;
  esac
  echo "{\"case\": \"$case\", \"ours\": $ours, \"theirs\": $theirs}" | tee -a "$OUT"
done
