//! `merge --base MODEL [--config-from FOLDER] --lora FILE[:SCALE]... --out FOLDER|FILE.safetensors`:
//! folds LoRA files (diffusers, PEFT or kohya layout) into a Stable Diffusion model at the given
//! scales and writes the result as a diffusers folder (diffusers and difftrain's `sample` load
//! it like the original) or, for an `--out` ending in `.safetensors`, as one original-layout
//! file (A1111, ComfyUI; SD 1.x models).

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use difftrain::device::parse_device;
use difftrain::io;
use difftrain::pipelines::lora::{apply_files, parse_lora_arg, write_folder};
use difftrain::pipelines::stable_diffusion::{self, Pretrained};

#[derive(Parser)]
#[command(version, about = "Fold LoRA files into a Stable Diffusion model")]
struct Args {
    /// The base model: a diffusers folder or a single `.safetensors` file.
    #[arg(long)]
    base: PathBuf,
    /// For a single-file base: a diffusers folder of the same model (tokenizer, configs).
    #[arg(long)]
    config_from: Option<PathBuf>,
    /// A LoRA file and its scale (default 1.0); repeat to fold in several.
    #[arg(long = "lora", value_name = "FILE[:SCALE]", required = true)]
    loras: Vec<String>,
    /// The diffusers folder to write, or a `.safetensors` file for one original-layout file.
    #[arg(long)]
    out: PathBuf,
}

fn run(args: Args) -> anyhow::Result<()> {
    let loras = args
        .loras
        .iter()
        .map(|a| parse_lora_arg(a).map_err(anyhow::Error::from))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // The output must not replace any input: not be one, contain one or lie inside one
    // (symlinks followed), since the inputs are read while the output is written.
    let mut inputs = vec![("--base", args.base.clone())];
    inputs.extend(
        args.config_from
            .iter()
            .map(|c| ("--config-from", c.clone())),
    );
    inputs.extend(loras.iter().map(|(f, _)| ("--lora", f.clone())));
    for (flag, input) in &inputs {
        let how = if io::resolved(&args.out) == io::resolved(input) {
            Some("is")
        } else if io::is_within(&args.out, input) {
            Some("is inside")
        } else if io::is_within(input, &args.out) {
            Some("contains")
        } else {
            None
        };
        if let Some(how) = how {
            anyhow::bail!(
                "--out {} {how} {flag} {}: merge never writes over its inputs; choose another \
                 --out",
                args.out.display(),
                input.display()
            );
        }
    }
    let device = parse_device("cpu")?;
    let source = Pretrained::detect(&args.base, args.config_from.as_deref())?;
    let configs = match &source {
        Pretrained::Folder(d) => d.clone(),
        Pretrained::SingleFile { configs, file } => configs.clone().with_context(|| {
            format!(
                "{} is a single file: give --config-from <diffusers folder>",
                file.display()
            )
        })?,
    };
    let single_file = args.out.extension().is_some_and(|e| e == "safetensors");
    let mut sd = stable_diffusion::load(&source, &device)?;
    apply_files(&mut sd, &loras)?;
    if single_file {
        stable_diffusion::write_single_file(&sd, &args.out)?;
    } else {
        write_folder(&sd, &configs, &args.out)?;
    }
    for (file, scale) in &loras {
        eprintln!("merged {} at scale {scale}", file.display());
    }
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

difftrain::global_allocator!();

fn main() -> std::process::ExitCode {
    tune_allocator();
    let args = Args::parse();
    difftrain::exit_code(difftrain::threads::on_pool(|| run(args)))
}
