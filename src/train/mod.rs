//! The training loop: data -> loss -> accumulated gradients -> clip -> AdamW step.
//!
//! Read it top to bottom in [`train`]. One "step" is one optimizer step everywhere (progress,
//! LR schedule, logging, `max_steps`); it consumes `gradient_accumulation_steps` micro-batches
//! whose gradients are summed locally (each loss scaled by 1/N) before the single update.
//! All randomness of a step (timesteps, noise) is drawn on the host from a seeded ChaCha
//! stream, sample by sample, so a batch of 32 and four micro-batches of 8 draw the same numbers.

pub mod checkpoint;
pub mod ema;
pub mod grad;
pub mod lr;
pub mod objectives;
pub mod progress;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use crate::config::{Config, DeviceRequest, DeviceSpec, OnNonFinite};
use crate::data::{Batch, Dataset, Loader, LoaderPosition, Transform};
use crate::diffusion::sampling::{self, SamplerKind, SamplerOptions, TimestepSpacing};
use crate::diffusion::schedule::NoiseSchedule;
use crate::distributed;
use crate::io;
use crate::models::{Architecture, DenoiserModel, compute_dtype};
use crate::tensorboard::{EventError, EventWriter};
use ema::Ema;
use lr::LrScheduler;
use objectives::{DiffusionObjective, PixelCnnObjective, VqvaeObjective};
use progress::{Progress, StepReport};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("device {0:?} needs the `cuda` cargo feature: rebuild with `--features cuda`")]
    NoCuda(String),
    #[error("{0}")]
    Device(String),
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
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    #[error("cannot resume from {dir}: {why}")]
    Resume { dir: PathBuf, why: String },
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
    #[error("{0}")]
    Stage(String),
    #[error(transparent)]
    Sync(#[from] crate::distributed::SyncError),
    #[error("{0}")]
    Rank(String),
}

/// The (non-autodiff) device of `run.device` (rank 0's under data parallelism).
pub fn make_device(spec: &str) -> Result<Device, TrainError> {
    let parsed =
        DeviceSpec::parse(spec).map_err(|e| TrainError::Device(format!("run.device = {e}")))?;
    make_device_spec(parsed)
}

fn make_device_spec(spec: DeviceSpec) -> Result<Device, TrainError> {
    match spec {
        DeviceSpec::Cpu(_) => Ok(Device::flex()),
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(i) => Ok(Device::cuda(i)),
        #[cfg(not(feature = "cuda"))]
        DeviceSpec::Cuda(i) => Err(TrainError::NoCuda(format!("cuda:{i}"))),
    }
}

/// The model with weights drawn from `run.seed`.
pub fn build_model(cfg: &Config, device: &Device) -> DenoiserModel {
    crate::nn::seed_init(cfg.run.seed);
    DenoiserModel::new(
        cfg.model.architecture,
        &cfg.model.unet,
        &cfg.model.tutorial,
        device,
    )
}

pub fn noise_schedule(cfg: &Config) -> NoiseSchedule {
    let d = &cfg.diffusion;
    NoiseSchedule::new(
        d.beta_schedule,
        d.num_train_timesteps,
        d.beta_start,
        d.beta_end,
    )
}

/// Host-side randomness and coefficients for one micro-batch of the diffusion loss.
struct NoiseDraw {
    noise: Vec<f32>,
    /// The noise added to the input (differs from `noise` only with input perturbation).
    input_noise: Vec<f32>,
    timesteps: Vec<f32>,
    /// Per sample: sqrt(abar), sqrt(1 - abar), target coefficients (x0, eps), loss weight.
    coef: [Vec<f32>; 5],
}

fn draw_noise(
    cfg: &Config,
    schedule: &NoiseSchedule,
    shape: [usize; 4],
    rng: &mut ChaCha8Rng,
) -> NoiseDraw {
    let [b, c, h, w] = shape;
    let per = c * h * w;
    let d = &cfg.diffusion;
    let mut noise = Vec::with_capacity(b * per);
    let mut input_noise = Vec::with_capacity(b * per);
    let mut timesteps = Vec::with_capacity(b);
    let mut coef: [Vec<f32>; 5] = Default::default();
    let normal = |rng: &mut ChaCha8Rng| rng.sample::<f32, _>(StandardNormal);
    for _ in 0..b {
        let t = rng.random_range(0..schedule.num_train_timesteps());
        let mut eps: Vec<f32> = (0..per).map(|_| normal(rng)).collect();
        if d.noise_offset > 0.0 {
            // noise += offset * randn(B, C, 1, 1): one shift per channel.
            for ch in 0..c {
                let shift = d.noise_offset as f32 * normal(rng);
                eps[ch * h * w..(ch + 1) * h * w]
                    .iter_mut()
                    .for_each(|v| *v += shift);
            }
        }
        let perturbed: Vec<f32> = if d.input_perturbation > 0.0 {
            eps.iter()
                .map(|&e| e + d.input_perturbation as f32 * normal(rng))
                .collect()
        } else {
            eps.clone()
        };
        let (sa, s1a) = schedule.add_noise_coefficients(t);
        let (tx0, teps) = schedule.target_coefficients(d.prediction_type, t);
        let wgt = schedule.loss_weight(d.prediction_type, d.snr_gamma, t);
        for (v, x) in coef.iter_mut().zip([sa, s1a, tx0, teps, wgt]) {
            v.push(x as f32);
        }
        timesteps.push(t as f32);
        noise.extend(eps);
        input_noise.extend(perturbed);
    }
    NoiseDraw {
        noise,
        input_noise,
        timesteps,
        coef,
    }
}

impl NoiseDraw {
    /// Samples `range` of the draw (each sample's numbers are contiguous).
    fn slice(&self, range: std::ops::Range<usize>, per_sample: usize) -> NoiseDraw {
        let pixels = range.start * per_sample..range.end * per_sample;
        NoiseDraw {
            noise: self.noise[pixels.clone()].to_vec(),
            input_noise: self.input_noise[pixels].to_vec(),
            timesteps: self.timesteps[range.clone()].to_vec(),
            coef: std::array::from_fn(|i| self.coef[i][range.clone()].to_vec()),
        }
    }
}

/// The noise of `batch`: drawn for the whole global batch, in sample order, and cut to the
/// batch's slice, so every data-parallel rank advances the stream alike and each sample gets the
/// numbers it would get on one device.
fn draw_for_batch(
    cfg: &Config,
    schedule: &NoiseSchedule,
    batch: &Batch,
    rng: &mut ChaCha8Rng,
) -> NoiseDraw {
    let [b, c, h, w] = batch.shape;
    let draw = draw_noise(cfg, schedule, [batch.global_size, c, h, w], rng);
    if batch.global_size == b {
        draw
    } else {
        draw.slice(batch.offset..batch.offset + b, c * h * w)
    }
}

/// The diffusion loss of one micro-batch: mean over batch of `w_b * mean_chw (pred - target)^2`.
pub fn diffusion_loss(
    model: &DenoiserModel,
    cfg: &Config,
    schedule: &NoiseSchedule,
    batch: &Batch,
    rng: &mut ChaCha8Rng,
    device: &Device,
) -> Tensor<1> {
    let draw = draw_for_batch(cfg, schedule, batch, rng);
    loss_from_draw(model, cfg, &batch.images, batch.shape, draw, device)
}

/// Gradients of `scale * diffusion_loss(batch)` computed as `parts` equal slices on as many
/// threads, each on a replica of the weights ([`grad::replicate`]), summed by parameter id.
/// The noise is drawn for the whole micro-batch first, in sample order, so the numbers are
/// those of the unsplit loss; only the float summation order differs. Returns the loss too.
pub fn diffusion_split_grads(
    model: &DenoiserModel,
    cfg: &Config,
    schedule: &NoiseSchedule,
    batch: &Batch,
    parts: usize,
    scale: f64,
    rng: &mut ChaCha8Rng,
    device: &Device,
) -> (GradientsParams, f64) {
    let [b, c, h, w] = batch.shape;
    let per = b / parts;
    let pixels = c * h * w;
    let draw = draw_for_batch(cfg, schedule, batch, rng);
    let results: Vec<(GradientsParams, f64)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..parts)
            .map(|k| {
                let replica = grad::replicate(model);
                let part_draw = draw.slice(k * per..(k + 1) * per, pixels);
                let images = &batch.images[k * per * pixels..(k + 1) * per * pixels];
                s.spawn(move || {
                    // mean over the batch = sum over parts of (per / b) * mean over the part
                    let loss =
                        loss_from_draw(&replica, cfg, images, [per, c, h, w], part_draw, device)
                            .mul_scalar(scale * per as f64 / b as f64);
                    let value = loss.clone().into_scalar::<f32>() as f64;
                    (
                        GradientsParams::from_grads(loss.backward(), &replica),
                        value,
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a batch-split worker panicked"))
            .collect()
    });
    let mut accumulator = GradientsAccumulator::new();
    let mut total = 0.0;
    for (grads, value) in results {
        accumulator.accumulate(model, grads);
        total += value;
    }
    (accumulator.grads(), total)
}

fn loss_from_draw(
    model: &DenoiserModel,
    cfg: &Config,
    images: &[f32],
    shape: [usize; 4],
    draw: NoiseDraw,
    device: &Device,
) -> Tensor<1> {
    let b = shape[0];
    let dtype = compute_dtype(cfg.train.mixed_precision);
    let image = |v: Vec<f32>| Tensor::<4>::from_data(TensorData::new(v, shape), device).cast(dtype);
    let per_sample =
        |v: &Vec<f32>| Tensor::<4>::from_data(TensorData::new(v.clone(), [b, 1, 1, 1]), device);
    let x0 = image(images.to_vec());
    let noise = image(draw.noise);
    let input_noise = image(draw.input_noise);
    let [sa, s1a, tx0, teps, w] = &draw.coef;
    let noisy = x0.clone() * per_sample(sa) + input_noise * per_sample(s1a);
    let target = x0 * per_sample(tx0) + noise * per_sample(teps);
    let timesteps = Tensor::<1>::from_data(TensorData::new(draw.timesteps, [b]), device);
    let pred = model.forward(noisy, timesteps);
    let per_item: Tensor<1> = (pred - target).square().mean_dims(&[1, 2, 3]).reshape([b]);
    let weights = Tensor::<1>::from_data(TensorData::new(w.clone(), [b]), device);
    (per_item * weights).mean()
}

pub struct TrainOptions {
    /// Write checkpoints, logs, samples and the export (tests that only compare weights turn
    /// it off).
    pub write_outputs: bool,
    pub quiet: bool,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            write_outputs: true,
            quiet: false,
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
    pub skipped_steps: usize,
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

/// What differs between model families. The loop, accumulation, clipping, checkpoints, EMA,
/// logging and resume are shared; an objective says how to build the model, what its loss is,
/// what a sample grid shows and how weights are exported.
pub trait Objective {
    type Model: Module;
    /// Called once with the training data before any step (e.g. to fix a reconstruction batch).
    fn prepare(&mut self, _dataset: &Dataset) -> Result<(), TrainError> {
        Ok(())
    }
    /// Fresh weights; the init RNG is already seeded from `run.seed`.
    fn build(&self, device: &Device) -> Self::Model;
    /// The loss of one micro-batch.
    fn loss(
        &mut self,
        model: &Self::Model,
        batch: &Batch,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Tensor<1>;
    /// Runs after every optimizer step (e.g. codebook restarts); may draw from `rng`, which is
    /// checkpointed, so resume stays exact.
    fn after_step(&mut self, model: Self::Model, _rng: &mut ChaCha8Rng) -> Self::Model {
        model
    }
    /// Gradients of `scale * loss(batch)` computed in `parts` concurrent slices (on replicas of
    /// the weights), and the loss; `None` for families that compute a micro-batch in one piece.
    fn split_grads(
        &mut self,
        _model: &Self::Model,
        _batch: &Batch,
        _parts: usize,
        _scale: f64,
        _rng: &mut ChaCha8Rng,
        _device: &Device,
    ) -> Option<(GradientsParams, f64)> {
        None
    }
    /// Extra scalars for TensorBoard, from the last step.
    fn metrics(&self) -> Vec<(&'static str, f64)> {
        Vec::new()
    }
    /// Moves whatever the objective holds on a device (e.g. a frozen stage-1 model) to the
    /// device of the data-parallel rank it now serves.
    fn place(&mut self, _device: &Device) {}
    /// Host statistics of the step so far that data-parallel ranks sum before `after_step`
    /// (they travel in the gradient all-reduce); `main` is true on rank 0.
    fn local_stats(&mut self, _main: bool) -> Vec<f32> {
        Vec::new()
    }
    /// Receives the rank-order sum of every rank's `local_stats`.
    fn set_global_stats(&mut self, _summed: &[f32], _world: usize) {}
    /// Images `[n, c, h, w]` in [-1, 1] for the sample grid, and its column count.
    fn grid(&self, weights: &Self::Model, device: &Device) -> (Vec<f32>, [usize; 4], usize);
    /// Writes `weights` (EMA when on) and `raw` (training weights, with EMA) under `dir`.
    fn export(
        &self,
        weights: &Self::Model,
        raw: Option<&Self::Model>,
        dir: &Path,
    ) -> Result<(), TrainError>;
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

/// The mutable state of a run between optimizer steps: exactly what a checkpoint stores.
struct RunState<M> {
    model: M,
    optim: burn::optim::ModuleOptimizer,
    ema: Option<Ema<M>>,
    rng: ChaCha8Rng,
    step: usize,
    position: LoaderPosition,
    skipped: usize,
    last_loss: f64,
}

/// AdamW with the config's hyperparameters (PyTorch's defaults unless set).
pub fn adamw(cfg: &Config) -> burn::optim::ModuleOptimizer {
    let t = &cfg.train;
    AdamWConfig::new()
        .with_beta_1(t.adam_beta1 as f32)
        .with_beta_2(t.adam_beta2 as f32)
        .with_epsilon(t.adam_epsilon as f32)
        .with_weight_decay(t.adam_weight_decay as f32)
        .init()
}

fn rng_state(rng: &ChaCha8Rng) -> checkpoint::RngState {
    checkpoint::RngState {
        seed: rng.get_seed().iter().map(|b| format!("{b:02x}")).collect(),
        stream: rng.get_stream(),
        word_pos: rng.get_word_pos().to_string(),
    }
}

fn restore_rng(s: &checkpoint::RngState) -> Option<ChaCha8Rng> {
    let mut seed = [0u8; 32];
    if s.seed.len() != 64 {
        return None;
    }
    for (i, b) in seed.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.seed.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    let mut rng = ChaCha8Rng::from_seed(seed);
    rng.set_stream(s.stream);
    rng.set_word_pos(s.word_pos.parse().ok()?);
    Some(rng)
}

/// A fresh run: weights from `run.seed`, EMA shadow copied from them.
fn fresh_state<O: Objective>(objective: &O, cfg: &Config, device: &Device) -> RunState<O::Model> {
    crate::nn::seed_init(cfg.run.seed);
    let model = io::stable_param_ids(objective.build(device));
    let ema = cfg
        .ema
        .enabled
        .then(|| Ema::new(model.valid(), cfg.ema.clone()));
    RunState {
        model,
        optim: adamw(cfg),
        ema,
        rng: ChaCha8Rng::seed_from_u64(cfg.run.seed),
        step: 0,
        position: LoaderPosition::default(),
        skipped: 0,
        last_loss: f64::NAN,
    }
}

/// Rebuilds the run state from a verified checkpoint, refusing config changes that break it.
fn resumed_state<O: Objective>(
    objective: &O,
    cfg: &Config,
    ck: &checkpoint::Loaded,
    dataset_len: usize,
    device: &Device,
    quiet: bool,
) -> Result<RunState<O::Model>, TrainError> {
    let dir = &ck.dir;
    let (breaking, allowed) = checkpoint::compare_configs(&ck.config()?, cfg);
    if !breaking.is_empty() {
        return Err(TrainError::Resume {
            dir: dir.clone(),
            why: format!(
                "the config changed in ways that break resume:\n  {}\n\
                 Undo these changes, or start a new run in another run.output_dir",
                breaking.join("\n  ")
            ),
        });
    }
    let s = &ck.state;
    if s.dataset_len != dataset_len {
        return Err(TrainError::Resume {
            dir: dir.clone(),
            why: format!(
                "it was trained on {} images, the dataset now has {dataset_len}; the data order \
                 would differ",
                s.dataset_len
            ),
        });
    }
    if !quiet {
        for line in &allowed {
            eprintln!("note: changed since the checkpoint: {line}");
        }
    }
    let mut state = fresh_state(objective, cfg, device);
    let model_path = dir.join(checkpoint::MODEL_FILE);
    let tensors = io::parse_safetensors(ck.file(checkpoint::MODEL_FILE)?, &model_path)?;
    state.model = io::load_into(state.model, &tensors, &model_path)?;
    let optim_bytes =
        burn::tensor::Bytes::from_bytes_vec(ck.file(checkpoint::OPTIMIZER_FILE)?.to_vec());
    state.optim = state
        .optim
        .from_bytes(optim_bytes)
        .map_err(|e| TrainError::Resume {
            dir: dir.clone(),
            why: format!("{} cannot be read: {e:?}", checkpoint::OPTIMIZER_FILE),
        })?;
    if let Some(ema) = &mut state.ema {
        match (ck.files.get(checkpoint::EMA_FILE), s.ema_optimization_step) {
            (Some(bytes), Some(n)) => {
                let path = dir.join(checkpoint::EMA_FILE);
                let tensors = io::parse_safetensors(bytes, &path)?;
                ema.shadow = io::load_into(state.model.valid(), &tensors, &path)?;
                ema.optimization_step = n;
            }
            _ => {
                ema.shadow = state.model.valid();
                eprintln!(
                    "warning: {} has no EMA weights; EMA starts from the resumed weights",
                    dir.display()
                );
            }
        }
    } else if s.ema_optimization_step.is_some() && !quiet {
        eprintln!("note: ema.enabled = false: the checkpoint's EMA weights are not used");
    }
    state.rng = restore_rng(&s.rng).ok_or_else(|| TrainError::Resume {
        dir: dir.clone(),
        why: format!("{}: malformed rng state", checkpoint::STATE_FILE),
    })?;
    state.step = s.step;
    state.position = LoaderPosition {
        epoch: s.epoch,
        batch_in_epoch: s.batch_in_epoch,
    };
    state.skipped = s.skipped_steps;
    state.last_loss = s.last_loss;
    Ok(state)
}

/// Writes `checkpoint-<step>/` from the state between steps, then rotates.
fn save_checkpoint<M: Module>(
    cfg: &Config,
    st: &RunState<M>,
    dataset_len: usize,
    lr_next: f64,
    out: &Path,
) -> Result<PathBuf, TrainError> {
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let safetensors = |m: &M, name: &str| {
        io::safetensors_bytes(&io::named_tensors(m), &meta).map_err(|message| {
            TrainError::Io(io::IoError::Format {
                path: out.join(name),
                message,
            })
        })
    };
    let mut files = vec![(
        checkpoint::MODEL_FILE,
        safetensors(&st.model, checkpoint::MODEL_FILE)?,
    )];
    if let Some(ema) = &st.ema {
        files.push((
            checkpoint::EMA_FILE,
            safetensors(&ema.shadow, checkpoint::EMA_FILE)?,
        ));
    }
    let optim = st.optim.into_bytes().map_err(|e| TrainError::Resume {
        dir: out.to_path_buf(),
        why: format!("cannot serialise the optimizer state: {e:?}"),
    })?;
    files.push((checkpoint::OPTIMIZER_FILE, optim.to_vec()));
    files.push((checkpoint::CONFIG_FILE, cfg.to_toml().into_bytes()));
    let (crate_version, git_revision) = checkpoint::provenance();
    let mut state = checkpoint::TrainState {
        format_version: checkpoint::FORMAT_VERSION,
        step: st.step,
        epoch: st.position.epoch,
        batch_in_epoch: st.position.batch_in_epoch,
        data_seed: cfg.run.seed,
        dataset_len,
        rng: rng_state(&st.rng),
        ema_optimization_step: st.ema.as_ref().map(|e| e.optimization_step),
        skipped_steps: st.skipped,
        last_loss: st.last_loss,
        lr_schedule: format!("{:?}", cfg.train.lr_scheduler),
        lr_next,
        crate_version,
        git_revision,
        saved_unix_time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        files: Default::default(),
    };
    let dir = checkpoint::write(out, &mut state, &files)?;
    checkpoint::rotate(out, cfg.checkpoint.keep_last, st.step)?;
    Ok(dir)
}

/// Samples with the weights sampling should use (EMA when on), writes
/// `samples/step-<N>.png` and, when logging, a TensorBoard image.
fn write_samples<O: Objective>(
    objective: &O,
    st: &RunState<O::Model>,
    device: &Device,
    out: &Path,
    events: Option<&mut EventWriter>,
) -> Result<PathBuf, TrainError> {
    let weights = match &st.ema {
        Some(ema) => ema.shadow.clone(),
        None => st.model.valid(),
    };
    let (images, shape, ncol) = objective.grid(&weights, device);
    let path = out.join("samples").join(format!("step-{}.png", st.step));
    let grid = io::save_grid(&images, shape, ncol, &path)?;
    if let Some(ev) = events {
        ev.image(
            "samples",
            &grid.png,
            grid.height,
            grid.width,
            st.step as u64,
        )?;
    }
    Ok(path)
}

/// Running means between two TensorBoard scalar writes.
#[derive(Default)]
struct Window {
    steps: usize,
    loss: f64,
    seconds: f64,
    images: f64,
}

/// Trains the model family `cfg.model.architecture` names.
pub fn train(cfg: &Config, opts: &TrainOptions) -> Result<RunSummary, TrainError> {
    let arch = cfg.model.architecture;
    if arch.is_diffusion() {
        return train_diffusion(cfg, opts).map(|o| o.summary);
    }
    match arch {
        Architecture::Vqvae => train_with(cfg, opts, VqvaeObjective::new(cfg)).map(|o| o.summary),
        _ => {
            let objective = PixelCnnObjective::new(cfg, opts)?;
            train_with(cfg, opts, objective).map(|o| o.summary)
        }
    }
}

/// Trains a denoiser (`unet_2d` or `tutorial_unet`) with the diffusion loss.
pub fn train_diffusion(
    cfg: &Config,
    opts: &TrainOptions,
) -> Result<TrainOutcome<DenoiserModel>, TrainError> {
    train_with(cfg, opts, DiffusionObjective::new(cfg))
}

/// The devices of the run, resolved (`run.devices = "all"` asks CUDA how many there are), and
/// whether they are CUDA devices (so the ranks meet over NCCL).
pub fn run_devices(cfg: &Config) -> Result<(Vec<Device>, bool), TrainError> {
    refuse_multi_process_launch()?;
    let specs = match cfg.device_request().map_err(TrainError::Device)? {
        DeviceRequest::List(specs) => specs,
        DeviceRequest::AllCuda => all_cuda_devices()?,
    };
    let devices = specs
        .iter()
        .map(|s| make_device_spec(*s))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((devices, specs.iter().any(|s| s.is_cuda())))
}

/// A torchrun/accelerate-style launch (`WORLD_SIZE` > 1) would start several processes that each
/// train alone on the whole data: refuse it. burn 0.22.1's collectives only join the devices of
/// one process (docs/distributed.md, "Several machines").
fn refuse_multi_process_launch() -> Result<(), TrainError> {
    let world = std::env::var("WORLD_SIZE").ok();
    match world.as_deref().map(str::parse::<usize>) {
        Some(Ok(n)) if n > 1 => Err(TrainError::Device(format!(
            "WORLD_SIZE={n} is set (a torchrun/accelerate-style multi-process launch), but \
             difftrain trains data-parallel inside one process: start it once per machine with \
             run.devices = \"all\" (or a list). Several machines are not supported yet; see \
             docs/distributed.md"
        ))),
        _ => Ok(()),
    }
}

#[cfg(feature = "cuda")]
fn all_cuda_devices() -> Result<Vec<DeviceSpec>, TrainError> {
    // SAFETY: only tries to dlopen libcuda (what cubecl-cuda asks before counting).
    let count = if unsafe { cudarc::driver::sys::is_culib_present() } {
        cudarc::driver::CudaContext::device_count().unwrap_or(0) as usize
    } else {
        0
    };
    if count == 0 {
        return Err(TrainError::Device(
            "run.devices = \"all\" found no CUDA device (no driver, or CUDA_VISIBLE_DEVICES is empty)"
                .into(),
        ));
    }
    Ok((0..count).map(DeviceSpec::Cuda).collect())
}

#[cfg(not(feature = "cuda"))]
fn all_cuda_devices() -> Result<Vec<DeviceSpec>, TrainError> {
    Err(TrainError::NoCuda("all (run.devices)".into()))
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
/// there are several) and returns rank 0's outcome.
pub fn train_with<O>(
    cfg: &Config,
    opts: &TrainOptions,
    mut objective: O,
) -> Result<TrainOutcome<O::Model>, TrainError>
where
    O: Objective + Clone + Send,
    O::Model: Send,
{
    let started = Instant::now();
    let (devices, nccl) = run_devices(cfg)?;
    let out = cfg.output_dir();

    // Where the run starts: fresh, or a verified checkpoint.
    let start = checkpoint::resolve(&out, &cfg.checkpoint.resume)?;
    start.notes.iter().for_each(|n| eprintln!("{n}"));
    if opts.write_outputs {
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
    let dataset = Arc::new(Dataset::open(
        cfg.data.source,
        &cfg.data.path,
        cfg.data.on_bad_image,
    )?);
    objective.prepare(&dataset)?;

    // One state per replica, built here one after the other (weight init draws from a
    // thread-local RNG seeded from run.seed, so every replica starts from the same weights).
    let mut states = Vec::with_capacity(devices.len());
    for (rank, device) in devices.iter().enumerate() {
        let train_device = device.clone().autodiff();
        let st = match &start.checkpoint {
            Some(ck) => {
                let st = resumed_state(
                    &objective,
                    cfg,
                    ck,
                    dataset.len(),
                    &train_device,
                    opts.quiet || rank > 0,
                )?;
                if rank == 0 && !opts.quiet {
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
            None => fresh_state(&objective, cfg, &train_device),
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
    if devices.len() == 1 {
        let st = states.pop().expect("one state");
        objective.place(&devices[0]);
        return run_rank(
            &ctx,
            distributed::Replica::single(),
            objective,
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
    let inputs: Vec<_> = states
        .into_iter()
        .map(|st| (st, objective.clone()))
        .collect();
    let results = distributed::run_ranks(
        &devices,
        nccl,
        timeout,
        inputs,
        |replica, device, (st, mut objective)| {
            objective.place(device);
            run_rank(&ctx, replica, objective, st, device)
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
                errors.push(TrainError::Rank(format!("rank {rank} panicked: {m}")))
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

/// The one all-reduce of optimizer step `step`: the gradients (averaged), the loss (averaged)
/// and the objective's statistics (summed) travel in a single buffer.
fn all_reduce_step<O: Objective>(
    replica: &mut distributed::Replica,
    objective: &mut O,
    model: &O::Model,
    grads: GradientsParams,
    loss: f64,
    step: usize,
    device: &Device,
) -> Result<(GradientsParams, f64), TrainError> {
    let world = replica.world_size();
    let (flat, present) = grad::flatten(model, &grads, device);
    let n_grads = flat.dims()[0];
    let mut extra = vec![loss as f32];
    extra.extend(&present);
    extra.extend(objective.local_stats(replica.is_main()));
    let n_extra = extra.len();
    let packed = Tensor::cat(
        vec![
            flat,
            Tensor::from_data(TensorData::new(extra, [n_extra]), device),
        ],
        0,
    );
    let summed = replica.all_reduce_sum(packed, &format!("the all-reduce of step {step}"))?;
    let extra = summed
        .clone()
        .slice(n_grads..n_grads + n_extra)
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32 after convert");
    let (loss_sum, rest) = extra.split_first().expect("the loss is packed first");
    let (present, stats) = rest.split_at(present.len());
    let present: Vec<bool> = present.iter().map(|&p| p > 0.0).collect();
    objective.set_global_stats(stats, world);
    let mean = summed.slice(0..n_grads).mul_scalar(1.0 / world as f64);
    Ok((
        grad::unflatten(model, mean, &present),
        *loss_sum as f64 / world as f64,
    ))
}

/// One replica's loop, read top to bottom: open its shard of the data, then steps of
/// accumulate -> (all-reduce) -> clip -> optimizer step -> EMA -> log/sample/checkpoint.
/// Rank 0 alone writes; all ranks meet at a barrier after each write.
fn run_rank<O: Objective>(
    ctx: &RunContext,
    mut replica: distributed::Replica,
    mut objective: O,
    mut st: RunState<O::Model>,
    device: &Device,
) -> Result<TrainOutcome<O::Model>, TrainError> {
    let cfg = ctx.cfg;
    let train_device = device.clone().autodiff();
    let out = &ctx.out;
    let main = replica.is_main();
    let writes = ctx.opts.write_outputs && main;
    let quiet = ctx.opts.quiet || !main;
    let say = |msg: &str| {
        if !quiet {
            eprintln!("{msg}");
        }
    };
    let world = replica.world_size();
    let first_step = st.step;
    let transform = Transform {
        resolution: cfg.data.resolution,
        color: cfg.data.color,
        crop: cfg.data.crop,
        random_flip: cfg.data.random_flip,
    };
    let t = &cfg.train;
    let mut loader = Loader::spawn(
        ctx.dataset.clone(),
        transform,
        t.batch_size,
        cfg.run.seed,
        st.position,
        cfg.data.num_workers,
        cfg.data.prefetch_batches,
        cfg.data.on_bad_image,
        replica.shard(t.batch_size),
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

    let mut events = if writes && cfg.logging.tensorboard {
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

    while st.step < t.max_steps {
        let step_start = Instant::now();
        let lr = lr_sched.lr_at(st.step);
        let mut accumulator = GradientsAccumulator::new();
        let mut loss_sum = 0.0;
        let scale = 1.0 / accum_steps as f64;
        // Accumulate locally (PyTorch DDP's `no_sync`): nothing crosses ranks until the step.
        for _ in 0..accum_steps {
            let batch = loader.next_batch()?;
            let split = (t.batch_split > 1)
                .then(|| {
                    objective.split_grads(
                        &st.model,
                        &batch,
                        t.batch_split,
                        scale,
                        &mut st.rng,
                        &train_device,
                    )
                })
                .flatten();
            let (grads, value) = match split {
                Some(done) => done,
                None => {
                    let loss = objective
                        .loss(&st.model, &batch, &mut st.rng, &train_device)
                        .mul_scalar(scale);
                    let value = loss.clone().into_scalar::<f32>() as f64;
                    (
                        GradientsParams::from_grads(loss.backward(), &st.model),
                        value,
                    )
                }
            };
            loss_sum += value;
            accumulator.accumulate(&st.model, grads);
        }
        let mut grads = accumulator.grads();
        if world > 1 {
            (grads, loss_sum) = all_reduce_step(
                &mut replica,
                &mut objective,
                &st.model,
                grads,
                loss_sum,
                st.step + 1,
                device,
            )?;
        }
        let grad_norm = grad::clip_global_norm(&st.model, &mut grads, t.max_grad_norm);
        let apply = check_finite(st.step + 1, loss_sum, grad_norm, t.on_nonfinite)?;
        if apply {
            st.model = st.optim.step(lr, st.model, grads);
            if let Some(ema) = &mut st.ema {
                ema_decay = ema.step(&st.model.valid());
            }
        } else {
            st.skipped += 1;
        }
        st.model = objective.after_step(st.model, &mut st.rng);
        st.step += 1;
        st.position = loader.position();
        st.last_loss = loss_sum;
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
        if ctx.opts.write_outputs && (sampling || saving) {
            if writes && sampling {
                replica.doing(&format!("sampling at step {}", st.step));
                write_samples(&objective, &st, device, out, events.as_mut())?;
            }
            if writes && saving {
                replica.doing(&format!("writing checkpoint-{}", st.step));
                save_checkpoint(cfg, &st, ctx.dataset.len(), lr_sched.lr_at(st.step), out)?;
            }
            // The others wait for rank 0's writes (with the timeout), so none runs ahead into
            // the next all-reduce while rank 0 samples or saves.
            replica
                .barrier(&format!("the barrier after step {}'s writes", st.step))
                .map_err(TrainError::Sync)?;
        }
    }
    progress.finish();
    let bad_images = loader.bad_images.load(std::sync::atomic::Ordering::Relaxed);
    if bad_images > 0 {
        eprintln!("warning: {bad_images} image decode(s) failed during training and were replaced");
    }

    let (mut sample_grid, mut export_dir) = (None, None);
    if writes {
        replica.doing("writing the final samples and export");
        sample_grid = Some(write_samples(
            &objective,
            &st,
            device,
            out,
            events.as_mut(),
        )?);
        if cfg.export.enabled {
            let raw = st.model.valid();
            let dir = out.join("export");
            match &st.ema {
                Some(ema) => objective.export(&ema.shadow, Some(&raw), &dir)?,
                None => objective.export(&raw, None, &dir)?,
            }
            io::write_atomic(&dir.join(EXPORT_CONFIG), cfg.to_toml().as_bytes())?;
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
            skipped_steps: st.skipped,
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

pub fn grid_columns(n: usize) -> usize {
    (n as f64).sqrt().ceil() as usize
}

/// Samples `num` images with the config's sampler (or the overrides); returns host pixels in
/// [-1, 1] and their shape.
pub fn generate(
    model: &DenoiserModel,
    cfg: &Config,
    device: &Device,
    num: usize,
    steps: Option<usize>,
    sampler: Option<SamplerKind>,
    seed: u64,
) -> (Vec<f32>, [usize; 4]) {
    let s = &cfg.sample;
    let res = cfg.data.resolution;
    let shape = [num, cfg.image_channels(), res, res];
    let schedule = noise_schedule(cfg);
    let opts = SamplerOptions {
        kind: sampler.unwrap_or(s.sampler),
        num_inference_steps: steps.unwrap_or(s.num_inference_steps),
        prediction: cfg.diffusion.prediction_type,
        spacing: s.timestep_spacing,
        eta: s.eta,
        clip_sample: s.clip_sample.then_some(s.clip_sample_range),
        set_alpha_to_one: true,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut randn = move || {
        let v: Vec<f32> = (0..shape.iter().product::<usize>())
            .map(|_| rng.sample(StandardNormal))
            .collect();
        Tensor::<4>::from_data(TensorData::new(v, shape), device)
    };
    let initial = randn();
    let out = sampling::sample(model, &schedule, &opts, initial, &mut randn);
    let pixels = out
        .clamp(-1.0, 1.0)
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32 after convert");
    (pixels, shape)
}

/// diffusers `DDPMScheduler` config matching the run's schedule.
fn scheduler_json(cfg: &Config) -> serde_json::Value {
    let d = &cfg.diffusion;
    serde_json::json!({
        "_class_name": "DDPMScheduler",
        "_diffusers_version": "0.32.0",
        "num_train_timesteps": d.num_train_timesteps,
        "beta_start": d.beta_start,
        "beta_end": d.beta_end,
        "beta_schedule": d.beta_schedule,
        "prediction_type": d.prediction_type,
        "variance_type": "fixed_small",
        "clip_sample": cfg.sample.clip_sample,
        "clip_sample_range": cfg.sample.clip_sample_range,
        "timestep_spacing": match cfg.sample.timestep_spacing {
            TimestepSpacing::Leading => "leading",
            TimestepSpacing::Trailing => "trailing",
            TimestepSpacing::Linspace => "linspace",
        },
    })
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), TrainError> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialise");
    io::write_atomic(path, text.as_bytes()).map_err(TrainError::Io)
}

/// The file the run config is stored in, beside exported weights.
pub const EXPORT_CONFIG: &str = "difftrain.toml";

/// Writes the weights in the layout inference tools expect. For `unet_2d` that is a diffusers
/// `DDPMPipeline` folder (`model_index.json`, `unet/`, `scheduler/`). With EMA on, `model` is
/// the EMA weights (what diffusers' scripts export) and `raw` the training weights, written to
/// `unet_no_ema/` (or `tutorial_unet_no_ema/`).
pub fn export(
    model: &DenoiserModel,
    raw: Option<&DenoiserModel>,
    cfg: &Config,
    dir: &Path,
) -> Result<PathBuf, TrainError> {
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert(
        "difftrain_version".to_string(),
        env!("CARGO_PKG_VERSION").to_string(),
    );
    let weights: Vec<(&DenoiserModel, &str)> = std::iter::once((model, ""))
        .chain(raw.map(|r| (r, "_no_ema")))
        .collect();
    match model {
        DenoiserModel::Unet2d(_) => {
            for (m, suffix) in weights {
                let sub = dir.join(format!("unet{suffix}"));
                let mut meta = meta.clone();
                meta.insert(
                    "difftrain_weights".into(),
                    if suffix.is_empty() && raw.is_some() {
                        "ema"
                    } else {
                        "training"
                    }
                    .into(),
                );
                io::save_safetensors(
                    &sub.join("diffusion_pytorch_model.safetensors"),
                    &io::named_tensors(m),
                    &meta,
                )?;
                write_json(
                    &sub.join("config.json"),
                    &cfg.model.unet.to_diffusers_json(),
                )?;
            }
            write_json(
                &dir.join("scheduler/scheduler_config.json"),
                &scheduler_json(cfg),
            )?;
            write_json(
                &dir.join("model_index.json"),
                &serde_json::json!({
                    "_class_name": "DDPMPipeline",
                    "_diffusers_version": "0.32.0",
                    "scheduler": ["diffusers", "DDPMScheduler"],
                    "unet": ["diffusers", "UNet2DModel"],
                }),
            )?;
        }
        DenoiserModel::TutorialUnet(_) => {
            for (m, suffix) in weights {
                io::save_safetensors(
                    &dir.join(format!("tutorial_unet{suffix}/model.safetensors")),
                    &io::named_tensors(m),
                    &meta,
                )?;
            }
        }
    }
    Ok(dir.to_path_buf())
}

/// Where the weights of an export folder live.
pub fn export_weights_path(cfg: &Config, dir: &Path) -> PathBuf {
    match cfg.model.architecture {
        Architecture::Unet2d => dir.join("unet/diffusion_pytorch_model.safetensors"),
        Architecture::TutorialUnet => dir.join("tutorial_unet/model.safetensors"),
        Architecture::Vqvae => dir.join("vqvae/model.safetensors"),
        Architecture::GatedPixelcnn => dir.join("pixelcnn/model.safetensors"),
    }
}

/// The folder holding a run's `difftrain.toml`, and the weights file when it is a checkpoint:
/// `dir` may be a `checkpoint-<N>` directory (its EMA weights when it has them), an export
/// folder, or a run's output_dir (its `export/`, else the checkpoint `latest` names).
pub fn locate(dir: &Path) -> Result<(PathBuf, Option<PathBuf>), TrainError> {
    let from_checkpoint = |ck: &Path| -> Result<(PathBuf, Option<PathBuf>), TrainError> {
        // Sizes and checksums are verified before the files are trusted.
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
        return from_checkpoint(dir);
    }
    for candidate in [dir.to_path_buf(), dir.join("export")] {
        if candidate.join(EXPORT_CONFIG).is_file() {
            return Ok((candidate, None));
        }
    }
    if let Some((_, ck)) = checkpoint::read_latest(dir) {
        return from_checkpoint(&ck);
    }
    Err(TrainError::NotARun(dir.to_path_buf()))
}

/// Loads a run's config and weights from anything [`locate`] accepts.
pub fn load_run<M: Module>(
    dir: &Path,
    overrides: &[String],
    build: impl FnOnce(&Config) -> M,
) -> Result<(Config, M, PathBuf), TrainError> {
    let (root, weights) = locate(dir)?;
    let cfg = Config::load(&root.join(EXPORT_CONFIG), overrides)?;
    let (model, weights) = load_weights(&cfg, &root, weights, build)?;
    Ok((cfg, model, weights))
}

/// The weights [`locate`] found under `root` (`weights`, or the export layout of `cfg`), loaded
/// strictly into the model `build` makes. Returns the file read.
pub fn load_weights<M: Module>(
    cfg: &Config,
    root: &Path,
    weights: Option<PathBuf>,
    build: impl FnOnce(&Config) -> M,
) -> Result<(M, PathBuf), TrainError> {
    let weights = weights.unwrap_or_else(|| export_weights_path(cfg, root));
    let tensors = io::load_safetensors(&weights)?;
    let model = io::load_into(build(cfg), &tensors, &weights)?;
    Ok((model, weights))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn std(v: &[f64]) -> f64 {
        let m = v.iter().sum::<f64>() / v.len() as f64;
        (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
    }

    #[test]
    fn noise_offset_and_input_perturbation_statistics() {
        // noise = randn + 0.2 * randn(B, C, 1, 1): a channel's spatial mean has variance
        // 1/(h*w) + 0.2^2 (std 0.2095 at 16x16, vs 0.0625 without the offset).
        // input noise = noise + 0.1 * randn: the difference has std 0.1; the target stays `noise`.
        let mut cfg = Config::default();
        cfg.diffusion.noise_offset = 0.2;
        cfg.diffusion.input_perturbation = 0.1;
        let schedule = noise_schedule(&cfg);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let d = draw_noise(&cfg, &schedule, [128, 3, 16, 16], &mut rng);
        let channel_means: Vec<f64> = d
            .noise
            .chunks(256)
            .map(|c| c.iter().map(|&v| v as f64).sum::<f64>() / 256.0)
            .collect();
        let s = std(&channel_means);
        assert!((0.18..0.24).contains(&s), "channel-mean std {s}");
        let diff: Vec<f64> = d
            .input_noise
            .iter()
            .zip(&d.noise)
            .map(|(a, b)| (a - b) as f64)
            .collect();
        let s = std(&diff);
        assert!((0.095..0.105).contains(&s), "perturbation std {s}");
        assert!(d.timesteps.iter().all(|&t| (0.0..1000.0).contains(&t)));
    }

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
