"""The PyTorch side of scripts/bench.sh: the same model, batch, step and optimizer as
`bench --config <same config>`, on synthetic data. Prints one JSON line.

    .venv/bin/python scripts/bench_torch.py --config configs/bench_tutorial_unet.toml \
        --threads 2 --warmup 3 --steps 10 [--batch 512] [--diffusers-config unet.json]

The step: draw noise and timesteps, x_t = sqrt(abar) x0 + sqrt(1 - abar) noise, forward,
epsilon MSE, backward, clip_grad_norm_ (when train.max_grad_norm > 0), AdamW with the config's
hyperparameters. Eager mode, float32, CPU. Needs torch and diffusers.
"""
import argparse
import json
import os
import resource
import sys
import time
import tomllib

import torch

sys.path.insert(0, os.path.dirname(__file__))


def training_flops(forward, x0, steps_t) -> int:
    """FLOPs of one training step's forward + backward (matmuls, convolutions, attention), counted
    by PyTorch's FlopCounterMode on one untimed step of this model; the same model on our side
    does the same arithmetic, so this is the figure both sides' share of peak FLOP/s uses."""
    from torch.utils.flop_counter import FlopCounterMode

    ts = torch.randint(0, steps_t, (x0.shape[0],), device=x0.device)
    with FlopCounterMode(display=False) as counter:
        loss = torch.nn.functional.mse_loss(forward(x0, ts), x0)
        loss.backward()
    return counter.get_total_flops()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--diffusers-config", help="UNet2DModel or UNet2DConditionModel config.json from `bench --diffusers-config`")
    ap.add_argument("--latent", type=int, help="latent_diffusion: the latents' height and width")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (PyTorch eager on that device)")
    args = ap.parse_args()
    device = torch.device(args.device)
    # float32 on both sides: PyTorch's cuDNN convolutions default to TF32 tensor cores, which
    # would compare a 10-bit-mantissa product against our f32 one.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with open(args.config, "rb") as f:
        cfg = tomllib.load(f)
    model_cfg = cfg.get("model", {})
    arch = model_cfg.get("architecture", "unet_2d")
    data = cfg.get("data", {})
    res = data.get("resolution", 32)
    channels = 1 if data.get("color", "rgb") == "grayscale" else 3
    train = cfg.get("train", {})
    batch = args.batch or train.get("batch_size", 16)
    if arch == "tutorial_unet":
        from torch_models import TutorialUNet

        t = model_cfg.get("tutorial", {})
        model = TutorialUNet(
            t.get("image_size", 28), t.get("in_channels", 1), t.get("channels", [10, 20, 40, 80]), t.get("time_embed_dim", 128)
        )
        forward = lambda x, ts: model(x, ts)
    elif arch == "latent_diffusion":
        # The conditional U-Net alone on random latents with a fixed random text context, as
        # `bench` measures it (first stage and text encoder left out on both sides).
        from diffusers import UNet2DConditionModel

        with open(args.diffusers_config) as f:
            model = UNet2DConditionModel.from_config(json.load(f))
        res, channels = args.latent, model.config.in_channels
        length = model_cfg.get("conditioning", {}).get("max_length", 77)
        context = torch.rand(batch, length, model.config.cross_attention_dim, device=device) * 2 - 1
        forward = lambda x, ts: model(x, ts, encoder_hidden_states=context).sample
    else:
        from diffusers import UNet2DModel

        with open(args.diffusers_config) as f:
            model = UNet2DModel.from_config(json.load(f))
        forward = lambda x, ts: model(x, ts).sample
    params = sum(p.numel() for p in model.parameters())
    model.to(device)
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=train.get("learning_rate", 1e-4),
        betas=(train.get("adam_beta1", 0.9), train.get("adam_beta2", 0.999)),
        eps=train.get("adam_epsilon", 1e-8),
        weight_decay=train.get("adam_weight_decay", 1e-2),
    )
    max_norm = train.get("max_grad_norm", 1.0)
    d = cfg.get("diffusion", {})
    steps_t = d.get("num_train_timesteps", 1000)
    if d.get("beta_schedule", "linear") == "linear":
        betas = torch.linspace(d.get("beta_start", 1e-4), d.get("beta_end", 0.02), steps_t)
    else:  # squaredcos_cap_v2 / scaled_linear: the schedule does not change the cost of a step
        betas = torch.linspace(1e-4, 0.02, steps_t)
    abar = torch.cumprod(1 - betas, 0).to(device)
    x0 = (torch.rand(batch, channels, res, res) * 2 - 1).to(device)
    flops = training_flops(forward, x0, steps_t)
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        noise = torch.randn_like(x0)
        ts = torch.randint(0, steps_t, (batch,), device=device)
        a = abar[ts].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = torch.nn.functional.mse_loss(forward(xt, ts), noise)
        loss.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if max_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    times.sort()
    median = times[len(times) // 2]
    print(
        json.dumps(
            {
                "impl": f"pytorch-{torch.__version__}",
                "config": args.config,
                "params": params,
                "batch": batch,
                "shape": [batch, channels, res, res],
                "steps": args.steps,
                "median_ms": median * 1e3,
                "mean_ms": sum(times) / len(times) * 1e3,
                "images_per_sec": batch / median,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "peak_device_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
                "threads": torch.get_num_threads(),
                "device": str(device),
                "flops_per_step": flops,
            }
        )
    )


if __name__ == "__main__":
    main()
