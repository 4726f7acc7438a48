//! The training loop: data -> loss -> accumulated gradients -> (all-reduce) -> clip -> AdamW
//! step -> EMA -> log/sample/checkpoint.
//!
//! Read it top to bottom in [`train_with`] and [`run_rank`]. One "step" is one optimizer step
//! everywhere (progress, LR schedule, logging, `max_steps`); it consumes
//! `gradient_accumulation_steps` micro-batches whose gradients are summed locally (each loss
//! scaled by 1/N) before the single update. A family plugs in through an [`Objective`] (model
//! and loss, `objectives/`) and [`Outputs`] (grids and export, implemented in `pipelines`).

pub mod objective;
pub mod objectives;
pub mod progress;
pub mod run;
mod sync;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use burn::module::Module;
use burn::optim::GradientsAccumulator;
use burn::prelude::*;

use crate::checkpoint;
use crate::config::{Config, OnNonFinite};
use crate::data::{Dataset, Loader};
use crate::device::DeviceError;
use crate::distributed;
use crate::io;
use crate::optim::grad;
use crate::optim::lr::LrScheduler;
use crate::optim::precision::ScalerStep;
use crate::tensorboard::{EventError, EventWriter};
use objective::write_samples;
pub use objective::{Objective, Outputs};
use progress::{Progress, StepReport};
use run::RunState;
use sync::all_reduce_step;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Io(#[from] io::IoError),
    #[error(
        "non-finite {what} ({value}) at step {step}; the weights were not updated. \
         Lower train.learning_rate or set train.on_nonfinite = \"skip\" to skip such steps"
    )]
    NonFinite {
        what: &'static str,
        value: f64,
        step: usize,
    },
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    #[error("cannot resume from {dir}: {why}")]
    Resume { dir: PathBuf, why: String },
    #[error("cannot resume from {dir}: {why}")]
    Undecodable { dir: PathBuf, why: String },
    #[error(
        "{dir} already holds checkpoints (newest: {newest}) and checkpoint.resume = \"none\". \
         Continue them with `--resume latest` (or checkpoint.resume = \"latest\"), or choose \
         another run.output_dir, or delete the old run"
    )]
    ExistingCheckpoints { dir: PathBuf, newest: PathBuf },
    #[error(transparent)]
    Events(#[from] EventError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(
        "{0} is neither a checkpoint, an export, nor a run directory with export/ or a latest checkpoint"
    )]
    NotARun(PathBuf),
    /// A step of a family's pipeline failed (loading a pretrained model or a first stage,
    /// drawing a sample grid): what was being done, and why (the source).
    #[error("{context}")]
    Stage {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// Settings that cannot work together, found while assembling a stage (the model and
    /// the data, a first stage and the backbone).
    #[error("{0}")]
    Incompatible(String),
    #[error(transparent)]
    Lora(#[from] crate::lora::LoraError),
    #[error(transparent)]
    Architecture(#[from] crate::models::NotADenoiser),
    #[error(transparent)]
    Sync(#[from] crate::distributed::SyncError),
    #[error("rank {rank} panicked: {message}")]
    RankPanicked { rank: usize, message: String },
    #[error(
        "stopped by {} after step {step}{}; continue with `--resume latest`",
        crate::signals::name(*signal),
        checkpoint.as_ref().map(|c| format!(" ({} written)", c.display())).unwrap_or_default()
    )]
    Interrupted {
        signal: i32,
        step: usize,
        checkpoint: Option<PathBuf>,
    },
    #[error(
        "{skipped} consecutive steps up to step {step} had a non-finite loss or gradient and were \
         skipped (train.max_consecutive_skips = {limit}); the run is diverging. Lower \
         train.learning_rate, or resume from an earlier checkpoint"
    )]
    TooManySkips {
        skipped: usize,
        step: usize,
        limit: usize,
    },
}

impl TrainError {
    /// A [`TrainError::Stage`]: `context` says what was being done, `source` why it failed.
    pub fn stage(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        Self::Stage {
            context: context.into(),
            source: source.into(),
        }
    }
}

/// `export/export.json`: `{"step": N}`, the optimizer step the export's weights are from.
pub const EXPORT_STEP_FILE: &str = "export.json";

pub struct TrainOptions {
    /// Write checkpoints, logs, samples and the export (tests that only compare weights turn
    /// it off).
    pub write_outputs: bool,
    pub quiet: bool,
    /// Tests only: make the gradients of this optimizer step non-finite (an fp16 overflow).
    pub overflow_at_step: Option<usize>,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            write_outputs: true,
            quiet: false,
            overflow_at_step: None,
        }
    }
}

/// What a finished run reports, whatever the model family.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// The step the run started from (0, or the resumed checkpoint's step).
    pub first_step: usize,
    pub steps: usize,
    pub last_loss: f64,
    /// The loss of every step this run took (after `first_step`), averaged over ranks.
    pub losses: Vec<f64>,
    pub skipped_steps: usize,
    /// The fp16 loss scaler's scale at the end (`None` unless `train.mixed_precision = "fp16"`).
    pub loss_scale: Option<f64>,
    pub bad_images: usize,
    pub sample_grid: Option<PathBuf>,
    pub export_dir: Option<PathBuf>,
    pub seconds: f64,
    /// Data-parallel replicas the run used (1 without data parallelism).
    pub world_size: usize,
    /// Gradient all-reduces rank 0 took part in (0 on one device).
    pub all_reduces: usize,
}

pub struct TrainOutcome<M> {
    /// The trained weights, off the autodiff graph.
    pub model: M,
    /// The EMA weights, when `ema.enabled`.
    pub ema: Option<M>,
    pub summary: RunSummary,
    /// With data parallelism: the final weights of ranks 1.. (equal to `model`, which is rank
    /// 0's; kept so tests can check it).
    pub replicas: Vec<M>,
}

/// What to do with a step whose loss or gradient norm is not finite.
pub fn check_finite(
    step: usize,
    loss: f64,
    grad_norm: f64,
    policy: OnNonFinite,
) -> Result<bool, TrainError> {
    let bad = [("loss", loss), ("gradient norm", grad_norm)]
        .into_iter()
        .find(|(_, v)| !v.is_finite());
    match (bad, policy) {
        (None, _) => Ok(true),
        (Some(_), OnNonFinite::Skip) => Ok(false),
        (Some((what, value)), OnNonFinite::Error) => {
            Err(TrainError::NonFinite { what, value, step })
        }
    }
}

/// The devices of the run, resolved (`run.devices = "all"` asks CUDA how many there are), and
/// whether they are CUDA devices (so the ranks meet over NCCL).
pub fn run_devices(cfg: &Config) -> Result<(Vec<Device>, bool), TrainError> {
    let request = cfg.device_request()?;
    Ok(request.resolve()?)
}

/// Running means between two TensorBoard scalar writes.
#[derive(Default)]
struct Window {
    steps: usize,
    loss: f64,
    seconds: f64,
    images: f64,
}

/// What every rank of a run shares.
struct RunContext<'a> {
    cfg: &'a Config,
    opts: &'a TrainOptions,
    out: PathBuf,
    dataset: Arc<Dataset>,
    started: Instant,
}

/// The shared training loop. Resolves where to start and opens the data once, builds one
/// replica per device of `run.devices`, then runs [`run_rank`] for each (on its own thread when
/// there are several) and returns rank 0's outcome. Rank 0 alone holds `outputs`.
///
/// In a multi-process launch (`distributed::launch`) this process is one rank: rank 0 locks
/// the output folder and settles where the run starts before the others look, every rank
/// checks at a barrier that all start from the same step, and all wait at the end for rank
/// 0's final writes (the next stage of a chained config reads them).
pub fn train_with<O, P>(
    cfg: &Config,
    opts: &TrainOptions,
    objective: O,
    outputs: P,
) -> Result<TrainOutcome<O::Model>, TrainError>
where
    O: Objective + Clone + Send,
    O::Model: Send,
    P: Outputs<O::Model> + Send,
{
    let Some(process) = distributed::launch::current() else {
        return train_ranks(cfg, opts, objective, outputs, None);
    };
    // (A failure reaches the other processes from `pipelines::train`, which also covers the
    // work before the loop.)
    let outcome = train_ranks(cfg, opts, objective, outputs, Some(process.clone()))?;
    process
        .barrier("the end of the run (rank 0 writes the final samples and export)")
        .map_err(TrainError::Sync)?;
    Ok(outcome)
}

fn train_ranks<O, P>(
    cfg: &Config,
    opts: &TrainOptions,
    objective: O,
    mut outputs: P,
    process: Option<Arc<distributed::ProcessGroup>>,
) -> Result<TrainOutcome<O::Model>, TrainError>
where
    O: Objective + Clone + Send,
    O::Model: Send,
    P: Outputs<O::Model> + Send,
{
    let started = Instant::now();
    let (devices, nccl) = run_devices(cfg)?;
    let out = cfg.output_dir();
    // This process's first global rank (0 unless it is a later process of a launch).
    let first_rank = process.as_ref().map_or(0, |p| p.rank());
    let writes = opts.write_outputs && first_rank == 0;
    let barrier = |what: &str| -> Result<(), TrainError> {
        match &process {
            Some(p) => p.barrier(what).map_err(TrainError::Sync),
            None => Ok(()),
        }
    };

    // One run per output folder, and a writable one, before anything is computed.
    let _lock = if writes {
        io::ensure_writable_dir(&out)?;
        Some(checkpoint::RunLock::acquire(&out)?)
    } else {
        None
    };
    // The other processes look once rank 0 has locked and tidied the folder.
    const SETTLED: &str = "the start (rank 0 locks the output folder and picks the checkpoint)";
    if first_rank > 0 {
        barrier(SETTLED)?;
    }
    // Where the run starts: fresh, or a verified checkpoint.
    let start = checkpoint::resolve(&out, &cfg.checkpoint.resume)?;
    if first_rank == 0 {
        start.notes.iter().for_each(|n| eprintln!("{n}"));
    }
    if writes {
        checkpoint::remove_stale(&out);
        if start.checkpoint.is_none()
            && let Some((_, existing)) = checkpoint::list(&out).pop()
        {
            return Err(TrainError::ExistingCheckpoints {
                dir: out.clone(),
                newest: existing,
            });
        }
    }
    if first_rank == 0 && process.is_some() {
        barrier(SETTLED)?;
    }
    let dataset = Arc::new(Dataset::open(
        cfg.data.source,
        &cfg.data.path,
        cfg.data.on_bad_image,
    )?);
    if first_rank == 0 {
        outputs.prepare(&dataset)?;
    }

    // One state per replica, built here one after the other (weight init draws from a
    // thread-local RNG seeded from run.seed, so every replica starts from the same weights).
    let mut states = Vec::with_capacity(devices.len());
    let mut start = start;
    for (rank, device) in devices.iter().enumerate() {
        let train_device = device.clone().autodiff();
        let st = match &start.checkpoint {
            Some(ck) => {
                let mut resumed = RunState::resumed(
                    &objective,
                    cfg,
                    ck,
                    dataset.len(),
                    &train_device,
                    opts.quiet || first_rank + rank > 0,
                );
                // A checkpoint that passed its checksums but does not decode: with `latest`,
                // fall back to the newest older one that does, as for any other corruption.
                while let Err(TrainError::Undecodable { dir, why }) = &resumed {
                    if cfg.checkpoint.resume != crate::config::Resume::Latest || rank > 0 {
                        break;
                    }
                    let step = checkpoint::parse_step_of(dir).unwrap_or(0);
                    let older = checkpoint::list(&out)
                        .into_iter()
                        .rev()
                        .filter(|(s, _)| *s < step)
                        .find_map(|(_, p)| checkpoint::read_verified(&p).ok());
                    let Some(older) = older else { break };
                    eprintln!(
                        "warning: cannot resume from {}: {why}; resuming from the older {} \
                         (work after step {} is redone)",
                        dir.display(),
                        older.dir.display(),
                        checkpoint::parse_step_of(&older.dir).unwrap_or(0)
                    );
                    resumed = RunState::resumed(
                        &objective,
                        cfg,
                        &older,
                        dataset.len(),
                        &train_device,
                        opts.quiet,
                    );
                    start.checkpoint = Some(older);
                }
                let ck = start
                    .checkpoint
                    .as_ref()
                    .expect("resuming from a checkpoint");
                let st = resumed?;
                if first_rank + rank == 0 && !opts.quiet {
                    eprintln!(
                        "resuming from {} (step {}, epoch {}, batch {} of the epoch)",
                        ck.dir.display(),
                        st.step,
                        st.position.epoch,
                        st.position.batch_in_epoch
                    );
                }
                st
            }
            None => RunState::fresh(&objective, cfg, &train_device)?,
        };
        states.push(st);
    }
    let ctx = RunContext {
        cfg,
        opts,
        out,
        dataset,
        started,
    };
    if let Some(p) = process.clone() {
        let st = states.pop().expect("one state per process");
        // Every process resumes from the same step (they read the same folder), or none starts.
        barrier(&format!("the start of training at step {}", st.step))?;
        if first_rank == 0 && !opts.quiet {
            eprintln!(
                "data parallel: {} processes ({}), {} images per process per micro-batch",
                p.world(),
                if nccl {
                    "NCCL"
                } else {
                    "CPU, gradients over TCP: a test engine"
                },
                cfg.train.batch_size / p.world()
            );
        }
        let cuda = crate::device::DeviceSpec::parse(&cfg.run.device)
            .ok()
            .and_then(|d| match d {
                crate::device::DeviceSpec::Cuda(i) => Some(i),
                crate::device::DeviceSpec::Cpu(_) => None,
            });
        let mut objective = objective;
        objective.place(&devices[0]);
        let outputs = (first_rank == 0).then_some(outputs);
        return run_rank(
            &ctx,
            distributed::Replica::process(p, cuda),
            objective,
            outputs,
            st,
            &devices[0],
        );
    }
    if devices.len() == 1 {
        let st = states.pop().expect("one state");
        let mut objective = objective;
        objective.place(&devices[0]);
        return run_rank(
            &ctx,
            distributed::Replica::single(),
            objective,
            Some(outputs),
            st,
            &devices[0],
        );
    }
    if !opts.quiet {
        eprintln!(
            "data parallel: {} replicas ({}), {} images per replica per micro-batch",
            devices.len(),
            if nccl { "NCCL" } else { "CPU worker threads" },
            cfg.train.batch_size / devices.len()
        );
    }
    let timeout = std::time::Duration::from_secs_f64(cfg.run.sync_timeout_secs);
    let mut outputs = Some(outputs);
    let inputs: Vec<_> = states
        .into_iter()
        .map(|st| (st, objective.clone(), outputs.take()))
        .collect();
    let results = distributed::run_ranks(
        &devices,
        nccl,
        timeout,
        inputs,
        |replica, device, (st, mut objective, outputs)| {
            objective.place(device);
            run_rank(&ctx, replica, objective, outputs, st, device)
        },
    );
    // Rank 0's outcome; on failure the root cause (not a rank reporting another's failure).
    let mut errors = Vec::new();
    let (mut outcome, mut replicas) = (None, Vec::new());
    for (rank, r) in results.into_iter().enumerate() {
        match r {
            Ok(o) if rank == 0 => outcome = Some(o),
            Ok(o) => replicas.push(o.model),
            Err(distributed::RankFailure::Error(e)) => errors.push(e),
            Err(distributed::RankFailure::Panic(m)) => {
                errors.push(TrainError::RankPanicked { rank, message: m })
            }
        }
    }
    errors.sort_by_key(|e| matches!(e, TrainError::Sync(s) if s.is_secondary()));
    match (errors.into_iter().next(), outcome) {
        (Some(e), _) => Err(e),
        (None, Some(o)) => Ok(TrainOutcome { replicas, ..o }),
        (None, None) => unreachable!("rank 0 either returns or fails"),
    }
}

/// One replica's loop, read top to bottom: open its shard of the data, then steps of
/// accumulate -> (all-reduce) -> clip -> optimizer step -> EMA -> log/sample/checkpoint.
/// Rank 0 alone writes; all ranks meet at a barrier after each write.
fn run_rank<O: Objective, P: Outputs<O::Model>>(
    ctx: &RunContext,
    mut replica: distributed::Replica,
    mut objective: O,
    outputs: Option<P>,
    mut st: RunState<O::Model>,
    device: &Device,
) -> Result<TrainOutcome<O::Model>, TrainError> {
    let cfg = ctx.cfg;
    let train_device = device.clone().autodiff();
    let out = &ctx.out;
    let main = replica.is_main();
    // Only rank 0 holds the outputs; it writes only when asked to.
    let writer = outputs.filter(|_| ctx.opts.write_outputs && main);
    let quiet = ctx.opts.quiet || !main;
    let say = |msg: &str| {
        if !quiet {
            eprintln!("{msg}");
        }
    };
    let world = replica.world_size();
    let first_step = st.step;
    let t = &cfg.train;
    let mut loader = Loader::spawn(
        ctx.dataset.clone(),
        cfg.data.transform(),
        t.batch_size,
        cfg.run.seed,
        st.position,
        cfg.data.num_workers,
        cfg.data.prefetch_batches,
        cfg.data.on_bad_image,
        replica.shard(t.batch_size),
        !cfg.data.cache_latents,
    )?;
    say(&format!(
        "data: {} images from {} ({} batches of {} per epoch)",
        ctx.dataset.len(),
        ctx.dataset.path().display(),
        loader.batches_per_epoch,
        t.batch_size
    ));
    say(&format!(
        "model: {:?}, {} parameters",
        cfg.model.architecture,
        st.model.num_params()
    ));

    let mut events = if writer.is_some() && cfg.logging.tensorboard {
        Some(EventWriter::create(&out.join("logs"), first_step as u64)?)
    } else {
        None
    };
    let lr_sched = LrScheduler {
        schedule: t.lr_scheduler,
        base_lr: t.learning_rate,
        warmup_steps: t.lr_warmup_steps,
        total_steps: t.max_steps,
    };
    let progress = Progress::new(t.max_steps, first_step, cfg.logging.log_every, quiet);
    let accum_steps = t.gradient_accumulation_steps;
    // Global images per optimizer step: every rank's shard of every micro-batch.
    let images_per_step = (t.batch_size * accum_steps) as f64;
    let every = cfg.checkpoint.every_steps;
    let mut window = Window::default();
    let mut ema_decay = 0.0;
    let mut consecutive_skips = 0usize;
    let mut losses = Vec::with_capacity(t.max_steps.saturating_sub(first_step));
    let groups = objective.param_groups(&st.model);
    let checkpointed = groups.checkpointed();

    while st.step < t.max_steps {
        let step_start = Instant::now();
        let lr = lr_sched.lr_at(st.step);
        let mut accumulator = GradientsAccumulator::new();
        let mut loss_sum = 0.0;
        // fp16: the loss is multiplied by the scaler's scale before the backward pass.
        let loss_scale = st.scaler.map_or(1.0, |s| s.scale);
        let scale = loss_scale / accum_steps as f64;
        // Accumulate locally (PyTorch DDP's `no_sync`): nothing crosses ranks until the step.
        for _ in 0..accum_steps {
            let batch = loader.next_batch()?;
            let (grads, value) =
                objective.grads(&st.model, &batch, scale, &mut st.rng, &train_device);
            loss_sum += value / loss_scale;
            accumulator.accumulate(&st.model, grads);
        }
        let mut grads = accumulator.grads();
        if ctx.opts.overflow_at_step == Some(st.step + 1) {
            grad::scale_all(&st.model, &mut grads, f64::INFINITY);
        }
        let mut stop_signal = None;
        if world > 1 {
            (grads, loss_sum, stop_signal) = all_reduce_step(
                &mut replica,
                &mut objective,
                &st.model,
                grads,
                loss_sum,
                st.step + 1,
                device,
            )?;
        }
        // Unscaled after the all-reduce and before clipping, as `GradScaler.unscale_` is used.
        if loss_scale != 1.0 {
            grad::scale_all(&st.model, &mut grads, 1.0 / loss_scale);
        }
        let grad_norm = grad::clip_global_norm(&st.model, &mut grads, t.max_grad_norm);
        let apply = match st.scaler.as_mut() {
            // An overflow is expected under fp16: skip and halve the scale, whatever
            // `on_nonfinite` says (`max_consecutive_skips` still stops a diverged run).
            Some(scaler) => {
                let finite = loss_sum.is_finite() && grad_norm.is_finite();
                scaler.update(finite) == ScalerStep::Apply
            }
            None => check_finite(st.step + 1, loss_sum, grad_norm, t.on_nonfinite)?,
        };
        if apply {
            // Groups at their own rate step apart: steps of the one optimizer over disjoint
            // parameters (AdamW keeps its moments and step count per parameter), so this is
            // one step at several rates.
            let separate: Vec<_> = groups
                .separate_rates()
                .into_iter()
                .map(|(ids, factor)| (grad::take(&st.model, &mut grads, ids), factor))
                .collect();
            st.model = st.optim.step(lr, st.model, grads);
            for (group, factor) in separate {
                st.model = st.optim.step(lr * factor, st.model, group);
            }
            if let Some(ema) = &mut st.ema {
                ema_decay = ema.step(&st.model.valid());
            }
            consecutive_skips = 0;
        } else {
            st.skipped += 1;
            consecutive_skips += 1;
            if t.max_consecutive_skips > 0 && consecutive_skips > t.max_consecutive_skips {
                return Err(TrainError::TooManySkips {
                    skipped: consecutive_skips,
                    step: st.step + 1,
                    limit: t.max_consecutive_skips,
                });
            }
        }
        st.model = objective.after_step(st.model, &mut st.rng);
        st.step += 1;
        if replica.first_in_process() {
            // Once per step and process (in-process ranks share the allocator).
            crate::memory::iteration();
        }
        st.position = loader.position();
        st.last_loss = loss_sum;
        losses.push(loss_sum);
        let seconds = step_start.elapsed().as_secs_f64();
        progress.update(&StepReport {
            step: st.step,
            loss: loss_sum,
            lr,
            grad_norm,
            images_per_sec: images_per_step / seconds.max(1e-9),
            skipped: !apply,
        });

        window.steps += 1;
        window.loss += loss_sum;
        window.seconds += seconds;
        window.images += images_per_step;
        if let Some(ev) = events.as_mut()
            && (st.step % cfg.logging.log_every == 0 || st.step == t.max_steps)
        {
            let s = st.step as u64;
            ev.scalar("train/loss", window.loss / window.steps as f64, s)?;
            ev.scalar("train/lr", lr, s)?;
            ev.scalar("train/grad_norm", grad_norm, s)?;
            ev.scalar("train/skipped_steps", st.skipped as f64, s)?;
            if let Some(scaler) = &st.scaler {
                ev.scalar("train/loss_scale", scaler.scale, s)?;
            }
            ev.scalar(
                "train/images_per_sec",
                window.images / window.seconds.max(1e-9),
                s,
            )?;
            if st.ema.is_some() {
                ev.scalar("train/ema_decay", ema_decay, s)?;
            }
            for (tag, value) in objective.metrics() {
                ev.scalar(tag, value, s)?;
            }
            window = Window::default();
        }
        let sample_every = cfg.logging.sample_every;
        let sampling = sample_every > 0 && st.step % sample_every == 0 && st.step < t.max_steps;
        let saving = every > 0 && (st.step % every == 0 || st.step == t.max_steps);
        let save_checkpoint = |st: &RunState<O::Model>| {
            let lr_next = lr_sched.lr_at(st.step);
            let fingerprints = objective.fingerprints();
            let only = checkpointed.as_ref();
            st.save_checkpoint(cfg, ctx.dataset.len(), lr_next, fingerprints, only, out)
        };
        if ctx.opts.write_outputs && (sampling || saving) {
            if let Some(w) = writer.as_ref().filter(|_| sampling) {
                replica.doing(&format!("sampling at step {}", st.step));
                write_samples(w, &st, device, out, events.as_mut())?;
            }
            if writer.is_some() && saving {
                replica.doing(&format!("writing checkpoint-{}", st.step));
                save_checkpoint(&st)?;
            }
            // The others wait for rank 0's writes (with the timeout), so none runs ahead into
            // the next all-reduce while rank 0 samples or saves.
            replica
                .barrier(&format!("the barrier after step {}'s writes", st.step))
                .map_err(TrainError::Sync)?;
        }
        // SIGINT/SIGTERM: every rank stops after the same step (the request travels in the
        // all-reduce), rank 0 writes a checkpoint unless this step just wrote one.
        let signal = if world > 1 {
            stop_signal
        } else {
            crate::signals::requested()
        };
        if let Some(signal) = signal
            && st.step < t.max_steps
        {
            progress.finish();
            let mut written = None;
            if ctx.opts.write_outputs && writer.is_some() {
                written = Some(if saving {
                    out.join(format!("checkpoint-{}", st.step))
                } else {
                    save_checkpoint(&st)?
                });
            }
            // (TensorBoard records are flushed as they are written.)
            if world > 1 {
                replica
                    .barrier(&format!(
                        "the barrier after the checkpoint for {}",
                        crate::signals::name(signal)
                    ))
                    .map_err(TrainError::Sync)?;
            }
            return Err(TrainError::Interrupted {
                signal,
                step: st.step,
                checkpoint: written,
            });
        }
    }
    progress.finish();
    let bad_images = loader.bad_images.load(std::sync::atomic::Ordering::Relaxed);
    if bad_images > 0 {
        eprintln!("warning: {bad_images} image decode(s) failed during training and were replaced");
    }

    let (mut sample_grid, mut export_dir) = (None, None);
    if let Some(w) = &writer {
        replica.doing("writing the final samples and export");
        sample_grid = Some(write_samples(w, &st, device, out, events.as_mut())?);
        if cfg.export.enabled {
            let raw = st.model.valid();
            let dir = out.join("export");
            match &st.ema {
                Some(ema) => w.export(&ema.shadow, Some(&raw), &dir)?,
                None => w.export(&raw, None, &dir)?,
            }
            io::write_atomic(&dir.join(checkpoint::CONFIG_FILE), cfg.to_toml().as_bytes())?;
            // The step the export holds, so `sample` can tell it from newer checkpoints.
            io::write_json(
                &dir.join(EXPORT_STEP_FILE),
                &serde_json::json!({ "step": st.step }),
            )?;
            export_dir = Some(dir);
        }
    }
    Ok(TrainOutcome {
        model: st.model.valid(),
        ema: st.ema.map(|e| e.shadow),
        summary: RunSummary {
            first_step,
            steps: st.step,
            last_loss: st.last_loss,
            losses,
            skipped_steps: st.skipped,
            loss_scale: st.scaler.map(|s| s.scale),
            bad_images,
            sample_grid,
            export_dir,
            seconds: ctx.started.elapsed().as_secs_f64(),
            world_size: world,
            all_reduces: replica.all_reduces(),
        },
        replicas: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_policy() {
        assert!(check_finite(3, 0.5, 1.0, OnNonFinite::Error).unwrap());
        assert!(!check_finite(3, f64::NAN, 1.0, OnNonFinite::Skip).unwrap());
        let e = check_finite(7, 0.5, f64::INFINITY, OnNonFinite::Error)
            .unwrap_err()
            .to_string();
        assert!(e.contains("step 7") && e.contains("gradient norm"), "{e}");
    }
}
