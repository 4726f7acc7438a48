//! `train --config configs/<name>.toml [--set section.key=value]... [--resume latest] [--check]`

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use difftrain::config::{Config, Resume};
use difftrain::pipelines;
use difftrain::train::TrainOptions;

#[derive(Parser)]
#[command(version, about = "Train a model described by a TOML config")]
struct Args {
    /// The run configuration (see configs/ and the README's config reference).
    #[arg(long)]
    config: PathBuf,
    /// Override one value, e.g. `--set train.max_steps=100` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    overrides: Vec<String>,
    /// Validate the config, print the resolved version, and exit without training.
    #[arg(long)]
    check: bool,
    /// Where to start: `latest` (the newest complete checkpoint of this run), a checkpoint
    /// directory, or `none`. Overrides `checkpoint.resume`.
    #[arg(long, value_name = "latest|PATH|none")]
    resume: Option<String>,
}

fn run(args: Args) -> anyhow::Result<()> {
    let mut cfg = Config::load(&args.config, &args.overrides)?;
    if let Some(r) = args.resume {
        cfg.checkpoint.resume = Resume::from(r);
    }
    // A torchrun/SLURM launch: this process is one rank, on cuda:LOCAL_RANK (or the CPU).
    let launch = difftrain::distributed::launch::from_env(|k| std::env::var(k).ok())?;
    let device = match &launch {
        Some(l) => l.device_for(&cfg.run.device, cfg.run.devices.as_ref())?,
        None => cfg.run.device.clone(),
    };
    // Before any compute (and before writing anything): the output folder must be writable
    // and the data must exist.
    // (`--check` writes nothing: it only asks whether the folder could be written.)
    let writable = match args.check {
        true => difftrain::io::check_writable(&cfg.output_dir()),
        false => difftrain::io::ensure_writable_dir(&cfg.output_dir()),
    };
    writable.with_context(|| format!("run.output_dir = {}", cfg.output_dir().display()))?;
    if !cfg.data.path.exists() {
        anyhow::bail!(
            "data.path = {} does not exist (see datasets/README.md)",
            cfg.data.path.display()
        );
    }
    // The devices exist (a clear error without a GPU, a driver or with a bad index).
    let request = match &launch {
        Some(_) => difftrain::device::DeviceRequest::parse(&device, None),
        None => cfg.device_request(),
    };
    let request = request?;
    difftrain::device::pin_default_device(&request);
    let (devices, _) = request.resolve()?;
    drop(devices);
    difftrain::memory::check_fits(
        cfg.step_memory_lower_bound(),
        &format!(
            "training these weights (with their gradients and AdamW's moments: at least {:.1} \
             GB) and a step at data.resolution = {} with train.batch_size = {}",
            cfg.trained_weights_lower_bound() as f64 / 1e9,
            cfg.data.resolution,
            cfg.train.batch_size
        ),
    )?;
    if args.check {
        print!("{}", cfg.to_toml());
        if let Some(l) = &launch {
            eprintln!(
                "launch ({}): rank {} of {}, device {device}, rank 0 at {}",
                l.source, l.rank, l.world, l.master
            );
        }
        eprintln!("{}: configuration is valid", args.config.display());
        return Ok(());
    }
    if let Some(l) = &launch {
        let timeout = std::time::Duration::from_secs_f64(cfg.run.sync_timeout_secs);
        let cuda = device.starts_with("cuda");
        let group = difftrain::distributed::launch::join(l, &cfg.to_toml(), timeout, cuda)?;
        if l.rank == 0 {
            eprintln!(
                "launch ({}): {} processes met at {}",
                l.source,
                group.world(),
                l.master
            );
        }
    }
    let opts = TrainOptions {
        overrides: args.overrides.clone(),
        ..TrainOptions::default()
    };
    let out = match pipelines::train(&cfg, &opts) {
        // Stopped by a signal after writing its checkpoint: not a failure of the run.
        Err(e) if e.stop_signal().is_some() => return Err(e.into()),
        r => r.with_context(|| format!("training run {:?} failed", cfg.run.name))?,
    };
    eprintln!(
        "trained steps {}..{} in {:.1} s, final loss {:.4}",
        out.first_step, out.steps, out.seconds, out.last_loss
    );
    if out.skipped_steps > 0 {
        eprintln!(
            "skipped {} step(s) with a non-finite loss or gradient",
            out.skipped_steps
        );
    }
    if let Some(p) = out.sample_grid {
        eprintln!("samples: {}", p.display());
    }
    if let Some(p) = out.export_dir {
        eprintln!("export:  {}", p.display());
    }
    Ok(())
}

difftrain::global_allocator!();

fn main() -> std::process::ExitCode {
    tune_allocator();
    difftrain::signals::install();
    // Tests only: an allocation the system refuses, to see how the process ends.
    if let Some(n) = std::env::var("DIFFTRAIN_TEST_ALLOCATE")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        std::hint::black_box(Vec::<u8>::with_capacity(n));
    }
    let args = Args::parse();
    difftrain::exit_code(difftrain::run_guarded(|| {
        difftrain::threads::on_pool(|| run(args))
    }))
}
