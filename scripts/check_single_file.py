"""Loads a single file written by `merge --out FILE.safetensors` with diffusers'
`StableDiffusionPipeline.from_single_file` (the loader behind A1111-style checkpoints in
diffusers) and compares every weight with the diffusers folder `merge` writes for the same LoRAs.

    .venv/bin/python scripts/check_single_file.py --file merged.safetensors --folder merged/ \
        --config tests/fixtures/sd/tiny_sd

`--config` is a diffusers folder of the same architecture: diffusers takes component configs
from it instead of downloading them. Prints one line per component; exits 1 on a difference.
"""
import argparse
import sys

import torch
from diffusers import StableDiffusionPipeline


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--file", required=True)
    ap.add_argument("--folder", required=True)
    ap.add_argument("--config", required=True)
    args = ap.parse_args()
    folder = StableDiffusionPipeline.from_pretrained(args.folder, dtype=torch.float32)
    single = StableDiffusionPipeline.from_single_file(
        args.file, config=args.config, local_files_only=True, dtype=torch.float32
    )
    ok = True
    for name in ["unet", "vae", "text_encoder"]:
        a, b = getattr(folder, name).state_dict(), getattr(single, name).state_dict()
        keys = [k for k in a if not k.endswith("position_ids")]
        missing = [k for k in keys if k not in b]
        diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in keys if k in b)
        print(f"{name}: {len(keys)} tensors, {len(missing)} missing from the single file, max |diff| {diff:.3g}")
        ok &= not missing and diff == 0.0
    print("OK: the single file loads in diffusers to the folder's weights" if ok else "DIFFERENT")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
