//! The training loop: data -> loss -> accumulated gradients -> (all-reduce) -> clip -> AdamW
//! step -> EMA -> log/sample/checkpoint.
//!
//! Read it top to bottom in [`train_with`] and [`run_rank`]. One "step" is one optimizer step
//! everywhere (progress, LR schedule, logging, `max_steps`); it consumes
//! `gradient_accumulation_steps` micro-batches whose gradients are summed locally (each loss
//! scaled by 1/N) before the single update. A family plugs in through an [`Objective`] (model
//! and loss, `objectives/`) and [`Outputs`] (grids and export, implemented in `pipelines`).

mod error;
pub mod objective;
pub mod objectives;
pub mod outputs;
pub mod progress;
mod rank;
pub mod run;
mod sync;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use burn::prelude::*;

use crate::checkpoint;
use crate::config::{Config, OnNonFinite};
use crate::data::Dataset;
use crate::distributed;
use crate::io;
pub use error::TrainError;
pub use objective::Objective;
pub use outputs::Outputs;
use rank::run_rank;
use run::RunState;

/// `export/export.json`: `{"step": N}`, the optimizer step the export's weights are from.
pub const EXPORT_STEP_FILE: &str = "export.json";

#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Write checkpoints, logs, samples and the export (tests that only compare weights turn
    /// it off).
    pub write_outputs: bool,
    pub quiet: bool,
    /// Tests only: make the gradients of this optimizer step non-finite (an fp16 overflow).
    pub overflow_at_step: Option<usize>,
    /// The command line's `--set` overrides (already applied to the config): a chained stage 1
    /// reports those its own config does not share.
    pub overrides: Vec<String>,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            write_outputs: true,
            quiet: false,
            overflow_at_step: None,
            overrides: Vec::new(),
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

/// What every rank of a run shares.
pub(crate) struct RunContext<'a> {
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
        let quiet = opts.quiet || first_rank + rank > 0;
        let st = RunState::start(
            &objective,
            cfg,
            &mut start,
            &out,
            dataset.len(),
            &device.clone().autodiff(),
            rank == 0,
            quiet,
        )?;
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
