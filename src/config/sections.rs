//! The sections of the run config that configure the loop itself (`[run]`, `[train]`,
//! `[sample]`, `[export]`, `[logging]`, `[checkpoint]`), each with its resume rules. The
//! sections of the parts they configure live beside those parts (`[data]` in `data`, `[model]`'s
//! architectures in `models`, `[diffusion]` in `diffusion`, `[ema]` in `optim`, `[lora]` in
//! `lora`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::device::DeviceList;
use crate::diffusion::sampling::{SamplerKind, TimestepSpacing};
use crate::optim::lr::LrSchedule;
use crate::optim::precision::MixedPrecision;
use crate::resume::{Change, ResumeRules, field};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    pub name: String,
    /// Defaults to `checkpoints/<name>`.
    pub output_dir: Option<PathBuf>,
    pub seed: u64,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Data parallelism: `["cuda:0", "cuda:1"]`, `"all"` (every visible CUDA device) or CPU
    /// worker threads `["cpu:0", "cpu:1"]`. Unset: one replica on `device`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub devices: Option<DeviceList>,
    /// How long a data-parallel rank waits for the others at a collective or barrier (seconds)
    /// before failing with the name of the rank it waits for.
    pub sync_timeout_secs: f64,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            name: "run".into(),
            output_dir: None,
            seed: 0,
            device: "cpu".into(),
            devices: None,
            sync_timeout_secs: 600.0,
        }
    }
}

impl ResumeRules for RunConfig {
    fn breaks_resume(&self, old: &Self, prefix: &str) -> Vec<Change> {
        field(
            prefix,
            "seed",
            &old.seed,
            &self.seed,
            "changes the data order and every random draw",
        )
        .into_iter()
        .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnNonFinite {
    /// Stop the run with an error naming the step.
    Error,
    /// Skip the optimizer step, leave the weights untouched, and go on.
    Skip,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimizer steps (one step = `gradient_accumulation_steps` micro-batches).
    pub max_steps: usize,
    /// Images per micro-batch.
    pub batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub learning_rate: f64,
    pub lr_scheduler: LrSchedule,
    pub lr_warmup_steps: usize,
    /// AdamW, with PyTorch's defaults (burn's differ: eps 1e-5, weight decay 1e-4).
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub adam_weight_decay: f64,
    /// Global-norm clipping like `torch.nn.utils.clip_grad_norm_`; `0` disables.
    pub max_grad_norm: f64,
    pub on_nonfinite: OnNonFinite,
    /// With `on_nonfinite = "skip"`: stop with an error after this many consecutive skipped
    /// steps (0 = never).
    pub max_consecutive_skips: usize,
    pub mixed_precision: MixedPrecision,
    /// fp16's loss scaler (accelerate's `GradScalerKwargs`): the initial scale and the clean
    /// steps after which it doubles.
    pub fp16_init_scale: f64,
    pub fp16_growth_interval: usize,
    /// Compute each micro-batch as this many equal slices on as many threads, each on a replica
    /// of the weights (diffusion denoisers). Same numbers as 1 up to float summation order;
    /// on CPU it keeps more cores busy (see docs/benchmarks.md).
    pub batch_split: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            max_steps: 1000,
            batch_size: 16,
            gradient_accumulation_steps: 1,
            learning_rate: 1e-4,
            lr_scheduler: LrSchedule::Constant,
            lr_warmup_steps: 0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            adam_weight_decay: 1e-2,
            max_grad_norm: 1.0,
            on_nonfinite: OnNonFinite::Error,
            max_consecutive_skips: 20,
            mixed_precision: MixedPrecision::No,
            fp16_init_scale: 65536.0,
            fp16_growth_interval: 2000,
            batch_split: 1,
        }
    }
}

impl ResumeRules for TrainConfig {
    /// The batches: the loader's position and the random stream count micro-batches of this
    /// size. Everything else (steps, learning rate, clipping, precision...) may change.
    fn breaks_resume(&self, old: &Self, prefix: &str) -> Vec<Change> {
        let why = "changes the batches the checkpoint's position counts";
        [
            field(prefix, "batch_size", &old.batch_size, &self.batch_size, why),
            field(
                prefix,
                "gradient_accumulation_steps",
                &old.gradient_accumulation_steps,
                &self.gradient_accumulation_steps,
                why,
            ),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SampleConfig {
    pub num_images: usize,
    pub num_inference_steps: usize,
    pub sampler: SamplerKind,
    pub eta: f64,
    pub timestep_spacing: TimestepSpacing,
    /// Clamp predicted x0 to `[-clip_sample_range, clip_sample_range]` (diffusers default on).
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    pub seed: u64,
    /// PixelCNN: logits are divided by this before sampling each code (1 = the model's
    /// distribution, lower = more conservative).
    pub temperature: f64,
    /// Latent diffusion: classifier-free guidance scale of the grids (1 = no guidance).
    pub guidance_scale: f64,
    /// Latent diffusion with text: the prompts of the grids, one row each (default: the first
    /// distinct captions of the data).
    pub prompts: Vec<String>,
}

impl Default for SampleConfig {
    fn default() -> Self {
        Self {
            num_images: 16,
            num_inference_steps: 50,
            sampler: SamplerKind::Ddim,
            eta: 0.0,
            timestep_spacing: TimestepSpacing::Leading,
            clip_sample: true,
            clip_sample_range: 1.0,
            seed: 0,
            temperature: 1.0,
            guidance_scale: 7.5,
            prompts: Vec::new(),
        }
    }
}

impl ResumeRules for SampleConfig {
    /// Nothing a checkpoint depends on: every field may change on resume.
    fn breaks_resume(&self, _old: &Self, _prefix: &str) -> Vec<Change> {
        Vec::new()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExportConfig {
    /// Write `<output_dir>/export/` at the end of training.
    pub enabled: bool,
}

impl Default for ExportConfig {
    fn default() -> Self {
        Self { enabled: true }
    }
}

impl ResumeRules for ExportConfig {
    /// Nothing a checkpoint depends on: every field may change on resume.
    fn breaks_resume(&self, _old: &Self, _prefix: &str) -> Vec<Change> {
        Vec::new()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoggingConfig {
    /// Progress line and TensorBoard scalars every N optimizer steps.
    pub log_every: usize,
    /// Sample grid (PNG + TensorBoard image) every N optimizer steps; 0 = only at the end.
    pub sample_every: usize,
    /// Write TensorBoard event files under `<output_dir>/logs/`.
    pub tensorboard: bool,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            log_every: 25,
            sample_every: 0,
            tensorboard: true,
        }
    }
}

impl ResumeRules for LoggingConfig {
    /// Nothing a checkpoint depends on: every field may change on resume.
    fn breaks_resume(&self, _old: &Self, _prefix: &str) -> Vec<Change> {
        Vec::new()
    }
}

/// Which checkpoint a run starts from: `"none"`, `"latest"` (in the output dir) or a path.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum Resume {
    #[default]
    None,
    Latest,
    Path(PathBuf),
}

impl From<String> for Resume {
    fn from(s: String) -> Self {
        match s.as_str() {
            "none" | "" => Self::None,
            "latest" => Self::Latest,
            _ => Self::Path(PathBuf::from(s)),
        }
    }
}

impl From<Resume> for String {
    fn from(r: Resume) -> Self {
        match r {
            Resume::None => "none".into(),
            Resume::Latest => "latest".into(),
            Resume::Path(p) => p.display().to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Write `<output_dir>/checkpoint-<step>/` every N optimizer steps (and at the last step);
    /// 0 disables checkpoints.
    pub every_steps: usize,
    /// Keep only the newest N checkpoints; 0 keeps all.
    pub keep_last: usize,
    pub resume: Resume,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            every_steps: 500,
            keep_last: 3,
            resume: Resume::None,
        }
    }
}

impl ResumeRules for CheckpointConfig {
    /// Nothing a checkpoint depends on: every field may change on resume.
    fn breaks_resume(&self, _old: &Self, _prefix: &str) -> Vec<Change> {
        Vec::new()
    }
}
