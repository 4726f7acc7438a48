//! `bench --config configs/bench_<case>.toml [--set k=v]... [--warmup 3] [--steps 10]`
//!
//! Measures training throughput of one config's model on synthetic data: noise and timestep
//! draws, forward, loss, backward, gradient clipping and the AdamW step, exactly as `train`
//! does them, over `--steps` optimizer steps after `--warmup` untimed ones. Prints one JSON line
//! (`scripts/bench.sh` pairs it with `scripts/bench_torch.py`). Data loading is excluded on both
//! sides. `--diffusers-config FILE` writes the UNet2DModel config for the PyTorch twin.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::bail;
use burn::module::Module;
use burn::optim::GradientsParams;
use clap::Parser;
use difftrain::config::Config;
use difftrain::data::Batch;
use difftrain::device::parse_device;
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
    /// Write the model's diffusers UNet2DModel config.json here (unet_2d only) and exit.
    #[arg(long)]
    diffusers_config: Option<PathBuf>,
}

/// Peak resident memory of this process (Linux `VmHWM`), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn run(args: Args) -> anyhow::Result<()> {
    let cfg = Config::load(&args.config, &args.overrides)?;
    if !cfg.model.architecture.is_diffusion() {
        bail!("bench measures the diffusion denoisers (unet_2d, tutorial_unet)");
    }
    if let Some(path) = args.diffusers_config {
        if cfg.model.architecture != Architecture::Unet2d {
            bail!("--diffusers-config needs model.architecture = \"unet_2d\"");
        }
        let json = serde_json::to_string_pretty(&cfg.model.unet.to_diffusers_json())?;
        std::fs::write(&path, json)?;
        return Ok(());
    }
    let device = parse_device(&cfg.run.device)?.autodiff();
    let mut objective = DiffusionObjective::new(&cfg);
    difftrain::nn::seed_init(cfg.run.seed);
    let mut model = objective.build(&device)?;
    let t = &cfg.train;
    let mut optim = adamw(t);
    let res = cfg.data.resolution;
    let shape = [t.batch_size, cfg.image_channels(), res, res];
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.run.seed);
    let images: Vec<f32> = (0..shape.iter().product::<usize>())
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let batch = Batch {
        images,
        shape,
        captions: vec![None; shape[0]],
        labels: vec![None; shape[0]],
        indices: (0..shape[0]).collect(),
        flipped: vec![false; shape[0]],
        offset: 0,
        global_size: shape[0],
    };
    let mut timed = Vec::with_capacity(args.steps);
    // Seconds in each phase over the timed steps (burn's CPU backend runs eagerly, so the
    // clock between phases measures them).
    let mut phases = [0.0f64; 4];
    for i in 0..args.warmup + args.steps {
        let start = Instant::now();
        let (t_forward, mut grads) = if args.split > 1 {
            let (grads, _) = split_grads(
                &objective, &model, &batch, args.split, 1.0, &mut rng, &device,
            );
            (0.0, grads)
        } else {
            let loss = objective.loss(&model, &batch, &mut rng, &device);
            // `train` reads the loss back every step too.
            let _ = loss.clone().into_scalar::<f32>();
            let t_forward = start.elapsed().as_secs_f64();
            (
                t_forward,
                GradientsParams::from_grads(loss.backward(), &model),
            )
        };
        let t_backward = start.elapsed().as_secs_f64();
        grad::clip_global_norm(&model, &mut grads, t.max_grad_norm);
        let t_clip = start.elapsed().as_secs_f64();
        model = optim.step(t.learning_rate, model, grads);
        let t_step = start.elapsed().as_secs_f64();
        if i >= args.warmup {
            timed.push(t_step);
            for (p, v) in phases.iter_mut().zip([
                t_forward,
                t_backward - t_forward,
                t_clip - t_backward,
                t_step - t_clip,
            ]) {
                *p += v;
            }
        }
    }
    let total: f64 = phases.iter().sum();
    let share = |i: usize| (phases[i] / total * 1000.0).round() / 10.0;
    timed.sort_by(f64::total_cmp);
    let median = timed[timed.len() / 2];
    let mean = timed.iter().sum::<f64>() / timed.len() as f64;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "{}",
        serde_json::json!({
            "impl": "burn-flex",
            "config": args.config.display().to_string(),
            "params": model.num_params(),
            "batch": t.batch_size,
            "shape": shape,
            "steps": args.steps,
            "median_ms": median * 1e3,
            "mean_ms": mean * 1e3,
            "images_per_sec": t.batch_size as f64 / median,
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
    Ok(())
}

difftrain::global_allocator!();

fn main() -> std::process::ExitCode {
    tune_allocator();
    difftrain::exit_code(run(Args::parse()))
}
