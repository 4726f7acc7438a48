//! `sample --checkpoint <dir> --num 64 --steps 50 --sampler ddim --seed 0 --out grid.png`
//!
//! Diffusion runs sample with DDPM/DDIM; PixelCNN priors sample code maps (`--temperature`)
//! and decode them with their VQ-VAE (`pipelines::sample` decides per family).

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use difftrain::diffusion::sampling::SamplerKind;
use difftrain::io;
use difftrain::pipelines::{self, SampleRequest};

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
    Euler,
    #[value(name = "euler_ancestral", alias = "euler-a")]
    EulerAncestral,
    #[value(name = "dpmpp_2m", alias = "dpm++2m")]
    Dpmpp2m,
}

fn run(args: Args) -> anyhow::Result<()> {
    let request = SampleRequest {
        num: args.num,
        steps: args.steps,
        sampler: args.sampler.map(|s| match s {
            Sampler::Ddpm => SamplerKind::Ddpm,
            Sampler::Ddim => SamplerKind::Ddim,
            Sampler::Euler => SamplerKind::Euler,
            Sampler::EulerAncestral => SamplerKind::EulerAncestral,
            Sampler::Dpmpp2m => SamplerKind::DpmSolverPP2M,
        }),
        seed: args.seed,
        temperature: args.temperature,
        device: args.device,
    };
    let (grid, weights) = pipelines::sample(&args.checkpoint, &request)?;
    io::image::save_grid(&grid, &args.out)
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
