//! `bench --config configs/bench_<case>.toml [--set k=v]... [--warmup 3] [--steps 10]`
//!
//! Measures training throughput of one config's model on synthetic data: noise and timestep
//! draws, forward, loss, backward, gradient clipping and the AdamW step, exactly as `train`
//! does them, over `--steps` optimizer steps after `--warmup` untimed ones. Prints one JSON line
//! (`scripts/bench.sh` pairs it with `scripts/bench_torch.py`). Data loading is excluded on both
//! sides. `--diffusers-config FILE` writes the diffusers config for the PyTorch twin.
//!
//! A `latent_diffusion` config (with `--latent N`) measures its conditional U-Net alone, on
//! random latents and a random text context (`run_ldm_unet`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::bail;
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::FloatDType;
use clap::Parser;
use difftrain::config::Config;
use difftrain::config::TrainConfig;
use difftrain::data::Batch;
use difftrain::device::parse_device;
use difftrain::diffusion::training::{NoiseDraw, diffusion_loss};
use difftrain::models::Architecture;
use difftrain::optim::grad;
use difftrain::train::Objective;
use difftrain::train::objective::split_grads;
use difftrain::train::objectives::diffusion::DiffusionObjective;
use difftrain::train::run::adamw;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Parser)]
#[command(about = "Training-step throughput of a config's model (synthetic data)")]
struct Args {
    #[arg(long)]
    config: PathBuf,
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    overrides: Vec<String>,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Compute each batch as this many slices on replica threads (`train.batch_split`).
    #[arg(long, default_value_t = 1)]
    split: usize,
    /// Write the model's diffusers config.json here (`UNet2DModel` for unet_2d,
    /// `UNet2DConditionModel` for latent_diffusion) and exit.
    #[arg(long)]
    diffusers_config: Option<PathBuf>,
    /// latent_diffusion: the latents' height and width (the data's resolution over the first
    /// stage's downsampling factor; 8 for configs/ldm_quickstart.toml).
    #[arg(long)]
    latent: Option<usize>,
}

/// Peak resident memory of this process (Linux `VmHWM`), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The timed steps' wall times and each phase's seconds summed over them.
struct Measured {
    timed: Vec<f64>,
    /// Noise, forward and loss read back; backward; clipping; the AdamW step.
    phases: [f64; 4],
}

/// Runs `args.warmup + args.steps` training steps of `model`: `grads` does the forward (reading
/// the loss back, as `train` does every step) and the backward and returns the seconds its
/// forward took, then global-norm clipping and AdamW, timing the steps after the warmup. burn's
/// CPU backend runs eagerly, so the clock between phases measures them.
fn measure<M: Module>(
    mut model: M,
    t: &TrainConfig,
    args: &Args,
    mut grads: impl FnMut(&M, Instant) -> (f64, GradientsParams),
) -> (M, Measured) {
    let mut optim = adamw(t);
    let mut m = Measured {
        timed: Vec::with_capacity(args.steps),
        phases: [0.0; 4],
    };
    for i in 0..args.warmup + args.steps {
        let start = Instant::now();
        let (t_forward, mut g) = grads(&model, start);
        let t_backward = start.elapsed().as_secs_f64();
        grad::clip_global_norm(&model, &mut g, t.max_grad_norm);
        let t_clip = start.elapsed().as_secs_f64();
        model = optim.step(t.learning_rate, model, g);
        difftrain::memory::iteration();
        let t_step = start.elapsed().as_secs_f64();
        if i >= args.warmup {
            m.timed.push(t_step);
            let parts = [
                t_forward,
                t_backward - t_forward,
                t_clip - t_backward,
                t_step - t_clip,
            ];
            for (p, v) in m.phases.iter_mut().zip(parts) {
                *p += v;
            }
        }
    }
    (model, m)
}

fn run(args: Args) -> anyhow::Result<()> {
    let cfg = Config::load(&args.config, &args.overrides)?;
    if cfg.model.architecture == Architecture::LatentDiffusion {
        return run_ldm_unet(&args, &cfg);
    }
    if !cfg.model.architecture.is_diffusion() {
        bail!(
            "bench measures the diffusion denoisers (unet_2d, tutorial_unet) and latent \
             diffusion's conditional U-Net (latent_diffusion)"
        );
    }
    if let Some(path) = &args.diffusers_config {
        if cfg.model.architecture != Architecture::Unet2d {
            bail!(
                "--diffusers-config needs model.architecture = \"unet_2d\" or \"latent_diffusion\""
            );
        }
        let json = serde_json::to_string_pretty(&cfg.model.unet.to_diffusers_json())?;
        std::fs::write(path, json)?;
        return Ok(());
    }
    let device = parse_device(&cfg.run.device)?.autodiff();
    let mut objective = DiffusionObjective::new(&cfg);
    difftrain::nn::seed_init(cfg.run.seed);
    let model = objective.build(&device)?;
    let t = &cfg.train;
    let res = cfg.data.resolution;
    let shape = [t.batch_size, cfg.image_channels(), res, res];
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.run.seed);
    let batch = Batch {
        images: uniform(&mut rng, shape.iter().product()),
        shape,
        captions: vec![None; shape[0]],
        labels: vec![None; shape[0]],
        indices: (0..shape[0]).collect(),
        flipped: vec![false; shape[0]],
        offset: 0,
        global_size: shape[0],
    };
    let (model, m) = measure(model, t, &args, |model, start| {
        if args.split > 1 {
            let (grads, _) = split_grads(
                &objective, model, &batch, args.split, 1.0, &mut rng, &device,
            );
            (0.0, grads)
        } else {
            let loss = objective.loss(model, &batch, &mut rng, &device);
            let _ = loss.clone().into_scalar::<f32>();
            let t_forward = start.elapsed().as_secs_f64();
            (
                t_forward,
                GradientsParams::from_grads(loss.backward(), model),
            )
        }
    });
    report(&args, &cfg, model.num_params(), shape, m);
    Ok(())
}

/// Latent diffusion's stage 2 without its frozen parts: the config's `UNet2DConditionModel`
/// on random `[batch, in_channels, --latent, --latent]` latents with a random context `[batch,
/// conditioning.max_length, cross_attention_dim]` (fixed, standing in for the text encoder's
/// output), the config's diffusion loss. The first stage and the text encoder are left out on
/// both sides, so the figure is the U-Net's.
fn run_ldm_unet(args: &Args, cfg: &Config) -> anyhow::Result<()> {
    let backbone = cfg.model.ldm.backbone_config(&cfg.model.conditioning);
    let Some(unet_cfg) = backbone.as_unet().cloned() else {
        bail!("the latent_diffusion bench measures U-Net backbones");
    };
    if let Some(path) = &args.diffusers_config {
        let json = serde_json::to_string_pretty(&unet_cfg.to_diffusers_json())?;
        std::fs::write(path, json)?;
        return Ok(());
    }
    let Some(latent) = args.latent else {
        bail!("a latent_diffusion config needs --latent (the latents' height and width)");
    };
    if args.split > 1 {
        bail!("--split measures unet_2d and tutorial_unet only");
    }
    let device = parse_device(&cfg.run.device)?.autodiff();
    difftrain::nn::seed_init(cfg.run.seed);
    let unet = unet_cfg.init(&device);
    let t = &cfg.train;
    let shape = [t.batch_size, unet_cfg.in_channels, latent, latent];
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.run.seed);
    let z = uniform(&mut rng, shape.iter().product());
    let context_shape = [
        t.batch_size,
        cfg.model.conditioning.max_length,
        unet_cfg.cross_attention_dim,
    ];
    let context = Tensor::<3>::from_data(
        TensorData::new(
            uniform(&mut rng, context_shape.iter().product()),
            context_shape,
        ),
        &device,
    );
    let schedule = cfg.diffusion.schedule();
    let (unet, m) = measure(unet, t, args, |unet, start| {
        let draw = NoiseDraw::for_slice(&cfg.diffusion, &schedule, shape, 0, shape[0], &mut rng);
        let loss = diffusion_loss(&z, shape, draw, FloatDType::F32, &device, |x, ts| {
            unet.forward(x, ts, &context, None)
        });
        let _ = loss.clone().into_scalar::<f32>();
        let t_forward = start.elapsed().as_secs_f64();
        (
            t_forward,
            GradientsParams::from_grads(loss.backward(), unet),
        )
    });
    report(args, cfg, unet.num_params(), shape, m);
    Ok(())
}

/// `n` values uniform in [-1, 1).
fn uniform(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Prints the JSON line `scripts/bench.sh` reads.
fn report(args: &Args, cfg: &Config, params: usize, shape: [usize; 4], m: Measured) {
    let Measured { mut timed, phases } = m;
    let total: f64 = phases.iter().sum();
    let share = |i: usize| (phases[i] / total * 1000.0).round() / 10.0;
    timed.sort_by(f64::total_cmp);
    let median = timed[timed.len() / 2];
    let mean = timed.iter().sum::<f64>() / timed.len() as f64;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let batch = cfg.train.batch_size;
    println!(
        "{}",
        serde_json::json!({
            "impl": "burn-flex",
            "config": args.config.display().to_string(),
            "params": params,
            "batch": batch,
            "shape": shape,
            "steps": args.steps,
            "median_ms": median * 1e3,
            "mean_ms": mean * 1e3,
            "images_per_sec": batch as f64 / median,
            "peak_rss_mib": peak_rss_mib(),
            "threads": threads,
            "phase_percent": {
                "noise_forward_loss": share(0),
                "backward": share(1),
                "clip": share(2),
                "optimizer": share(3),
            },
        })
    );
}

difftrain::global_allocator!();

fn main() -> std::process::ExitCode {
    tune_allocator();
    let args = Args::parse();
    difftrain::exit_code(difftrain::threads::on_pool(|| run(args)))
}
