"""Predicted data-parallel scaling efficiency of every training config, at 2, 4 and 8 GPUs.

    .venv/bin/python scripts/cost_model.py [configs/quickstart.toml ...]

Prints a Markdown report: the assumptions, a parameter-count check, one table row per config
and one line per config saying where communication outgrows compute. Needs the prebuilt
`train` and `bench` binaries (see BIN_DIR), torch and diffusers. Scratch runs go to a temporary
directory that is removed at the end; nothing in the repository is written.

The model (a first-order estimate, not a measurement)
-----------------------------------------------------
One optimizer step over the global batch (train.batch_size x train.gradient_accumulation_steps
images) costs F floating-point operations: forward + backward, counted with PyTorch's
`FlopCounterMode` on a PyTorch twin of the model (the twin's parameter count is asserted equal
to the one the `train` binary prints). For the PixelCNN prior, F also holds the forward of the
frozen stage-1 VQ-VAE encoder, which every step runs to turn its images into codes. With N
data-parallel ranks:

    T_1          = F / R                                  one GPU, R = MFU x PEAK_FLOPS
    T_compute(N) = F / (N R)                              each rank does 1/N of the batch
    T_ring(N)    = 2(N-1)/N x 4P / busbw + 2(N-1) alpha   one fp32 ring all-reduce of the P
                                                          gradients per optimizer step
    T_N          = T_compute(N) + T_ring(N)               no overlap of communication/compute
    efficiency   = T_1 / (N T_N)

With `--processes` (a multi-process launch, one process per GPU, across machines), the gradients
also cross the host twice per step, because burn does not expose a tensor's device buffer to
the cudarc NCCL communicator that joins processes (src/distributed/nccl.rs):

    T_host       = 2 x 4P / HOST_COPY_BW                  device -> host, host -> device
    T_N          = T_compute(N) + T_host + T_ring(N)

and InfiniBand joins the interconnects (machines talk over the network, not NVLink).

This is what difftrain does: src/distributed/ sums the gradients once per optimizer step
(after all accumulation micro-steps, like DDP's `no_sync`), and src/train/mod.rs only starts
that all-reduce after the last backward, so nothing overlaps. `busbw` is the nccl-tests "bus
bandwidth", defined so that the 2(N-1)/N ring factor turns it into time.

What it leaves out, and which way each omission moves the real efficiency:
- lower: the per-rank batch shrinks with N, and small per-rank batches reach a lower share of
  peak than MFU in practice (kernels too small to fill the GPU);
- lower: kernel-launch and framework overhead. A step of the small configs is tens of
  microseconds of FLOPs at R, less than its hundreds of kernel launches take, and that overhead
  does not shrink with N;
- lower: the non-gradient values packed into the same all-reduce (the loss, one presence flag
  per parameter tensor, and for the VQ-VAE its code counts and restart pool: see
  `vqvae_stats_floats`; its effect is reported under the table);
- higher: difftrain computes in fp32 (train.mixed_precision = "no" is the only one built) while
  R is a share of the dense BF16 peak, and elementwise work, norms and the optimizer update are
  not counted (FlopCounterMode counts matmuls, convolutions and attention): both make the real
  compute longer, so communication is a smaller share of it. Data loading is ignored.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
from torch_models import TutorialUNet  # noqa: E402  (the twin of src/models/tutorial_unet.rs)

# --- Assumptions -------------------------------------------------------------------------------

#: Where the prebuilt `train` and `bench` binaries are (override with $DIFFTRAIN_BIN_DIR).
BIN_DIR = Path(os.environ.get("DIFFTRAIN_BIN_DIR", Path.home() / ".cache/difftrain-target/release"))
#: World sizes to predict.
WORLD_SIZES = (2, 4, 8)
#: Dense BF16 peak of one H100/H200 SXM, FLOP/s (what mixed precision would use).
PEAK_FLOPS = 989e12
PEAK_LABEL = "dense BF16, H100/H200 SXM"
#: FP32 (no tensor cores) peak of the same GPU: `--fp32`, today's fp32-only build.
FP32_PEAK_FLOPS = 67e12
#: Share of that peak a training step sustains (model FLOPs utilisation).
MFU = 0.35
#: Bytes per gradient value on the wire: difftrain all-reduces fp32 gradients.
GRAD_BYTES = 4


@dataclass(frozen=True)
class Interconnect:
    name: str
    #: nccl-tests all-reduce bus bandwidth, bytes/s.
    busbw: float
    #: Latency per ring step, seconds.
    alpha: float


#: H100/H200 SXM over NVLink/NVSwitch, nccl-tests order of magnitude.
NVLINK = Interconnect("NVLink", busbw=360e9, alpha=5e-6)
#: The same GPUs over PCIe (no NVLink), nccl-tests order of magnitude.
PCIE = Interconnect("PCIe", busbw=20e9, alpha=10e-6)
#: Between machines, one 400 Gb/s InfiniBand NIC per GPU (nccl-tests order of magnitude).
INFINIBAND = Interconnect("InfiniBand", busbw=45e9, alpha=15e-6)
INTERCONNECTS = (NVLINK, PCIE)
#: `--processes`: host <-> device copy bandwidth of the gradient buffer (pageable memory over
#: PCIe Gen5 x16, order of magnitude), paid twice per optimizer step.
HOST_COPY_BW = 25e9
HOST_COPIES = False

#: A stand-in dataset for configs whose data is not on this machine (MNIST is not shipped).
#: The parameter count does not depend on the data; resolution and color are kept.
FALLBACK_DATA = REPO / "datasets/shapes"

CHANNELS = {"rgb": 3, "grayscale": 1}


# --- The time model ----------------------------------------------------------------------------

def compute_rate() -> float:
    """R: sustained FLOP/s of one GPU."""
    return MFU * PEAK_FLOPS


def ring_allreduce_seconds(payload_bytes: float, n: int, link: Interconnect) -> float:
    """Ring all-reduce of `payload_bytes` over `n` ranks (reduce-scatter + all-gather)."""
    if n == 1:
        return 0.0
    return 2 * (n - 1) / n * payload_bytes / link.busbw + 2 * (n - 1) * link.alpha


def efficiency(flops: float, payload_bytes: float, n: int, link: Interconnect) -> float:
    """T_1 / (N T_N) with T_N = F/(N R) + T_ring(N)."""
    r = compute_rate()
    t1 = flops / r
    tn = flops / (n * r) + ring_allreduce_seconds(payload_bytes, n, link) + host_copy_seconds(payload_bytes, n)
    return t1 / (n * tn)


def host_copy_seconds(payload_bytes: float, n: int) -> float:
    """`--processes`: the gradients' trip device -> host -> device around the NCCL call."""
    return 2 * payload_bytes / HOST_COPY_BW if HOST_COPIES and n > 1 else 0.0


# --- Our parameter counts: the train binary ----------------------------------------------------

MODEL_LINE = re.compile(r"^model: (\w+), (\d+) parameters$")


def toml_value(v) -> str:
    """A `--set` right-hand side: a quoted string (JSON's escapes are TOML's), true/false, a number."""
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def set_args(overrides: dict) -> list[str]:
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={toml_value(v)}")]


def resolved_config(path: Path) -> dict:
    """The config with every default filled in, as `train --check` prints it. `--check` refuses
    a missing data.path (MNIST is not shipped): then it checks against a stand-in folder and the
    config keeps its own path."""
    run = lambda extra: subprocess.run(
        [BIN_DIR / "train", "--config", path, "--check", *extra], cwd=REPO, capture_output=True, text=True
    )
    out = run([])
    if out.returncode != 0 and "does not exist" in out.stderr:
        data = tomllib.loads(path.read_text()).get("data", {}).get("path")
        out = run(set_args({"data.path": str(FALLBACK_DATA)}))
        if out.returncode == 0 and data is not None:
            cfg = tomllib.loads(out.stdout)
            cfg["data"]["path"] = data
            return cfg
    if out.returncode != 0:
        raise SystemExit(f"train --check {path} failed:\n{out.stderr}")
    return tomllib.loads(out.stdout)


def output_dir(cfg: dict) -> Path:
    """Mirrors `Config::output_dir` in src/config.rs."""
    return Path(cfg["run"].get("output_dir") or Path("checkpoints") / cfg["run"]["name"])


def tiny_run_overrides(cfg: dict, out: Path) -> dict:
    """Overrides that turn a config into a one-step run writing only under `out`."""
    o = {
        "train.max_steps": 1,
        "train.lr_warmup_steps": 0,
        "run.output_dir": str(out),
        "checkpoint.every_steps": 0,
        "export.enabled": False,
        "logging.tensorboard": False,
        "logging.sample_every": 0,
    }
    if not (REPO / cfg["data"]["path"]).exists():
        o["data.source"] = "image_folder"
        o["data.path"] = str(FALLBACK_DATA)
    return o


def train_one_step(config: Path, overrides: dict) -> None:
    """Runs `train` to completion (a stage-1 run whose checkpoint stage 2 loads)."""
    out = subprocess.run(
        [BIN_DIR / "train", "--config", config, *set_args(overrides)],
        cwd=REPO, capture_output=True, text=True,
    )
    if out.returncode != 0:
        raise SystemExit(f"train {config} failed:\n{out.stderr}")


def params_ours(config: Path, overrides: dict) -> int:
    """The parameter count `train` prints before its first step; stops the run right there.

    The line is `model: <Architecture>, <N> parameters` (src/train/mod.rs, `run_rank`).
    """
    proc = subprocess.Popen(
        [BIN_DIR / "train", "--config", config, *set_args(overrides)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if m := MODEL_LINE.match(line.strip()):
                return int(m.group(2))
    finally:
        # The count is all we need: skip the step and the final sample grid.
        proc.terminate()
        proc.wait()
    raise SystemExit(f"train {config} printed no 'model: ...' line:\n{''.join(seen[-20:])}")


# --- PyTorch twins of src/models/vqvae.rs and src/models/pixelcnn.rs ---------------------------
# Attribute names are difftrain's parameter paths, so the parameter sets correspond one to one.

class ResidualBlock(nn.Module):
    """x + conv_2(relu(conv_1(relu(x)))), a 3x3 then a 1x1 convolution, both without bias."""

    def __init__(self, dim, res_dim):
        super().__init__()
        self.conv_1 = nn.Conv2d(dim, res_dim, 3, 1, 1, bias=False)
        self.conv_2 = nn.Conv2d(res_dim, dim, 1, 1, 0, bias=False)

    def forward(self, x):
        return x + self.conv_2(F.relu(self.conv_1(F.relu(x))))


class Encoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, half = c["dim"], c["dim"] // 2
        self.conv_1 = nn.Conv2d(c["in_channels"], half, 4, 2, 1)
        self.conv_2 = nn.Conv2d(half, d, 4, 2, 1)
        self.conv_3 = nn.Conv2d(d, d, 3, 1, 1)
        self.res_blocks = nn.ModuleList(ResidualBlock(d, c["res_dim"]) for _ in range(c["num_res_blocks"]))
        self.pre_quant = nn.Conv2d(d, c["embedding_dim"], 1, 1, 0)

    def forward(self, x):
        h = self.conv_3(F.relu(self.conv_2(F.relu(self.conv_1(x)))))
        for block in self.res_blocks:
            h = block(h)
        return self.pre_quant(F.relu(h))


class Decoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, half = c["dim"], c["dim"] // 2
        self.conv_1 = nn.Conv2d(c["embedding_dim"], d, 3, 1, 1)
        self.res_blocks = nn.ModuleList(ResidualBlock(d, c["res_dim"]) for _ in range(c["num_res_blocks"]))
        self.conv_t1 = nn.ConvTranspose2d(d, half, 4, 2, 1)
        self.conv_t2 = nn.ConvTranspose2d(half, c["in_channels"], 4, 2, 1)

    def forward(self, z):
        h = self.conv_1(z)
        for block in self.res_blocks:
            h = block(h)
        return torch.tanh(self.conv_t2(F.relu(self.conv_t1(F.relu(h)))))


class VectorQuantizer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embedding = nn.Embedding(c["num_embeddings"], c["embedding_dim"])

    def nearest_codes(self, flat):
        """|z|^2 - 2 z E^T + |E|^2, argmin over codes (difftrain's `nearest_codes`)."""
        e = self.embedding.weight.detach()
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None]
        return dist.argmin(1)

    def forward(self, z_e):
        b, d, h, w = z_e.shape
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, d)
        z_q = self.embedding(self.nearest_codes(flat.detach()))
        embedding_loss = (z_q - flat.detach()).pow(2).mean()
        commitment_loss = (flat - z_q.detach()).pow(2).mean()
        st = flat + (z_q - flat).detach()
        return st.reshape(b, h, w, d).permute(0, 3, 1, 2), embedding_loss, commitment_loss


class VQVAE(nn.Module):
    """Twin of src/models/vqvae.rs; `c` is the resolved `[model.vqvae]` table."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.encoder = Encoder(c)
        self.quantize = VectorQuantizer(c)
        self.decoder = Decoder(c)

    def loss(self, x):
        """VqvaeObjective::loss: reconstruction MSE + embedding + commitment terms."""
        z_q, emb, commit = self.quantize(self.encoder(x))
        recon = self.decoder(z_q)
        return F.mse_loss(recon, x) + self.c["embedding_cost"] * emb + self.c["commitment_cost"] * commit

    def encode(self, x):
        z = self.encoder(x)
        b, d, h, w = z.shape
        return self.quantize.nearest_codes(z.permute(0, 2, 3, 1).reshape(-1, d)).reshape(b, h, w)


def stack_mask(k, vertical, type_b):
    """The k x k causal mask of src/models/pixelcnn.rs `stack_mask` (on the CPU even while the
    twins are built on the meta device, so its values can be read)."""
    m = torch.zeros(k, k, device="cpu")
    c = k // 2
    if vertical:
        m[:c] = 1
        if type_b:
            m[c] = 1
    else:
        m[c, :c] = 1
        if type_b:
            m[c, c] = 1
    return m


class MaskedConv2d(nn.Module):
    """A square k x k convolution whose kernel is multiplied by the mask in every forward: the
    FLOPs of the full square convolution, as difftrain computes it."""

    def __init__(self, cin, cout, k, vertical, type_b):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, 1, k // 2)
        self.vertical, self.type_b = vertical, type_b
        self.register_buffer("mask", stack_mask(k, vertical, type_b)[None, None].to(self.conv.weight.device))

    def masked_out(self) -> int:
        """Kernel weights the mask zeroes: parameters whose gradient is always zero."""
        cout, cin, k, _ = self.conv.weight.shape
        return cout * cin * int((stack_mask(k, self.vertical, self.type_b) == 0).sum())

    def forward(self, x):
        return F.conv2d(x, self.conv.weight * self.mask, self.conv.bias, padding=self.conv.padding)


def gate(x):
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedMaskedConv2d(nn.Module):
    def __init__(self, type_b, dim, k):
        super().__init__()
        self.vert_stack = MaskedConv2d(dim, 2 * dim, k, True, type_b)
        self.vert_to_horiz = nn.Conv2d(2 * dim, 2 * dim, 1)
        self.horiz_stack = MaskedConv2d(dim, 2 * dim, k, False, type_b)
        self.horiz_resid = nn.Conv2d(dim, dim, 1)
        self.residual = type_b

    def forward(self, x_v, x_h):
        h_vert = self.vert_stack(x_v)
        out_h = self.horiz_resid(gate(self.vert_to_horiz(h_vert) + self.horiz_stack(x_h)))
        return gate(h_vert), (out_h + x_h if self.residual else out_h)


class GatedPixelCNN(nn.Module):
    """Twin of src/models/pixelcnn.rs; `c` is `[model.pixelcnn]`, `num_codes` the VQ-VAE's K."""

    def __init__(self, c, num_codes):
        super().__init__()
        d = c["dim"]
        self.embedding = nn.Embedding(num_codes, d)
        self.layers = nn.ModuleList(
            GatedMaskedConv2d(i > 0, d, c["kernel"] if i > 0 else c["first_kernel"])
            for i in range(c["n_blocks"])
        )
        self.output_1 = nn.Conv2d(d, c["linear_dim"], 1)
        self.output_2 = nn.Conv2d(c["linear_dim"], num_codes, 1)

    def forward(self, codes):
        x = self.embedding(codes).permute(0, 3, 1, 2)
        x_v, x_h = x, x
        for layer in self.layers:
            x_v, x_h = layer(x_v, x_h)
        return self.output_2(F.relu(self.output_1(F.relu(x_h))))


# --- FLOPs of one step -------------------------------------------------------------------------
# Everything is built on the meta device: shapes only, so counting costs no compute. (On meta,
# attention takes PyTorch's math path and is counted as its bmms; a CPU run counts the fused
# kernel instead. The two differ by well under 0.1% of a step here.)

def counted(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def diffusion_flops(model, batch, channels, res, num_timesteps) -> int:
    """Forward + backward of the epsilon-MSE step (noising is elementwise: not counted)."""
    def step():
        x0 = torch.randn(batch, channels, res, res)
        noise = torch.randn_like(x0)
        t = torch.randint(0, num_timesteps, (batch,))
        pred = model(x0 + noise, t)
        F.mse_loss(getattr(pred, "sample", pred), noise).backward()
    return counted(step)


@dataclass
class StepCost:
    """One config's model, parameters and FLOPs per optimizer step (global batch)."""
    params_twin: int
    param_tensors: int
    flops: int
    #: Part of `flops` that is not the trained model's forward + backward, with a label.
    extra_flops: tuple[str, int] | None = None
    #: Parameters whose gradient is structurally zero (PixelCNN mask) but still all-reduced.
    zero_grad_params: int = 0


def step_cost(cfg: dict, tmp: Path, config: Path, stage1: dict | None) -> StepCost:
    arch = cfg["model"]["architecture"]
    res = cfg["data"]["resolution"]
    channels = CHANNELS[cfg["data"]["color"]]
    micro = cfg["train"]["batch_size"]
    accum = cfg["train"]["gradient_accumulation_steps"]
    with torch.device("meta"):
        if arch == "unet_2d":
            json_path = tmp / f"{config.stem}.unet.json"
            out = subprocess.run(
                [BIN_DIR / "bench", "--config", config, "--diffusers-config", json_path,
                 "--steps", "1", "--warmup", "0"],
                cwd=REPO, capture_output=True, text=True,
            )
            if out.returncode != 0:
                raise SystemExit(f"bench --diffusers-config {config} failed:\n{out.stderr}")
            from diffusers import UNet2DModel
            model = UNet2DModel.from_config(json.loads(json_path.read_text()))
            flops = diffusion_flops(model, micro, channels, res, cfg["diffusion"]["num_train_timesteps"])
        elif arch == "tutorial_unet":
            t = cfg["model"]["tutorial"]
            model = TutorialUNet(t["image_size"], t["in_channels"], t["channels"], t["time_embed_dim"])
            flops = diffusion_flops(model, micro, channels, res, cfg["diffusion"]["num_train_timesteps"])
        elif arch == "vqvae":
            model = VQVAE(cfg["model"]["vqvae"])
            flops = counted(lambda: model.loss(torch.randn(micro, channels, res, res)).backward())
        elif arch == "gated_pixelcnn":
            # The prior trains on the frozen stage-1 VQ-VAE's code maps, encoded from the images
            # inside every step (PixelCnnObjective::loss): that encoder forward is per-step work
            # each rank does for its share of the batch, so it is part of F.
            vq = VQVAE(stage1["model"]["vqvae"]).requires_grad_(False)
            k = stage1["model"]["vqvae"]["num_embeddings"]
            model = GatedPixelCNN(cfg["model"]["pixelcnn"], k)
            s = res // 4
            with torch.no_grad():
                encode = counted(lambda: vq.encode(torch.randn(micro, channels, res, res)))
            codes = torch.randint(0, k, (micro, s, s))
            prior = counted(lambda: F.cross_entropy(model(codes), codes).backward())
            masked = sum(m.masked_out() for m in model.modules() if isinstance(m, MaskedConv2d))
            return StepCost(trainable(model), len(list(model.parameters())),
                            accum * (encode + prior), ("stage-1 encode", accum * encode), masked)
        else:
            raise SystemExit(f"{config}: no twin for model.architecture = {arch!r}")
    return StepCost(trainable(model), len(list(model.parameters())), accum * flops)


def vqvae_stats_floats(cfg: dict, n: int) -> int:
    """Floats VqvaeObjective::local_stats adds to the step's all-reduce at world size n: K code
    counts, the reconstruction error and the restart pool (the last micro-batch's encoder
    outputs, [per-rank batch x (res/4)^2, D]; real on rank 0, zeros elsewhere)."""
    v = cfg["model"]["vqvae"]
    per_rank = cfg["train"]["batch_size"] // n
    return v["num_embeddings"] + 1 + per_rank * (cfg["data"]["resolution"] // 4) ** 2 * v["embedding_dim"]


# --- Stage 1 of the PixelCNN configs -----------------------------------------------------------

def stage1_config(cfg: dict, configs: list[Path]) -> Path:
    """`model.pixelcnn.vqvae_config` when set, else the VQ-VAE config whose run writes to
    `model.pixelcnn.vqvae`."""
    p = cfg["model"]["pixelcnn"]
    if p.get("vqvae_config"):
        return REPO / p["vqvae_config"]
    want = Path(p["vqvae"])
    for c in configs:
        # Only VQ-VAE configs are candidates (others may need a CUDA build to resolve).
        if tomllib.loads(c.read_text()).get("model", {}).get("architecture") != "vqvae":
            continue
        other = resolved_config(c)
        if other["model"]["architecture"] == "vqvae" and output_dir(other) == want:
            return c
    raise SystemExit(f"no config in configs/ trains the VQ-VAE at model.pixelcnn.vqvae = {want}")


# --- Report ------------------------------------------------------------------------------------

@dataclass
class Row:
    name: str
    arch: str
    params_ours: int
    cost: StepCost
    batch: int
    accum: int
    #: Non-gradient floats in the same all-reduce, by world size (VQ-VAE only).
    stats_floats: dict[int, int] | None = None


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g}"


def assumptions() -> str:
    r = compute_rate()
    links = "; ".join(f"{l.name}: busbw {l.busbw / 1e9:g} GB/s, alpha {l.alpha * 1e6:g} us" for l in INTERCONNECTS)
    return "\n".join([
        "## Data-parallel scaling, predicted (scripts/cost_model.py)",
        "",
        "Assumptions:",
        f"- compute rate R = MFU {MFU:.0%} x {PEAK_FLOPS:.3g} FLOP/s ({PEAK_LABEL}) = {r / 1e12:.1f} TFLOP/s per GPU;",
        "  each of N ranks computes F/N (per-rank batch = global batch / N).",
        "- not modelled (real efficiency lower): small per-rank batches reach a lower share of peak in",
        "  practice; steps of tens of microseconds (the small configs) are kernel-launch bound, a per-rank",
        "  cost that does not shrink with N. (Real efficiency higher): elementwise ops / optimizer are not",
        "  counted, so real compute is longer"
        + ("." if PEAK_FLOPS == FP32_PEAK_FLOPS else "; and difftrain computes in fp32 today, not BF16 (see --fp32)."),
        "- F = forward + backward FLOPs of one optimizer step over the global batch, counted by",
        "  torch.utils.flop_counter.FlopCounterMode (matmul, conv, attention) on a PyTorch twin; for",
        "  gated_pixelcnn it includes the frozen stage-1 encoder's forward that each step runs.",
        f"- gradients: fp32 ({GRAD_BYTES} B x P), all-reduced once per optimizer step with a ring, not overlapped",
        "  with compute: T_ring(N) = 2(N-1)/N x 4P / busbw + 2(N-1) x alpha.",
        f"- interconnects (nccl-tests order of magnitude): {links}.",
        "- efficiency(N) = T_1 / (N x T_N), T_1 = F/R, T_N = F/(N R) + T_ring(N)"
        + (f" + T_host, T_host = 2 x 4P / {HOST_COPY_BW / 1e9:g} GB/s (one process per GPU: the gradients"
           " cross the host around the NCCL call)." if HOST_COPIES else "."),
    ])


def params_table(rows: list[Row]) -> str:
    lines = ["| config | ours (train) | twin (PyTorch) | match |", "|---|---:|---:|---|"]
    for r in rows:
        ok = "yes" if r.params_ours == r.cost.params_twin else "**NO**"
        lines.append(f"| {r.name} | {r.params_ours:,} | {r.cost.params_twin:,} | {ok} |")
    return "\n".join(lines)


def scaling_table(rows: list[Row]) -> str:
    head = ["config", "architecture", "params", "global batch (batch x accum)", "GFLOP/step",
            "compute ms/step (1 GPU)", "all-reduce ms (N=8, NVLink)"]
    head += [f"{l.name} eff N={n}" for l in INTERCONNECTS for n in WORLD_SIZES]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for r in rows:
        f, grad_bytes = r.cost.flops, GRAD_BYTES * r.params_ours
        cells = [r.name, r.arch, f"{r.params_ours:,}", f"{r.batch * r.accum} ({r.batch} x {r.accum})",
                 f"{f / 1e9:.3g}", ms(f / compute_rate()), ms(ring_allreduce_seconds(grad_bytes, 8, NVLINK))]
        cells += [pct(efficiency(f, grad_bytes, n, l)) for l in INTERCONNECTS for n in WORLD_SIZES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def flag_line(r: Row) -> str:
    """Where the all-reduce takes longer than the per-rank compute, plus model caveats."""
    f, grad_bytes = r.cost.flops, GRAD_BYTES * r.params_ours
    parts = []
    for link in INTERCONNECTS:
        comm = lambda n: ring_allreduce_seconds(grad_bytes, n, link) + host_copy_seconds(grad_bytes, n)
        over = [n for n in WORLD_SIZES if comm(n) > f / (n * compute_rate())]
        if over:
            n = over[0]
            parts.append(f"{link.name}: comm > compute from N={n} ({ms(comm(n))} ms "
                         f"vs {ms(f / (n * compute_rate()))} ms)")
        else:
            parts.append(f"{link.name}: comm <= compute up to N={WORLD_SIZES[-1]}")
    parts.append(f"per-rank batch at N={WORLD_SIZES[-1]}: {r.batch // WORLD_SIZES[-1]}")
    if r.cost.extra_flops:
        label, extra = r.cost.extra_flops
        parts.append(f"F includes {label} {extra / 1e9:.3g} GFLOP ({extra / f:.1%})")
    if r.cost.zero_grad_params:
        z = r.cost.zero_grad_params
        parts.append(f"{z:,} of the params ({z / r.params_ours:.0%}) are masked-out kernel weights whose "
                     "always-zero gradients are all-reduced too")
    if r.stats_floats:
        # The same all-reduce also carries the loss, the presence flags and the VQ statistics.
        payload = {n: GRAD_BYTES * (r.params_ours + 1 + r.cost.param_tensors + r.stats_floats[n]) for n in WORLD_SIZES}
        ns = "/".join(str(n) for n in WORLD_SIZES)
        ratio = "/".join(f"{payload[n] / grad_bytes:.2f}x" for n in WORLD_SIZES)
        eff = {l.name: "/".join(pct(efficiency(f, payload[n], n, l)) for n in WORLD_SIZES) for l in INTERCONNECTS}
        parts.append(f"the real all-reduce also carries the VQ code counts and restart pool: payload {ratio} the "
                     f"gradients at N={ns}, eff " + ", ".join(f"{k} {v}" for k, v in eff.items()))
    return f"- **{r.name}**: " + "; ".join(parts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("configs", nargs="*", type=Path, help="default: configs/*.toml")
    ap.add_argument("--fp32", action="store_true",
                    help=f"compute at the FP32 peak ({FP32_PEAK_FLOPS:.3g} FLOP/s) instead of BF16")
    ap.add_argument("--processes", action="store_true",
                    help="a multi-process launch (one process per GPU, several machines): add the host "
                         "copies of the gradients and an InfiniBand interconnect")
    args = ap.parse_args()
    if args.processes:
        global HOST_COPIES, INTERCONNECTS
        HOST_COPIES, INTERCONNECTS = True, (NVLINK, PCIE, INFINIBAND)
    if args.fp32:
        global PEAK_FLOPS, PEAK_LABEL
        PEAK_FLOPS, PEAK_LABEL = FP32_PEAK_FLOPS, "FP32 without tensor cores, H100/H200 SXM"
    all_configs = sorted((REPO / "configs").glob("*.toml"))
    configs = [c.resolve() for c in args.configs] or all_configs
    for binary in ("train", "bench"):
        if not (BIN_DIR / binary).exists():
            raise SystemExit(f"{BIN_DIR / binary} not found: build with `cargo build --release` or set DIFFTRAIN_BIN_DIR")

    rows = []
    with tempfile.TemporaryDirectory(prefix="cost_model_") as tmp_name:
        tmp = Path(tmp_name)
        for config in configs:
            print(f"{config.name}: counting parameters and FLOPs", file=sys.stderr)
            cfg = resolved_config(config)
            overrides = tiny_run_overrides(cfg, tmp / config.stem)
            stage1 = None
            if cfg["model"]["architecture"] == "gated_pixelcnn":
                # Stage 2 needs stage-1 weights: train the stage-1 config for one step into tmp.
                s1_path = stage1_config(cfg, all_configs)
                stage1 = resolved_config(s1_path)
                s1_out = tmp / f"stage1_{config.stem}"
                train_one_step(s1_path, tiny_run_overrides(stage1, s1_out) | {"checkpoint.every_steps": 1})
                overrides["model.pixelcnn.vqvae"] = str(s1_out)
            ours = params_ours(config, overrides)
            cost = step_cost(cfg, tmp, config, stage1)
            print(f"  params: ours {ours:,}, twin {cost.params_twin:,}", file=sys.stderr)
            t = cfg["train"]
            stats = None
            if cfg["model"]["architecture"] == "vqvae":
                stats = {n: vqvae_stats_floats(cfg, n) for n in WORLD_SIZES}
            rows.append(Row(config.stem, cfg["model"]["architecture"], ours, cost,
                            t["batch_size"], t["gradient_accumulation_steps"], stats))

    print(assumptions())
    print("\nParameter counts (ours: the `train` binary's `model:` line; twin: the PyTorch model counted):\n")
    print(params_table(rows))
    print("\nPredicted scaling:\n")
    print(scaling_table(rows))
    print("\nWhere communication outgrows compute:\n")
    print("\n".join(flag_line(r) for r in rows))
    mismatched = [r.name for r in rows if r.params_ours != r.cost.params_twin]
    assert not mismatched, f"twin parameter counts differ from ours for: {', '.join(mismatched)}"


if __name__ == "__main__":
    main()
