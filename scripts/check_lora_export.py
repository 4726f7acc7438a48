"""Checks a difftrain LoRA export against diffusers: loads each LoRA file into the base pipeline
with diffusers' own `load_lora_weights` and compares the U-Net output with that of the merged
model difftrain's `merge` command wrote.

    .venv/bin/python scripts/check_lora_export.py --base tests/fixtures/sd/tiny_sd \
        --export checkpoints/lora_run/export --merged checkpoints/lora_run/merged

--export holds pytorch_lora_weights.safetensors (diffusers format) and one more *.safetensors,
<name>.safetensors (kohya / sd-scripts format); every *.safetensors there is checked, the format
being told from the keys (lora_unet_* / lora_te_* is kohya, unet.* / text_encoder.* is
diffusers). --merged is a diffusers folder: the base with the LoRA folded in.

For each file: a fresh base pipeline (float32) gets the LoRA through
pipe.load_lora_weights(export, weight_name=file); then, on fixed inputs (x = randn(2, C, S, S)
with C, S from the U-Net config, seed 0; t = [10, 500]; encoder_hidden_states = that pipeline's
text encoder output for ["mountain", ""], so a text encoder LoRA counts too), its
unet(x, t, context).sample is compared with the same computation on the merged pipeline.
Prints per file: the format, the number of tensors and LoRA modules, header metadata
(ss_network_dim, ss_network_alpha, ss_base_model_version, sshs_model_hash; for diffusers files
r / lora_alpha / target_modules of lora_adapter_metadata), and the largest absolute difference of
the text encoder output and of the U-Net output against the merged model and against the base
(the latter shows that the LoRA does something). Exits with status 1 if any U-Net difference
against the merged model is over --tol (1e-4). Needs torch, diffusers, transformers, peft.
"""
import argparse
import glob
import json
import os
import sys

import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

# transformers 5.24's PEFT integration (used by load_lora_weights for a text encoder LoRA)
# refuses peft < 0.22, yet 0.21.2 is the newest release and works here: lift that check.
import transformers.integrations.peft as _tpeft  # noqa: E402

_tpeft.check_peft_version = lambda min_version: None

PROMPTS = ["mountain", ""]
KOHYA_META = ("ss_network_dim", "ss_network_alpha", "ss_base_model_version", "sshs_model_hash")


def load_pipe(folder):
    """A StableDiffusionPipeline in float32; the fp16 variant when the folder only has that."""
    plain = glob.glob(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
    fp16 = glob.glob(os.path.join(folder, "unet", "diffusion_pytorch_model.fp16.safetensors"))
    variant = "fp16" if fp16 and not plain else None
    return StableDiffusionPipeline.from_pretrained(folder, variant=variant, torch_dtype=torch.float32,
                                                   safety_checker=None, requires_safety_checker=False)


def inputs(pipe):
    cfg = pipe.unet.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    t = torch.tensor([10.0, 500.0])
    tok = pipe.tokenizer
    ids = tok(PROMPTS, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    return x, t, ids


@torch.no_grad()
def run(pipe, x, t, ids):
    context = pipe.text_encoder(ids).last_hidden_state
    return context, pipe.unet(x, t, context).sample


def describe(path):
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
        meta = f.metadata() or {}
        alphas = sorted({round(float(f.get_tensor(k)), 6) for k in keys if k.endswith(".alpha")})
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        fmt = "kohya"
        modules = sum(k.endswith(".lora_down.weight") for k in keys)
    elif any(k.startswith(("unet.", "text_encoder.")) for k in keys):
        fmt = "diffusers"
        modules = sum(k.endswith((".lora.down.weight", ".lora_linear_layer.down.weight", ".lora_A.weight"))
                      for k in keys)
    else:
        fmt = "unknown"
        modules = 0
    parts = {}
    for prefix in ("lora_unet_", "lora_te", "unet.", "text_encoder."):
        n = sum(k.startswith(prefix) for k in keys)
        if n:
            parts[prefix] = n
    print(f"  format {fmt}: {len(keys)} tensors, {modules} LoRA modules {parts}")
    examples = sorted(keys)
    for prefix in ("lora_unet_", "lora_te", "unet.", "text_encoder."):
        first = next((k for k in examples if k.startswith(prefix)), None)
        if first:
            print(f"    e.g. {first}")
    shown = {k: meta[k] for k in KOHYA_META if k in meta}
    if "lora_adapter_metadata" in meta:
        adapter = json.loads(meta["lora_adapter_metadata"])
        shown["lora_adapter_metadata"] = {k: v for k, v in sorted(adapter.items())
                                          if k.split(".")[-1] in ("r", "lora_alpha", "target_modules", "use_dora")}
    print(f"  metadata: {json.dumps(shown)}")
    print(f"  metadata keys: {sorted(meta)}")
    if alphas:
        print(f"  .alpha values: {alphas}")
    return fmt


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="the base diffusers folder the LoRA was trained on")
    ap.add_argument("--export", required=True, help="folder with pytorch_lora_weights.safetensors and <name>.safetensors")
    ap.add_argument("--merged", required=True, help="diffusers folder of the base with the LoRA merged in")
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()

    files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(args.export, "*.safetensors")))
    diffusers_files = [f for f in files if f.startswith("pytorch_lora_weights")]
    others = [f for f in files if not f.startswith("pytorch_lora_weights")]
    print(f"export {args.export}: diffusers file {diffusers_files}, other (kohya) {others}")
    if not diffusers_files:
        print("missing pytorch_lora_weights.safetensors")
    if len(others) != 1:
        print(f"expected exactly one other *.safetensors (the kohya file), found {len(others)}")

    base = load_pipe(args.base)
    x, t, ids = inputs(base)
    base_ctx, base_out = run(base, x, t, ids)
    del base
    merged = load_pipe(args.merged)
    merged_ctx, merged_out = run(merged, x, t, ids)
    del merged
    print(f"inputs: x {tuple(x.shape)}, t {t.tolist()}, prompts {PROMPTS}")
    print(f"merged vs base: text encoder {(merged_ctx - base_ctx).abs().max().item():.3e}, "
          f"unet {(merged_out - base_out).abs().max().item():.3e}")

    failed = not diffusers_files or len(others) != 1
    for name in diffusers_files + others:
        path = os.path.join(args.export, name)
        print(f"\n{name}")
        describe(path)
        pipe = load_pipe(args.base)
        try:
            pipe.load_lora_weights(args.export, weight_name=name)
        except Exception as e:  # noqa: BLE001 - report and go on with the other file
            print(f"  load_lora_weights failed: {type(e).__name__}: {e}")
            failed = True
            continue
        ctx, out = run(pipe, x, t, ids)
        d_merged = (out - merged_out).abs().max().item()
        print(f"  text encoder output: max |diff| vs merged {(ctx - merged_ctx).abs().max().item():.3e}, "
              f"vs base {(ctx - base_ctx).abs().max().item():.3e}")
        print(f"  unet output:         max |diff| vs merged {d_merged:.3e}, "
              f"vs base {(out - base_out).abs().max().item():.3e} (|merged out| max {merged_out.abs().max().item():.3f})")
        ok = d_merged <= args.tol
        print(f"  {'OK' if ok else 'FAIL'} (tolerance {args.tol:g})")
        failed |= not ok
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
