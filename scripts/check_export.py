"""Prove that diffusers loads a difftrain export, and that both compute the same function.

    .venv/bin/python scripts/check_export.py checkpoints/quickstart/export

Loads `<export>/unet` with `UNet2DModel.from_pretrained` (strict: diffusers raises on missing
or mis-shaped keys and we fail on any warning about unexpected ones), then the whole folder with
`DDPMPipeline.from_pretrained`, runs a forward pass and a short DDIM sampling loop, and prints
what it loaded. Needs torch and diffusers.
"""
import json
import os
import sys
import warnings

import torch
from diffusers import DDIMScheduler, DDPMPipeline, UNet2DModel
from safetensors.torch import load_file


def main(export):
    weights = load_file(os.path.join(export, "unet", "diffusion_pytorch_model.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "some weights were not used" becomes an error
        unet = UNet2DModel.from_pretrained(os.path.join(export, "unet"), low_cpu_mem_usage=False).eval()
    state = unet.state_dict()
    missing = sorted(set(state) - set(weights))
    unexpected = sorted(set(weights) - set(state))
    mismatched = sorted(k for k in set(state) & set(weights) if state[k].shape != weights[k].shape)
    identical = all(torch.equal(state[k], weights[k]) for k in weights)
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"UNet2DModel.from_pretrained: {len(weights)} tensors, {n_params} parameters")
    print(f"missing {missing or 'none'}, unexpected {unexpected or 'none'}, mismatched {mismatched or 'none'}")
    print(f"every loaded tensor equals the file: {identical}")
    cfg = unet.config
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = unet(x, torch.tensor([10, 500])).sample
    print(f"forward: input {tuple(x.shape)} -> output {tuple(y.shape)}, finite {bool(torch.isfinite(y).all())}")
    pipe = DDPMPipeline.from_pretrained(export)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    images = pipe(batch_size=4, num_inference_steps=25, generator=torch.Generator().manual_seed(0), output_type="np").images
    print(f"DDPMPipeline (DDIM, 25 steps): images {images.shape}, range [{images.min():.3f}, {images.max():.3f}]")
    print("scheduler:", json.dumps({k: pipe.scheduler.config[k] for k in ("beta_schedule", "prediction_type", "num_train_timesteps")}))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
