//! `sample --checkpoint <run | export | checkpoint | SD folder | SD .safetensors> [options]`
//!
//! Diffusion runs sample with the run's sampler (or `--sampler`); PixelCNN priors sample code
//! maps (`--temperature`) and decode them with their VQ-VAE; Stable Diffusion models (a
//! diffusers folder, or a single file with `--config-from <folder>`) generate from `--prompt`
//! with classifier-free guidance, as do text-conditioned latent diffusion runs (`--prompt`) and
//! class-conditioned ones (`--class`). `pipelines::sample` decides per model.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use difftrain::diffusion::sampling::SamplerKind;
use difftrain::io;
use difftrain::pipelines::{self, SampleRequest};

#[derive(Parser)]
#[command(
    version,
    about = "Sample images from trained weights or a Stable Diffusion model"
)]
struct Args {
    /// A run's output_dir (its export, else its latest checkpoint), an export folder, a
    /// checkpoint directory (EMA weights when it has them), a diffusers Stable Diffusion folder,
    /// or a single-file Stable Diffusion checkpoint (.safetensors).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Number of images (default 16 for runs, 1 for Stable Diffusion models).
    #[arg(long)]
    num: Option<usize>,
    /// Inference steps (default: the run's sample.num_inference_steps; 50 for Stable Diffusion).
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long, value_enum)]
    sampler: Option<Sampler>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A .png path writes one grid; any other path is a folder for one PNG per image.
    #[arg(long, default_value = "grid.png")]
    out: PathBuf,
    /// PixelCNN priors: divide logits by this (default: the run's sample.temperature).
    #[arg(long)]
    temperature: Option<f64>,
    /// Override the device (`cpu`, `cuda:0`, ...).
    #[arg(long)]
    device: Option<String>,
    /// Text-to-image: the prompt.
    #[arg(long)]
    prompt: Option<String>,
    /// Text-to-image: what to steer away from (the unconditional branch of guidance).
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Classifier-free guidance scale (default: the run's sample.guidance_scale, 7.5 for Stable
    /// Diffusion models; 1 turns guidance off).
    #[arg(long)]
    guidance_scale: Option<f64>,
    /// A1111/kohya's "clip skip": 1 = the text encoder's last layer, 2 = the one before.
    #[arg(long)]
    clip_skip: Option<usize>,
    /// Image size (default: the U-Net's sample_size times the VAE factor).
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    /// Initial latents: a safetensors file with one f32 tensor `latents` of shape
    /// [num, channels, height/f, width/f] (diffusers' `latents=`), to reproduce an image exactly.
    #[arg(long)]
    latents: Option<PathBuf>,
    /// For a single-file checkpoint: the diffusers folder of the same model to take its
    /// tokenizer, configs and scheduler from.
    #[arg(long)]
    config_from: Option<PathBuf>,
    /// Class-conditioned latent diffusion: the class to generate (0..num_classes).
    #[arg(long)]
    class: Option<usize>,
    /// Text-to-image: fold a LoRA file in (diffusers, PEFT or kohya layout) at SCALE (default
    /// 1.0); repeat to mix several.
    #[arg(long = "lora", value_name = "FILE[:SCALE]")]
    loras: Vec<String>,
    /// Images generated at once (default 64); `--num` above it runs in batches. Image i always
    /// draws from its own stream of `--seed`, so batches do not change the images.
    #[arg(long)]
    batch_size: Option<usize>,
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
        prompt: args.prompt,
        negative_prompt: args.negative_prompt,
        guidance_scale: args.guidance_scale,
        clip_skip: args.clip_skip,
        width: args.width,
        height: args.height,
        latents: args.latents,
        config_from: args.config_from,
        class: args.class,
        batch_size: args.batch_size,
        loras: args
            .loras
            .iter()
            .map(|a| pipelines::lora::parse_lora_arg(a).map_err(anyhow::Error::from))
            .collect::<anyhow::Result<_>>()?,
    };
    // Refused before generating: a grid is PNG, anything else is a folder of PNGs.
    let ext = args
        .out
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    if let Some(e) = ext.as_deref()
        && e != "png"
        && ["jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff"].contains(&e)
    {
        anyhow::bail!(
            "--out {}: sample writes PNG only; name a .png file for a grid, or a folder for one \
             PNG per image",
            args.out.display()
        );
    }
    // An --out that cannot be written is found before anything is generated.
    let grid_file = args.out.extension().is_some_and(|e| e == "png");
    let folder = match grid_file {
        true => args.out.parent().filter(|p| !p.as_os_str().is_empty()),
        false => Some(args.out.as_path()),
    };
    if let Some(folder) = folder {
        io::check_writable(folder)
            .with_context(|| format!("--out {} cannot be written", args.out.display()))?;
    }
    let (n, weights) = if grid_file {
        let (grid, weights) = pipelines::sample(&args.checkpoint, &request)?;
        // One image is written as that image, a grid with a border otherwise.
        if grid.shape[0] == 1 {
            io::image::save_image(&grid, &args.out)
        } else {
            io::image::save_grid(&grid, &args.out).map(|_| ())
        }
        .with_context(|| format!("writing {}", args.out.display()))?;
        (grid.shape[0], weights)
    } else {
        // A folder: each batch is written as it is made (nothing is held for the end).
        let mut n = 0;
        let out = args.out.clone();
        let weights =
            pipelines::sample_batches(&args.checkpoint, &request, false, |grid, first| {
                n += grid.shape[0];
                io::image::save_images(&grid, &out, first)?;
                Ok(())
            })?;
        (n, weights)
    };
    eprintln!(
        "wrote {n} samples from {} to {}",
        weights.display(),
        args.out.display()
    );
    Ok(())
}

difftrain::global_allocator!();

fn main() -> std::process::ExitCode {
    tune_allocator();
    let args = Args::parse();
    difftrain::exit_code(difftrain::run_guarded(|| {
        difftrain::threads::on_pool(|| run(args))
    }))
}
