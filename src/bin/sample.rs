//! `sample --checkpoint <dir> --num 64 --steps 50 --sampler ddim --seed 0 --out grid.png`

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Parser;
use difftrain::config::Config;
use difftrain::diffusion::sampling::SamplerKind;
use difftrain::io;
use difftrain::train::{
    EXPORT_CONFIG, build_model, checkpoint, export_weights_path, generate, grid_columns,
    make_device,
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
    /// Override the device the run used, e.g. `cpu`.
    #[arg(long)]
    device: Option<String>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Sampler {
    Ddpm,
    Ddim,
}

/// Where the config and weights are: a checkpoint directory (its EMA weights when present),
/// an export folder, or a run's output_dir (its `export/`, else the checkpoint `latest` names).
fn locate(dir: &Path) -> anyhow::Result<(PathBuf, Option<PathBuf>)> {
    let checkpoint_weights = |ck: &Path| -> anyhow::Result<(PathBuf, Option<PathBuf>)> {
        // Verify sizes and checksums before trusting the files.
        checkpoint::read_verified(ck)?;
        let ema = ck.join(checkpoint::EMA_FILE);
        let weights = if ema.is_file() {
            ema
        } else {
            ck.join(checkpoint::MODEL_FILE)
        };
        Ok((ck.to_path_buf(), Some(weights)))
    };
    if dir.join(checkpoint::STATE_FILE).is_file() {
        return checkpoint_weights(dir);
    }
    for candidate in [dir.to_path_buf(), dir.join("export")] {
        if candidate.join(EXPORT_CONFIG).is_file() {
            return Ok((candidate, None));
        }
    }
    if let Some((_, ck)) = checkpoint::read_latest(dir) {
        return checkpoint_weights(&ck);
    }
    bail!(
        "{} is neither a checkpoint, an export, nor a run directory with export/ or {}",
        dir.display(),
        checkpoint::LATEST
    )
}

fn run(args: Args) -> anyhow::Result<()> {
    let (dir, weights) = locate(&args.checkpoint)?;
    let mut overrides = Vec::new();
    if let Some(d) = &args.device {
        overrides.push(format!("run.device={d}"));
    }
    let cfg = Config::load(&dir.join(EXPORT_CONFIG), &overrides)?;
    let device = make_device(&cfg.run.device)?;
    let weights = weights.unwrap_or_else(|| export_weights_path(&cfg, &dir));
    let tensors = io::load_safetensors(&weights)?;
    let model = io::load_into(build_model(&cfg, &device), &tensors, &weights)?;
    if args.num == 0 {
        bail!("--num must be at least 1");
    }
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
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
