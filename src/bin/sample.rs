//! `sample --checkpoint <dir> --num 64 --steps 50 --sampler ddim --seed 0 --out grid.png`
//!
//! Diffusion runs sample with DDPM/DDIM; PixelCNN priors sample code maps (`--temperature`)
//! and decode them with their VQ-VAE.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Parser;
use difftrain::config::Config;
use difftrain::diffusion::sampling::SamplerKind;
use difftrain::io;
use difftrain::models::Architecture;
use difftrain::train::objectives::{load_stage1, sample_images};
use difftrain::train::{
    EXPORT_CONFIG, build_model, generate, grid_columns, load_weights, locate, make_device,
};

#[derive(Parser)]
#[command(version, about = "Sample images from trained weights")]
struct Args {
    /// A checkpoint directory (EMA weights when it has them), an export folder, or a run's
    /// output_dir (its export, else its latest checkpoint).
    #[arg(long)]
    checkpoint: PathBuf,
    #[arg(long, default_value_t = 16)]
    num: usize,
    /// Inference steps (default: the run's sample.num_inference_steps).
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long, value_enum)]
    sampler: Option<Sampler>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value = "grid.png")]
    out: PathBuf,
    /// PixelCNN priors: divide logits by this (default: the run's sample.temperature).
    #[arg(long)]
    temperature: Option<f64>,
    /// Override the device the run used, e.g. `cpu`.
    #[arg(long)]
    device: Option<String>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Sampler {
    Ddpm,
    Ddim,
}

fn run(args: Args) -> anyhow::Result<()> {
    if args.num == 0 {
        bail!("--num must be at least 1");
    }
    let mut overrides = Vec::new();
    if let Some(d) = &args.device {
        overrides.push(format!("run.device={d}"));
    }
    // Located (and a checkpoint verified) once; the config decides how to load the weights.
    let (root, weights) = locate(&args.checkpoint)?;
    let cfg = Config::load(&root.join(EXPORT_CONFIG), &overrides)?;
    let device = make_device(&cfg.run.device)?;
    let (images, shape, weights) = match cfg.model.architecture {
        arch if arch.is_diffusion() => {
            let (model, weights) = load_weights(&cfg, &root, weights, |c| build_model(c, &device))?;
            let sampler = args.sampler.map(|s| match s {
                Sampler::Ddpm => SamplerKind::Ddpm,
                Sampler::Ddim => SamplerKind::Ddim,
            });
            if let Some(steps) = args.steps
                && (steps == 0 || steps > cfg.diffusion.num_train_timesteps)
            {
                bail!(
                    "--steps {steps} must be in 1..={}",
                    cfg.diffusion.num_train_timesteps
                );
            }
            let (images, shape) = generate(
                &model, &cfg, &device, args.num, args.steps, sampler, args.seed,
            );
            (images, shape, weights)
        }
        Architecture::GatedPixelcnn => {
            let stage1 = load_stage1(&cfg, Some(&root), &device)?;
            let k = stage1.cfg.model.vqvae.num_embeddings;
            let (prior, weights) =
                load_weights(&cfg, &root, weights, |c| c.model.pixelcnn.init(k, &device))?;
            let temperature = args.temperature.unwrap_or(cfg.sample.temperature);
            if !(temperature > 0.0) {
                bail!("--temperature {temperature} must be positive");
            }
            let res = cfg.data.resolution;
            let images = sample_images(
                &prior,
                &stage1.model,
                res / 4,
                args.num,
                temperature,
                args.seed,
                &device,
            );
            (images, [args.num, cfg.image_channels(), res, res], weights)
        }
        Architecture::Vqvae => bail!(
            "{} is a VQ-VAE (stage 1): it reconstructs but does not sample on its own. Train a \
             PixelCNN prior on it (configs/pixelcnn_quickstart.toml) and sample from that run",
            args.checkpoint.display()
        ),
        other => bail!("sampling is not built for {other:?}"),
    };
    io::save_grid(&images, shape, grid_columns(args.num), &args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!(
        "wrote {} samples from {} to {}",
        args.num,
        weights.display(),
        args.out.display()
    );
    Ok(())
}

fn main() -> std::process::ExitCode {
    difftrain::tune_allocator();
    difftrain::exit_code(run(Args::parse()))
}
