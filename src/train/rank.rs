//! One replica's training loop ([`run_rank`]), read top to bottom, and the helpers it calls
//! for each phase of a step.

use std::path::PathBuf;
use std::time::Instant;

use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;

use super::outputs::write_samples;
use super::progress::{Progress, StepLog, StepReport, StepScalars};
use super::run::{self, RunState};
use super::sync::all_reduce_step;
use super::{Objective, Outputs, RunContext, RunSummary, TrainError, TrainOutcome};
use crate::checkpoint;
use crate::config::TrainConfig;
use crate::data::{Loader, LoaderSpec};
use crate::distributed;
use crate::optim::grad;
use crate::optim::lr::LrScheduler;
use crate::tensorboard::EventWriter;

/// One replica's loop, read top to bottom: open its shard of the data, then steps of
/// accumulate -> (all-reduce) -> clip -> optimizer step -> EMA -> log/sample/checkpoint.
/// Rank 0 alone writes; all ranks meet at a barrier after each write.
pub(super) fn run_rank<O: Objective, P: Outputs<O::Model>>(
    ctx: &RunContext,
    mut replica: distributed::Replica,
    mut objective: O,
    outputs: Option<P>,
    mut st: RunState<O::Model>,
    device: &Device,
) -> Result<TrainOutcome<O::Model>, TrainError> {
    let (cfg, out, t) = (ctx.cfg, &ctx.out, &ctx.cfg.train);
    let train_device = device.clone().autodiff();
    // Only rank 0 holds the outputs; it writes only when asked to.
    let writer = outputs.filter(|_| ctx.opts.write_outputs && replica.is_main());
    let quiet = ctx.opts.quiet || !replica.is_main();
    let (world, first_step) = (replica.world_size(), st.step);
    let mut loader = open_shard(ctx, &replica, &st, quiet)?;
    let events = match writer.is_some() && cfg.logging.tensorboard {
        true => Some(EventWriter::create(&out.join("logs"), first_step as u64)?),
        false => None,
    };
    let progress = Progress::new(t.max_steps, first_step, cfg.logging.log_every, quiet);
    let mut log = StepLog::new(progress, events, cfg.logging.log_every, t.max_steps);
    let lr_sched = lr_scheduler(t);
    let groups = objective.param_groups(&st.model);
    let checkpointed = groups.checkpointed();
    let room = DiskRoom::for_checkpoints(&st, checkpointed.as_ref(), out);
    if writer.is_some() {
        room.required()?;
    }
    let save = |st: &RunState<O::Model>, objective: &O| {
        room.warn_if_short();
        let (lr_next, fingerprints) = (lr_sched.lr_at(st.step), objective.fingerprints());
        st.save_checkpoint(
            cfg,
            ctx.dataset.len(),
            lr_next,
            fingerprints,
            checkpointed.as_ref(),
            out,
        )
    };
    // Global images per optimizer step: every rank's shard of every micro-batch.
    let images_per_step = (t.batch_size * t.gradient_accumulation_steps) as f64;
    let (mut ema_decay, mut consecutive_skips) = (0.0, 0usize);
    let mut losses = Vec::with_capacity(t.max_steps.saturating_sub(first_step));

    while st.step < t.max_steps {
        let step_start = Instant::now();
        let lr = lr_sched.lr_at(st.step);
        // fp16: the loss is multiplied by the scaler's scale before the backward pass.
        let loss_scale = st.scaler.map_or(1.0, |s| s.scale);
        let (mut grads, mut loss) = accumulate(
            &mut objective,
            &mut loader,
            &mut st,
            loss_scale,
            t,
            &train_device,
        )?;
        if ctx.opts.overflow_at_step == Some(st.step + 1) {
            grad::scale_all(&st.model, &mut grads, f64::INFINITY);
        }
        // SIGINT/SIGTERM: with several ranks the request travels in the all-reduce, so every
        // rank stops after the same step; alone, it is looked at after the step's writes.
        let step = st.step + 1;
        let reduced_stop = if world > 1 {
            let reduced;
            (grads, loss, reduced) = all_reduce_step(
                &mut replica,
                &mut objective,
                &st.model,
                grads,
                loss,
                step,
                device,
            )?;
            reduced
        } else {
            None
        };
        let update;
        (st, update) = st.update(grads, loss, lr, loss_scale, &groups, t, step)?;
        ema_decay = update.ema_decay.unwrap_or(ema_decay);
        consecutive_skips = if update.applied {
            0
        } else {
            consecutive_skips + 1
        };
        if t.max_consecutive_skips > 0 && consecutive_skips > t.max_consecutive_skips {
            let (skipped, limit) = (consecutive_skips, t.max_consecutive_skips);
            return Err(TrainError::TooManySkips {
                skipped,
                step: st.step + 1,
                limit,
            });
        }
        st.model = objective.after_step(st.model, &mut st.rng);
        st.step += 1;
        if replica.first_in_process() {
            // Once per step and process (in-process ranks share the allocator).
            crate::memory::iteration();
        }
        (st.position, st.last_loss) = (loader.position(), loss);
        losses.push(loss);
        let seconds = step_start.elapsed().as_secs_f64();
        log_step(
            &mut log,
            &st,
            &objective,
            (loss, lr, seconds),
            &update,
            ema_decay,
            images_per_step,
        )?;

        let saving = step_writes(
            ctx,
            &mut replica,
            writer.as_ref(),
            &st,
            device,
            &mut log,
            &|st: &RunState<O::Model>| save(st, &objective),
        )?;
        let stop = match world {
            1 => crate::signals::requested(),
            _ => reduced_stop,
        };
        if let Some(signal) = stop.filter(|_| st.step < t.max_steps) {
            // Rank 0 writes a checkpoint unless this step just wrote one.
            log.finish();
            let written = match ctx.opts.write_outputs && writer.is_some() {
                true if saving => Some(out.join(checkpoint::checkpoint_name(st.step))),
                true => Some(save(&st, &objective)?),
                false => None,
            };
            return Err(interrupted(&mut replica, signal, st.step, written));
        }
    }
    log.finish();
    finish_rank(
        ctx,
        &mut replica,
        writer.as_ref(),
        st,
        &loader,
        &mut log,
        losses,
        first_step,
        device,
    )
}

/// The disk space one checkpoint needs (weights, EMA, AdamW's two moments, in f32), checked at
/// the start, not found missing at the export after the whole run (a checkpoint is written
/// beside the previous one before that is removed).
struct DiskRoom<'a> {
    out: &'a std::path::Path,
    need: u64,
}

impl<'a> DiskRoom<'a> {
    fn for_checkpoints<M: Module>(
        st: &RunState<M>,
        checkpointed: Option<&std::collections::HashSet<burn::module::ParamId>>,
        out: &'a std::path::Path,
    ) -> Self {
        let copies = 3 + u64::from(st.ema.is_some());
        let weights = crate::io::safetensors::count_weights(&st.model, checkpointed);
        Self {
            out,
            need: weights * 4 * copies,
        }
    }

    /// At the start: too little free space stops the run before its first step.
    fn required(&self) -> Result<(), TrainError> {
        match crate::io::free_bytes(self.out) {
            Some(free) if free < self.need => Err(TrainError::NoSpace {
                dir: self.out.to_path_buf(),
                free,
                need: self.need,
            }),
            _ => Ok(()),
        }
    }

    /// Before each checkpoint: a shortfall is said (the write itself is atomic).
    fn warn_if_short(&self) {
        if let Some(free) = crate::io::free_bytes(self.out).filter(|&f| f < self.need) {
            eprintln!(
                "warning: {}: {:.2} GB free, a checkpoint needs about {:.2} GB; writing it may fail",
                self.out.display(),
                free as f64 / 1e9,
                self.need as f64 / 1e9
            );
        }
    }
}

/// Rank 0's writes after a step, when due: a sample grid every `logging.sample_every` steps,
/// a checkpoint every `checkpoint.every_steps` (and at the last); the others wait for them at
/// a barrier (with the timeout), so none runs ahead into the next all-reduce. Returns whether
/// a checkpoint was due.
fn step_writes<M: Module, P: Outputs<M>>(
    ctx: &RunContext,
    replica: &mut distributed::Replica,
    writer: Option<&P>,
    st: &RunState<M>,
    device: &Device,
    log: &mut StepLog,
    save: &dyn Fn(&RunState<M>) -> Result<PathBuf, TrainError>,
) -> Result<bool, TrainError> {
    let (cfg, t) = (ctx.cfg, &ctx.cfg.train);
    let sample_every = cfg.logging.sample_every;
    let sampling =
        sample_every > 0 && st.step.is_multiple_of(sample_every) && st.step < t.max_steps;
    let every = cfg.checkpoint.every_steps;
    let saving = every > 0 && (st.step.is_multiple_of(every) || st.step == t.max_steps);
    if !(ctx.opts.write_outputs && (sampling || saving)) {
        return Ok(saving);
    }
    if let Some(w) = writer.filter(|_| sampling) {
        replica.doing(&format!("sampling at step {}", st.step));
        let weights = st.sampling_weights();
        write_samples(w, &weights, st.step, device, &ctx.out, log.events())?;
    }
    if writer.is_some() && saving {
        replica.doing(&format!("writing checkpoint-{}", st.step));
        save(st)?;
    }
    replica
        .barrier(&format!("the barrier after step {}'s writes", st.step))
        .map_err(TrainError::Sync)?;
    Ok(saving)
}

/// The report and scalars of the step just taken.
fn log_step<O: Objective>(
    log: &mut StepLog,
    st: &RunState<O::Model>,
    objective: &O,
    (loss, lr, seconds): (f64, f64, f64),
    update: &run::Update,
    ema_decay: f64,
    images_per_step: f64,
) -> Result<(), TrainError> {
    let report = StepReport {
        step: st.step,
        loss,
        lr,
        grad_norm: update.grad_norm,
        images_per_sec: images_per_step / seconds.max(1e-9),
        skipped: !update.applied,
    };
    let scalars = StepScalars {
        seconds,
        images: images_per_step,
        skipped_total: st.skipped,
        loss_scale: st.scaler.map(|s| s.scale),
        ema_decay: st.ema.is_some().then_some(ema_decay),
        metrics: objective.metrics(),
    };
    Ok(log.step(&report, scalars)?)
}

/// The error a run stopped by `signal` after `step` returns, once every rank has passed the
/// barrier after rank 0's checkpoint (`written`).
fn interrupted(
    replica: &mut distributed::Replica,
    signal: i32,
    step: usize,
    written: Option<PathBuf>,
) -> TrainError {
    if replica.world_size() > 1 {
        let what = format!(
            "the barrier after the checkpoint for {}",
            crate::signals::name(signal)
        );
        if let Err(e) = replica.barrier(&what) {
            return TrainError::Sync(e);
        }
    }
    TrainError::Interrupted {
        signal,
        step,
        checkpoint: written,
    }
}

/// The end of a replica's run: rank 0's last grid and export, and what the run reports.
// The pieces of one replica's state at the end of its loop, moved in once.
#[allow(clippy::too_many_arguments)]
fn finish_rank<M: Module, P: Outputs<M>>(
    ctx: &RunContext,
    replica: &mut distributed::Replica,
    writer: Option<&P>,
    st: RunState<M>,
    loader: &Loader,
    log: &mut StepLog,
    losses: Vec<f64>,
    first_step: usize,
    device: &Device,
) -> Result<TrainOutcome<M>, TrainError> {
    let bad_images = loader.bad_images.load(std::sync::atomic::Ordering::Relaxed);
    if bad_images > 0 {
        eprintln!("warning: {bad_images} image decode(s) failed during training and were replaced");
    }
    let (sample_grid, export_dir) = match writer {
        Some(w) => final_writes(ctx, replica, w, &st, device, log.events())?,
        None => (None, None),
    };
    // A SIGINT/SIGTERM during the final writes: they were finished, and the run still ends as
    // stopped (128 + the signal), as the shell that sent it expects.
    if let (Some(signal), Some(export)) = (crate::signals::requested(), &export_dir) {
        return Err(TrainError::StoppedAfterExport {
            signal,
            step: st.step,
            export: export.clone(),
        });
    }
    let summary = RunSummary {
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
        world_size: replica.world_size(),
        all_reduces: replica.all_reduces(),
    };
    Ok(TrainOutcome {
        model: st.model.valid(),
        ema: st.ema.map(|e| e.shadow),
        summary,
        replicas: Vec::new(),
    })
}

/// The learning-rate schedule `[train]` describes.
fn lr_scheduler(t: &TrainConfig) -> LrScheduler {
    LrScheduler {
        schedule: t.lr_scheduler,
        base_lr: t.learning_rate,
        warmup_steps: t.lr_warmup_steps,
        total_steps: t.max_steps,
    }
}

/// The loader of this replica's shard of the data, positioned where the state left off, with
/// what the run trains on said once.
fn open_shard<M: Module>(
    ctx: &RunContext,
    replica: &distributed::Replica,
    st: &RunState<M>,
    quiet: bool,
) -> Result<Loader, TrainError> {
    let (cfg, t) = (ctx.cfg, &ctx.cfg.train);
    let spec = LoaderSpec {
        transform: cfg.data.transform(),
        batch_size: t.batch_size,
        seed: cfg.run.seed,
        start: st.position,
        num_workers: cfg.data.num_workers,
        prefetch: cfg.data.prefetch_batches,
        on_bad: cfg.data.on_bad_image,
        shard: replica.shard(t.batch_size),
        decode: !cfg.data.cache_latents,
    };
    let loader = Loader::spawn(ctx.dataset.clone(), spec)?;
    if !quiet {
        eprintln!(
            "data: {} images from {} ({} batches of {} per epoch)",
            ctx.dataset.len(),
            ctx.dataset.path().display(),
            loader.batches_per_epoch,
            t.batch_size
        );
        eprintln!(
            "model: {:?}, {} parameters",
            cfg.model.architecture,
            st.model.num_params()
        );
    }
    Ok(loader)
}

/// The gradients of one optimizer step's micro-batches, summed locally (PyTorch DDP's
/// `no_sync`: nothing crosses ranks until the step), each loss scaled by `loss_scale / N`;
/// and the step's loss (unscaled).
fn accumulate<O: Objective>(
    objective: &mut O,
    loader: &mut Loader,
    st: &mut RunState<O::Model>,
    loss_scale: f64,
    t: &TrainConfig,
    device: &Device,
) -> Result<(GradientsParams, f64), TrainError> {
    let accum_steps = t.gradient_accumulation_steps;
    let scale = loss_scale / accum_steps as f64;
    let mut accumulator = GradientsAccumulator::new();
    let mut loss = 0.0;
    for _ in 0..accum_steps {
        let batch = loader.next_batch()?;
        let (grads, value) = objective.grads(&st.model, &batch, scale, &mut st.rng, device);
        loss += value / loss_scale;
        accumulator.accumulate(&st.model, grads);
    }
    Ok((accumulator.grads(), loss))
}

/// Rank 0's writes at the end of a run: the last sample grid and the export.
fn final_writes<M: Module, P: Outputs<M>>(
    ctx: &RunContext,
    replica: &mut distributed::Replica,
    w: &P,
    st: &RunState<M>,
    device: &Device,
    events: Option<&mut EventWriter>,
) -> Result<(Option<PathBuf>, Option<PathBuf>), TrainError> {
    replica.doing("writing the final samples and export");
    let grid = write_samples(w, &st.sampling_weights(), st.step, device, &ctx.out, events)?;
    if !ctx.cfg.export.enabled {
        return Ok((Some(grid), None));
    }
    let raw = st.model.valid();
    let dir = ctx.out.join("export");
    // An export being rewritten is not complete until its export.json is written again (a
    // chained stage 2 reads only complete exports).
    match std::fs::remove_file(dir.join(crate::train::EXPORT_STEP_FILE)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(crate::io::IoError::Write {
                path: dir.join(crate::train::EXPORT_STEP_FILE),
                source: e,
            }
            .into());
        }
        _ => {}
    }
    crate::signals::test_phase("export");
    match &st.ema {
        Some(ema) => w.export_at(&ema.shadow, Some(&raw), &dir, st.step)?,
        None => w.export_at(&raw, None, &dir, st.step)?,
    }
    Ok((Some(grid), Some(dir)))
}
