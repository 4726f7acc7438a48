"""Reference fixtures from diffusers for tests/ (run once; commit the outputs).

    python -m venv .venv && .venv/bin/pip install torch diffusers safetensors numpy
    .venv/bin/python scripts/gen_reference.py

Writes tests/fixtures/:
- schedules.json: alphas_cumprod at fixed indices for the three beta schedules.
- samplers.json + samplers.safetensors: DDPMScheduler/DDIMScheduler.step over a fixed sequence
  of model outputs and noises; the Rust samplers must reproduce every intermediate sample.
- tiny_unet2d/: a small UNet2DModel saved with save_pretrained (random weights, norms
  perturbed so weight/bias mix-ups show), plus io.safetensors with an input, timesteps and
  diffusers' output.
Generated with diffusers 0.42.1 and torch 2.15 on CPU in float32.
"""
import json
import os

import diffusers
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
os.makedirs(OUT, exist_ok=True)
torch.manual_seed(0)


def schedules():
    idx = [0, 1, 10, 100, 500, 998, 999]
    cases = {
        "linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
        "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),
    }
    out = {"indices": idx}
    for name, kw in cases.items():
        s = DDPMScheduler(num_train_timesteps=1000, **kw)
        out[name] = [float(s.alphas_cumprod[i]) for i in idx]
    with open(os.path.join(OUT, "schedules.json"), "w") as f:
        json.dump(out, f, indent=1)


def samplers():
    shape = (2, 3, 4, 4)
    cases = [
        dict(name="ddpm_eps_leading", cls="ddpm", steps=10, spacing="leading", prediction="epsilon", eta=0.0, clip=True),
        dict(name="ddpm_v_trailing", cls="ddpm", steps=8, spacing="trailing", prediction="v_prediction", eta=0.0, clip=False),
        dict(name="ddim_eps_leading", cls="ddim", steps=10, spacing="leading", prediction="epsilon", eta=0.0, clip=True),
        dict(name="ddim_v_trailing_eta", cls="ddim", steps=7, spacing="trailing", prediction="v_prediction", eta=0.5, clip=False),
        dict(name="ddim_sample_linspace", cls="ddim", steps=5, spacing="linspace", prediction="sample", eta=1.0, clip=True),
    ]
    tensors, meta = {}, []
    for c in cases:
        kw = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                  prediction_type=c["prediction"], clip_sample=c["clip"], timestep_spacing=c["spacing"])
        sched = DDPMScheduler(**kw) if c["cls"] == "ddpm" else DDIMScheduler(**kw)
        sched.set_timesteps(c["steps"])
        x = torch.randn(shape)
        tensors[f"{c['name']}.initial"] = x.clone()
        for i, t in enumerate(sched.timesteps):
            out = torch.randn(shape) * 0.8
            noise = torch.randn(shape)
            tensors[f"{c['name']}.model_output.{i}"] = out
            tensors[f"{c['name']}.noise.{i}"] = noise
            if c["cls"] == "ddpm":
                # DDPMScheduler draws its own noise; replay ours through a generator whose
                # first draw is exactly `noise`.
                gen = torch.Generator().manual_seed(1000 + i)
                noise = torch.randn(shape, generator=torch.Generator().manual_seed(1000 + i))
                tensors[f"{c['name']}.noise.{i}"] = noise
                x = sched.step(out, t, x, generator=gen).prev_sample
            else:
                x = sched.step(out, t, x, eta=c["eta"], variance_noise=noise).prev_sample
            tensors[f"{c['name']}.sample.{i}"] = x.clone()
        meta.append({**c, "timesteps": [int(t) for t in sched.timesteps]})
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "samplers.safetensors"))
    with open(os.path.join(OUT, "samplers.json"), "w") as f:
        json.dump(meta, f, indent=1)


def tiny_unet():
    model = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = os.path.join(OUT, "tiny_unet2d")
    model.save_pretrained(path)
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([10.0, 999.0])
    with torch.no_grad():
        y = model(x, t).sample
    save_file({"input": x, "timesteps": t, "output": y.contiguous()}, os.path.join(path, "io.safetensors"))


if __name__ == "__main__":
    schedules()
    samplers()
    tiny_unet()
    print(f"fixtures written to {OUT} with diffusers {diffusers.__version__}, torch {torch.__version__}")
