//! The run configuration: strict TOML, `--set section.key=value` overrides, cross-field checks.
//!
//! Parsing happens once into [`Config`]; every section denies unknown keys, so a typo is an
//! error naming the file, line, column and the accepted keys. [`Config::problems`] then checks
//! rules that span fields and reports all of them together before any compute starts.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::DataConfig;
use crate::device::{DeviceRequest, DeviceSpec};
use crate::diffusion::DiffusionConfig;
use crate::models::latent_diffusion::{
    AutoencoderTrainConfig, ConditioningConfig, LatentDiffusionConfig,
};
use crate::models::pixelcnn::GatedPixelCNNConfig;
use crate::models::tutorial_unet::TutorialUNetConfig;
use crate::models::unet_2d::UNet2DConfig;
use crate::models::vqvae::VQVAEConfig;
use crate::models::{Architecture, Family};
use crate::optim::ema::EmaConfig;
use crate::resume::{Change, ResumeRules, every_key};

mod sections;

pub use sections::{
    CheckpointConfig, ExportConfig, LoggingConfig, OnNonFinite, Resume, RunConfig, SampleConfig,
    TrainConfig,
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}")]
    Spelling {
        path: PathBuf,
        #[source]
        source: crate::models::latent_diffusion::BothSpellings,
    },
    #[error("--set {assignment}: {message}")]
    Override { assignment: String, message: String },
    #[error("{path}: invalid configuration:\n  - {}", problems.join("\n  - "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub run: RunConfig,
    pub data: DataConfig,
    pub model: ModelConfig,
    pub diffusion: DiffusionConfig,
    pub train: TrainConfig,
    pub sample: SampleConfig,
    pub export: ExportConfig,
    pub logging: LoggingConfig,
    pub checkpoint: CheckpointConfig,
    pub ema: EmaConfig,
    /// `architecture = "sd_lora"`: the adapters.
    pub lora: crate::lora::LoraConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub unet: UNet2DConfig,
    pub tutorial: TutorialUNetConfig,
    pub vqvae: VQVAEConfig,
    pub pixelcnn: GatedPixelCNNConfig,
    /// `architecture = "autoencoder_kl"`.
    pub autoencoder: AutoencoderTrainConfig,
    /// `architecture = "latent_diffusion"`.
    pub ldm: LatentDiffusionConfig,
    /// What latent diffusion is conditioned on (`kind = "none" | "class" | "text"`).
    pub conditioning: ConditioningConfig,
    /// `architecture = "sd_lora"`: the Stable Diffusion model to adapt, a diffusers folder or
    /// a single `.safetensors` file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pretrained: Option<PathBuf>,
    /// For a single-file `pretrained`: a diffusers folder of the same model to take the
    /// tokenizer and configs from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pretrained_config: Option<PathBuf>,
    /// A config that trains `pretrained` first when it does not exist yet (e.g. the latent
    /// diffusion quickstart as the base of `configs/mountain_tiny.toml`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pretrained_train_config: Option<PathBuf>,
}

impl ModelConfig {
    /// The architecture's own rules and how it must agree with the data.
    pub fn problems(&self, data: &DataConfig) -> Vec<String> {
        let mut p = Vec::new();
        let (res, ch) = (data.resolution, data.channels());
        let color = |what: String| {
            format!(
                "{what} but data.color = {:?} gives {ch} channels",
                data.color
            )
        };
        let size = |what: &str, size: usize| {
            (size != res)
                .then(|| format!("{what} = {size} but data.resolution = {res}; they must match"))
        };
        match self.architecture {
            Architecture::Unet2d => {
                let u = &self.unet;
                p.extend(u.problems());
                p.extend(size("model.unet.sample_size", u.sample_size));
                if u.in_channels != ch || u.out_channels != ch {
                    p.push(color(format!(
                        "model.unet in_channels/out_channels = {}/{}",
                        u.in_channels, u.out_channels
                    )));
                }
            }
            Architecture::TutorialUnet => {
                let t = &self.tutorial;
                p.extend(t.problems());
                p.extend(size("model.tutorial.image_size", t.image_size));
                if t.in_channels != ch {
                    p.push(color(format!(
                        "model.tutorial.in_channels = {}",
                        t.in_channels
                    )));
                }
            }
            Architecture::Vqvae => {
                let v = &self.vqvae;
                p.extend(v.problems(res));
                if v.in_channels != ch {
                    p.push(color(format!(
                        "model.vqvae.in_channels = {}",
                        v.in_channels
                    )));
                }
            }
            Architecture::GatedPixelcnn => p.extend(self.pixelcnn.problems()),
            Architecture::AutoencoderKl => p.extend(self.autoencoder.problems(res, ch)),
            Architecture::LatentDiffusion => p.extend(self.ldm.problems(&self.conditioning)),
            Architecture::SdLora => {
                if self.pretrained.is_none() {
                    p.push(
                        "model.architecture = \"sd_lora\" needs model.pretrained: a Stable \
                         Diffusion diffusers folder (e.g. models/stable-diffusion-v1-5) or \
                         single .safetensors file"
                            .into(),
                    );
                }
            }
        }
        p
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            architecture: Architecture::Unet2d,
            unet: UNet2DConfig::default(),
            tutorial: TutorialUNetConfig::default(),
            vqvae: VQVAEConfig::default(),
            pixelcnn: GatedPixelCNNConfig::default(),
            autoencoder: AutoencoderTrainConfig::default(),
            ldm: LatentDiffusionConfig::default(),
            conditioning: ConditioningConfig::default(),
            pretrained: None,
            pretrained_config: None,
            pretrained_train_config: None,
        }
    }
}

impl ResumeRules for ModelConfig {
    /// Any change: the checkpoint's weights belong to the model it describes.
    fn breaks_resume(&self, old: &Self, prefix: &str) -> Vec<Change> {
        every_key(prefix, old, self, "changes the model")
    }
}

fn parse_error(path: &Path, err: toml::de::Error) -> ConfigError {
    ConfigError::Parse {
        path: path.to_path_buf(),
        message: err.to_string().trim_end().to_string(),
    }
}

/// Parses the right-hand side of `--set` as a TOML value; bare words become strings.
fn parse_override_value(text: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {text}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(text.to_string()))
}

fn apply_override(root: &mut toml::Table, assignment: &str) -> Result<(), ConfigError> {
    let err = |message: String| ConfigError::Override {
        assignment: assignment.into(),
        message,
    };
    let (key, value) = assignment
        .split_once('=')
        .ok_or_else(|| err("expected section.key=value".into()))?;
    let parts: Vec<&str> = key.trim().split('.').collect();
    if parts.len() < 2 || parts.iter().any(|p| p.is_empty()) {
        return Err(err(format!("{key:?} is not of the form section.key")));
    }
    let mut table = root;
    for part in &parts[..parts.len() - 1] {
        let entry = table
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| err(format!("{part:?} is a value, not a section")))?;
    }
    let value = value.trim();
    // A value that starts like a TOML string or array must be one: `run.name="abc` (a lost
    // closing quote) is an error, not the literal `"abc`.
    if value.starts_with(['"', '\'', '['])
        && toml::from_str::<toml::Table>(&format!("v = {value}")).is_err()
    {
        return Err(err(format!(
            "{value} is not a valid TOML value (an unclosed quote or bracket?)"
        )));
    }
    // An inline table merges key by key into the table the file has, as writing those keys
    // in the file would (`--set 'model.unet={sample_size=16}'` keeps the other keys).
    let name = parts[parts.len() - 1].to_string();
    match (table.get_mut(&name), parse_override_value(value)) {
        (Some(toml::Value::Table(old)), toml::Value::Table(new)) => merge_tables(old, new),
        (_, v) => {
            table.insert(name, v);
        }
    }
    Ok(())
}

/// `new`'s keys into `old`, recursing into tables both have.
fn merge_tables(old: &mut toml::Table, new: toml::Table) {
    for (k, v) in new {
        match (old.get_mut(&k), v) {
            (Some(toml::Value::Table(o)), toml::Value::Table(n)) => merge_tables(o, n),
            (_, v) => {
                old.insert(k, v);
            }
        }
    }
}

/// Every float of the resolved config that is not finite, by key (TOML allows `nan` and `inf`;
/// no setting means either).
fn non_finite_floats(prefix: &str, value: &toml::Value, out: &mut Vec<String>) {
    match value {
        toml::Value::Float(f) if !f.is_finite() => {
            out.push(format!("{prefix} = {f} must be a finite number"))
        }
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                non_finite_floats(&key, v, out);
            }
        }
        toml::Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                non_finite_floats(&format!("{prefix}[{i}]"), v, out);
            }
        }
        _ => {}
    }
}

/// Why `run.name` cannot name a run: it becomes a folder (`checkpoints/<name>`) and the kohya
/// export's file name (`<name>.safetensors`, listed by ComfyUI and A1111), so it must be one
/// plain file name on every filesystem those tools run on.
fn bad_run_name(name: &str) -> Option<String> {
    const RESERVED: [char; 9] = ['/', '\\', ':', '*', '?', '"', '<', '>', '|'];
    if name.is_empty() {
        return Some("must not be empty".into());
    }
    if name == "." || name == ".." || name.starts_with('.') {
        return Some("must not start with a dot (hidden files, `..`)".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| RESERVED.contains(c) || c.is_control())
    {
        return Some(format!(
            "holds {c:?}: a run name is one file name (no path separators, none of \
             \\/:*?\"<>| or control characters)"
        ));
    }
    if name.ends_with(' ') || name.ends_with('.') {
        return Some("must not end with a space or a dot (Windows drops them)".into());
    }
    None
}

impl Config {
    /// Reads `path`, applies `overrides` (`section.key=value`, in order) and validates.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let (mut config, read_notes) = Self::parse_with_notes(path, &text, overrides)?;
        for note in read_notes {
            eprintln!("note: {}: {note}", path.display());
        }
        for note in config.adjust() {
            eprintln!("note: {note}");
        }
        let mut problems = config.problems();
        if !problems.is_empty() && !overrides.is_empty() {
            // The file is not to blame for values given on the command line.
            problems.push(format!(
                "(the values above include the command line's --set {})",
                overrides.join(", --set ")
            ));
        }
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                problems,
            })
        }
    }

    /// Parses without the cross-field checks (used by `load` and by tests).
    pub fn parse(path: &Path, text: &str, overrides: &[String]) -> Result<Self, ConfigError> {
        Self::parse_with_notes(path, text, overrides).map(|(c, _)| c)
    }

    /// [`Config::parse`], with notes on older spellings it read (`[model.ldm.unet]`).
    fn parse_with_notes(
        path: &Path,
        text: &str,
        overrides: &[String],
    ) -> Result<(Self, Vec<String>), ConfigError> {
        // First pass on the text itself, so errors carry line and column.
        let mut config: Config = toml::from_str(text).map_err(|e| parse_error(path, e))?;
        let mut root: toml::Table = toml::from_str(text).map_err(|e| parse_error(path, e))?;
        if !overrides.is_empty() {
            for assignment in overrides {
                apply_override(&mut root, assignment)?;
                // Re-validate after each one so the error names the assignment that broke it.
                Config::deserialize(toml::Value::Table(root.clone())).map_err(|e| {
                    ConfigError::Override {
                        assignment: assignment.clone(),
                        message: e.to_string().trim_end().to_string(),
                    }
                })?;
            }
            config = Config::deserialize(toml::Value::Table(root.clone())).map_err(|e| {
                ConfigError::Parse {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                }
            })?;
        }
        let backbone_given = root
            .get("model")
            .and_then(|m| m.get("ldm"))
            .and_then(|l| l.get("backbone"))
            .is_some();
        let notes =
            config
                .model
                .ldm
                .migrate(backbone_given)
                .map_err(|source| ConfigError::Spelling {
                    path: path.to_path_buf(),
                    source,
                })?;
        Ok((config, notes.into_iter().map(String::from).collect()))
    }

    pub fn output_dir(&self) -> PathBuf {
        self.run
            .output_dir
            .clone()
            .unwrap_or_else(|| Path::new("checkpoints").join(&self.run.name))
    }

    /// The channel count images have after loading.
    pub fn image_channels(&self) -> usize {
        self.data.channels()
    }

    /// The devices of the run: `run.devices` when set, else `[run.device]`.
    pub fn device_request(&self) -> Result<DeviceRequest, crate::device::DeviceError> {
        DeviceRequest::parse(&self.run.device, self.run.devices.as_ref())
    }

    /// Settings that are adjusted rather than refused, with what was done. A warmup longer
    /// than the run (a common quick try: `--set train.max_steps=30` on a config with 40 warmup
    /// steps) is clamped to the run.
    pub fn adjust(&mut self) -> Vec<String> {
        let mut notes = Vec::new();
        let t = &mut self.train;
        if t.lr_warmup_steps > t.max_steps {
            notes.push(format!(
                "train.lr_warmup_steps = {} exceeds train.max_steps = {}; warming up over all {} steps",
                t.lr_warmup_steps, t.max_steps, t.max_steps
            ));
            t.lr_warmup_steps = t.max_steps;
        }
        notes
    }

    /// A lower bound of the memory one training step needs: the micro-batch at the data
    /// resolution through the first level of the model (kept for the backward pass), in bytes.
    /// Catches sizes that cannot fit before anything is allocated.
    pub fn step_memory_lower_bound(&self) -> u64 {
        let res = self.data.resolution as u64;
        let per_device_batch = self.train.batch_size as u64;
        let width = match self.model.architecture {
            crate::models::Architecture::Unet2d => {
                self.model
                    .unet
                    .block_out_channels
                    .first()
                    .copied()
                    .unwrap_or(32) as u64
                    * 4
            }
            _ => 3,
        };
        let activations = per_device_batch * res * res * (self.data.channels() as u64 + width) * 4;
        activations.saturating_add(self.trained_weights_lower_bound())
    }

    /// A lower bound on the bytes the trained weights take with their gradients and AdamW's
    /// two moments (4 f32 copies): each level of a U-Net or autoencoder has at least
    /// `layers_per_block` ResNet blocks of two 3x3 convolutions at its width (18·c² weights).
    /// 0 for families this does not estimate (LoRA's adapters, the small VQ models).
    pub fn trained_weights_lower_bound(&self) -> u64 {
        use crate::models::Architecture as A;
        let m = &self.model;
        let (channels, layers) = match m.architecture {
            A::Unet2d => (&m.unet.block_out_channels, m.unet.layers_per_block),
            A::AutoencoderKl => (
                &m.autoencoder.vae.block_out_channels,
                m.autoencoder.vae.layers_per_block,
            ),
            A::LatentDiffusion => match m.ldm.backbone.as_unet() {
                Some(u) => (&u.block_out_channels, u.layers_per_block),
                None => return 0,
            },
            _ => return 0,
        };
        let params = channels.iter().fold(0u64, |sum, &c| {
            let per_level = 18u64.saturating_mul((c as u64).saturating_pow(2));
            sum.saturating_add(per_level.saturating_mul(layers.max(1) as u64))
        });
        params.saturating_mul(4 * 4)
    }

    /// Rules spanning several fields; every violation, not just the first.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if let Some(why) = bad_run_name(&self.run.name) {
            p.push(format!("run.name = {:?} {why}", self.run.name));
        }
        if let Ok(value) = toml::Value::try_from(self) {
            non_finite_floats("", &value, &mut p);
        }
        // The output folder inside the data: sample grids would become training images.
        let (out, data) = (
            crate::io::resolved(&self.output_dir()),
            crate::io::resolved(&self.data.path),
        );
        if self.data.source == crate::data::DataSource::ImageFolder && out.starts_with(&data) {
            p.push(format!(
                "run.output_dir = {} is inside data.path = {}: its sample grids would become \
                 training images; write the run elsewhere",
                self.output_dir().display(),
                self.data.path.display()
            ));
        }
        if let Err(e) = DeviceSpec::parse(&self.run.device) {
            p.push(format!("run.device = {e}"));
        }
        match self.device_request() {
            Err(_) if self.run.devices.is_none() => {} // run.device, reported above
            Err(e) => p.push(e.to_string()),
            Ok(DeviceRequest::List(specs)) if specs.len() > 1 => {
                let world = specs.len();
                let b = self.train.batch_size;
                if !b.is_multiple_of(world) {
                    p.push(format!(
                        "train.batch_size = {b} is the global batch; it must divide evenly over the \
                         {world} devices of run.devices"
                    ));
                } else if !(b / world).is_multiple_of(self.train.batch_split) {
                    p.push(format!(
                        "train.batch_split = {} must divide each device's share of the batch \
                         (train.batch_size {b} / {world} devices = {})",
                        self.train.batch_split,
                        b / world
                    ));
                }
            }
            Ok(_) => {}
        }
        if !(self.run.sync_timeout_secs > 0.0 && self.run.sync_timeout_secs.is_finite()) {
            p.push(format!(
                "run.sync_timeout_secs = {} must be a positive finite number",
                self.run.sync_timeout_secs
            ));
        }
        p.extend(self.data.problems());
        p.extend(self.model.problems(&self.data));
        p.extend(self.diffusion.problems());
        let t = &self.train;
        if t.max_steps == 0 {
            p.push("train.max_steps must be at least 1".into());
        }
        if t.batch_size == 0 {
            p.push("train.batch_size must be at least 1".into());
        }
        if t.gradient_accumulation_steps == 0 {
            p.push("train.gradient_accumulation_steps must be at least 1".into());
        }
        if !(t.learning_rate > 0.0 && t.learning_rate.is_finite()) {
            p.push(format!(
                "train.learning_rate = {} must be a positive finite number",
                t.learning_rate
            ));
        }
        if self.sample.num_images == 0 {
            p.push("sample.num_images must be at least 1 (the grids written during and after training)".into());
        }
        if !(0.0..1.0).contains(&t.adam_beta1) || !(0.0..1.0).contains(&t.adam_beta2) {
            p.push("train.adam_beta1 and train.adam_beta2 must be in [0, 1)".into());
        }
        if t.batch_split == 0 || !t.batch_size.is_multiple_of(t.batch_split.max(1)) {
            p.push(format!(
                "train.batch_split = {} must be at least 1 and divide train.batch_size = {}",
                t.batch_split, t.batch_size
            ));
        }
        if self.model.architecture == Architecture::SdLora {
            p.extend(self.lora.problems());
        }
        if self.data.cache_latents
            && !matches!(
                self.model.architecture,
                Architecture::LatentDiffusion | Architecture::SdLora
            )
        {
            p.push(format!(
                "data.cache_latents applies to latent_diffusion runs (latents of a frozen first \
                 stage), not {:?}",
                self.model.architecture
            ));
        }
        if t.batch_split > 1
            && !matches!(
                self.model.architecture.family(),
                Family::Diffusion | Family::LatentDiffusion | Family::Lora
            )
        {
            p.push(format!(
                "train.batch_split is built for the diffusion denoisers and latent diffusion \
                 only, not {:?}",
                self.model.architecture
            ));
        }
        if !(t.fp16_init_scale.is_finite() && t.fp16_init_scale > 0.0) {
            p.push(format!(
                "train.fp16_init_scale = {} must be a positive number (torch's default is 65536)",
                t.fp16_init_scale
            ));
        }
        if t.fp16_growth_interval == 0 {
            p.push("train.fp16_growth_interval must be >= 1 (torch's default is 2000)".into());
        }
        if t.max_grad_norm < 0.0 {
            p.push("train.max_grad_norm must be >= 0 (0 disables clipping)".into());
        }
        let s = &self.sample;
        let timesteps = self.diffusion.num_train_timesteps;
        if s.num_inference_steps == 0 || s.num_inference_steps > timesteps {
            p.push(format!(
                "sample.num_inference_steps = {} must be in 1..={timesteps}",
                s.num_inference_steps
            ));
        }
        if s.eta < 0.0 {
            p.push("sample.eta must be >= 0".into());
        }
        if !(s.temperature.is_finite() && s.temperature > 0.0) {
            p.push(format!(
                "sample.temperature = {} must be a positive finite number",
                s.temperature
            ));
        }
        if self.logging.log_every == 0 {
            p.push("logging.log_every must be at least 1".into());
        }
        p.extend(self.ema.problems());
        p
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot serialise config: {e}\n"))
    }
}

impl ResumeRules for Config {
    /// Every section's rules (destructured, so a new section is a compile error here until
    /// its rules are written). `[lora]` counts only for LoRA runs.
    fn breaks_resume(&self, old: &Self, _prefix: &str) -> Vec<Change> {
        let Config {
            run,
            data,
            model,
            diffusion,
            train,
            sample,
            export,
            logging,
            checkpoint,
            ema,
            lora,
        } = self;
        let mut changes = run.breaks_resume(&old.run, "run");
        changes.extend(data.breaks_resume(&old.data, "data"));
        changes.extend(model.breaks_resume(&old.model, "model"));
        changes.extend(diffusion.breaks_resume(&old.diffusion, "diffusion"));
        changes.extend(train.breaks_resume(&old.train, "train"));
        changes.extend(sample.breaks_resume(&old.sample, "sample"));
        changes.extend(export.breaks_resume(&old.export, "export"));
        changes.extend(logging.breaks_resume(&old.logging, "logging"));
        changes.extend(checkpoint.breaks_resume(&old.checkpoint, "checkpoint"));
        changes.extend(ema.breaks_resume(&old.ema, "ema"));
        if old.model.architecture == Architecture::SdLora {
            changes.extend(lora.breaks_resume(&old.lora, "lora"));
        }
        changes
    }
}

#[cfg(test)]
mod tests;
