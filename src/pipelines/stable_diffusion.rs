//! Loading a Stable Diffusion model, as diffusers' `StableDiffusionPipeline.from_pretrained` /
//! `from_single_file` do: a diffusers folder (`model_index.json`, `unet/`, `vae/`,
//! `text_encoder/`, `tokenizer/`, `scheduler/`; f32 or `fp16` variant safetensors) or one
//! original-layout `.safetensors` file plus a folder for its tokenizer and configs.
//!
//! Weights are read tensor by tensor into models built without random draws, so loading holds
//! about one copy of the weights. Missing parts are reported together, with what to download.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::prelude::*;

use crate::diffusion::scheduler_config::SchedulerConfig;
use crate::io::base_model::BaseModel;
use crate::io::config_json::ConfigJsonError;
use crate::io::keys::{self, View};
use crate::io::layout::{self as files, component_name};
use crate::io::safetensors::{self, SafetensorsFile, TensorSource};
use crate::io::single_file::{self, UNetLayout};
use crate::io::{self, IoError};
use crate::models::autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig};
use crate::models::clip::{CLIPTextConfig, CLIPTextModel, HiddenAct};
use crate::models::text_encoders::TextEncoderSlot;
use crate::models::unet_2d_condition::{
    CondDownBlockType, CondUpBlockType, UNet2DConditionConfig, UNet2DConditionModel,
};
use crate::tokenizer::{ClipTokenizer, TokenizerError};

const DOWNLOAD_HINT: &str = "Download a diffusers-format Stable Diffusion model, e.g. the \
     `stable-diffusion-v1-5/stable-diffusion-v1-5` repository from the Hugging Face Hub \
     (`huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5 --include '*.json' \
     '*.txt' '*.safetensors' --exclude '*.ckpt' --local-dir <folder>`), and point at that folder: \
     it holds model_index.json, unet/, vae/, text_encoder/, tokenizer/ and scheduler/";

#[derive(Debug, thiserror::Error)]
pub enum PretrainedError {
    #[error("{path} does not exist. {DOWNLOAD_HINT}")]
    NotFound { path: PathBuf },
    #[error(
        "{dir} is not a complete Stable Diffusion folder; missing:\n  {}\n{DOWNLOAD_HINT}",
        missing.join("\n  ")
    )]
    Incomplete { dir: PathBuf, missing: Vec<String> },
    #[error(
        "{path} is a PyTorch pickle; pickles can run code when loaded and are not read. Use the \
         model's .safetensors files (or convert the pickle with diffusers' scripts)"
    )]
    Pickle { path: PathBuf },
    #[error(
        "{path} is a single-file checkpoint, which holds no tokenizer and no configs: also give a \
         diffusers folder of the same model to take them from (`--config-from <folder>` for \
         `sample`, `model.pretrained_config` in a config). {DOWNLOAD_HINT}"
    )]
    NeedConfigFolder { path: PathBuf },
    #[error("{path} is not a Stable Diffusion single-file checkpoint: {why}")]
    NotSingleFile { path: PathBuf, why: String },
    #[error("{path}")]
    ConfigJson {
        path: PathBuf,
        #[source]
        source: ConfigJsonError,
    },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error(transparent)]
    Io(#[from] IoError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

/// Where a pretrained model comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Pretrained {
    Folder(PathBuf),
    SingleFile {
        file: PathBuf,
        /// A diffusers folder to take the tokenizer, configs and scheduler from.
        configs: Option<PathBuf>,
    },
}

impl Pretrained {
    /// A folder, or a `.safetensors` file (`configs` names the folder its tokenizer and
    /// configs come from). Pickles are refused.
    pub fn detect(path: &Path, configs: Option<&Path>) -> Result<Self, PretrainedError> {
        if !path.exists() {
            return Err(PretrainedError::NotFound {
                path: path.to_path_buf(),
            });
        }
        if path.is_dir() {
            return Ok(Self::Folder(path.to_path_buf()));
        }
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("ckpt" | "pt" | "pth" | "bin") => Err(PretrainedError::Pickle {
                path: path.to_path_buf(),
            }),
            _ => Ok(Self::SingleFile {
                file: path.to_path_buf(),
                configs: configs.map(Path::to_path_buf),
            }),
        }
    }

    /// Whether `path` looks like a pretrained Stable Diffusion model rather than a run.
    pub fn looks_like(path: &Path) -> bool {
        path.join(files::MODEL_INDEX).is_file()
            || (path.is_file()
                && path
                    .extension()
                    .is_some_and(|e| e == "safetensors" || e == "ckpt"))
    }
}

/// One text encoder of a pretrained pipeline, with its config and tokenizer (diffusers'
/// `text_encoder` + `tokenizer`, `text_encoder_2` + `tokenizer_2`, ...).
#[derive(Clone)]
pub struct PretrainedTextEncoder {
    pub model: CLIPTextModel,
    pub config: CLIPTextConfig,
    pub tokenizer: ClipTokenizer,
}

/// A loaded Stable Diffusion model: the U-Net, the VAE, the text encoders in the pipeline's
/// order, the schedule, and which family of base it is.
pub struct StableDiffusion {
    pub unet: UNet2DConditionModel,
    pub unet_config: UNet2DConditionConfig,
    pub vae: AutoencoderKL,
    pub vae_config: AutoencoderKLConfig,
    pub text_encoders: Vec<PretrainedTextEncoder>,
    pub scheduler: SchedulerConfig,
    pub base: BaseModel,
}

/// Which base a pipeline of these configs is: SD 2.x has OpenCLIP-H's text encoder (`gelu`)
/// and a 1024-wide cross-attention; every other layout of one CLIP is SD 1.x's.
pub fn detect_base(unet: &UNet2DConditionConfig, text: &[CLIPTextConfig]) -> BaseModel {
    let open_clip = text
        .first()
        .is_some_and(|t| t.hidden_act == HiddenAct::Gelu);
    if open_clip || unet.cross_attention_dim == 1024 {
        BaseModel::Sd2
    } else {
        BaseModel::Sd1
    }
}

impl StableDiffusion {
    /// The U-Net, VAE and text encoders held in `dtype` (mixed precision: a LoRA run's frozen
    /// base, as diffusers' `weight_dtype`); the freed f32 copies go back to the system.
    pub fn held_in(mut self, dtype: burn::tensor::FloatDType) -> Self {
        use crate::optim::precision::hold_frozen;
        if dtype == burn::tensor::FloatDType::F32 {
            return self;
        }
        self.unet = hold_frozen(self.unet, dtype);
        self.vae = hold_frozen(self.vae, dtype);
        for te in &mut self.text_encoders {
            te.model = hold_frozen(te.model.clone(), dtype);
        }
        crate::memory::release_cached();
        self
    }

    /// Image pixels per latent position (the VAE's `2^(levels - 1)`).
    pub fn vae_factor(&self) -> usize {
        self.vae_config.downsampling()
    }

    /// diffusers' default image size: the U-Net's `sample_size` times the VAE factor.
    pub fn default_size(&self) -> usize {
        self.unet_config.sample_size * self.vae_factor()
    }

    /// How the pipeline uses each text encoder, with `clip_skip` (1 = the last layer).
    pub fn text_slots(&self, clip_skip: usize) -> Vec<TextEncoderSlot> {
        self.text_encoders
            .iter()
            .map(|te| TextEncoderSlot {
                clip_skip,
                ..TextEncoderSlot::hidden_states(std::sync::Arc::new(te.tokenizer.clone()))
            })
            .collect()
    }

    /// The text encoders' models, in order.
    pub fn text_models(&self) -> Vec<&CLIPTextModel> {
        self.text_encoders.iter().map(|t| &t.model).collect()
    }
}

/// The weights file of a component: `<stem>.safetensors`, else `<stem>.fp16.safetensors`.
fn weights_in(dir: &Path, stem: &str) -> Result<PathBuf, files::MissingWeights> {
    files::existing_weights(dir, stem)
}

fn json_config<T>(
    path: &Path,
    parse: impl Fn(&serde_json::Value) -> Result<T, ConfigJsonError>,
) -> Result<T, PretrainedError> {
    let value = io::read_json(path)?;
    parse(&value).map_err(|source| PretrainedError::ConfigJson {
        path: path.to_path_buf(),
        source,
    })
}

/// The configs, tokenizers and schedule a folder provides.
struct FolderParts {
    unet: UNet2DConditionConfig,
    vae: AutoencoderKLConfig,
    /// Each text encoder's config and tokenizer, in order.
    text: Vec<(CLIPTextConfig, ClipTokenizer)>,
    scheduler: SchedulerConfig,
}

/// Text encoders of a folder: `text_encoder` (SD 1.x/2.x have one).
const TEXT_ENCODERS: usize = 1;

impl FolderParts {
    fn assemble(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoders: Vec<CLIPTextModel>,
    ) -> StableDiffusion {
        let configs: Vec<CLIPTextConfig> = self.text.iter().map(|(c, _)| c.clone()).collect();
        let base = detect_base(&self.unet, &configs);
        StableDiffusion {
            unet,
            unet_config: self.unet,
            vae,
            vae_config: self.vae,
            text_encoders: self
                .text
                .into_iter()
                .zip(text_encoders)
                .map(|((config, tokenizer), model)| PretrainedTextEncoder {
                    model,
                    config,
                    tokenizer,
                })
                .collect(),
            scheduler: self.scheduler,
            base,
        }
    }
}

/// Checks every file a folder needs up front and reports all that are missing.
fn folder_parts(dir: &Path, need_weights: bool) -> Result<FolderParts, PretrainedError> {
    let mut missing = Vec::new();
    let need = |rel: &str, missing: &mut Vec<String>| {
        if !dir.join(rel).is_file() {
            missing.push(dir.join(rel).display().to_string());
        }
    };
    let text_encoders: Vec<String> = (0..TEXT_ENCODERS)
        .map(|i| component_name("text_encoder", i))
        .collect();
    let tokenizers: Vec<String> = (0..TEXT_ENCODERS)
        .map(|i| component_name("tokenizer", i))
        .collect();
    for rel in ["unet", "vae"]
        .iter()
        .chain(
            text_encoders
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .iter(),
        )
        .map(|c| format!("{c}/{}", files::CONFIG))
        .chain([files::SCHEDULER_CONFIG.to_string()])
    {
        need(&rel, &mut missing);
    }
    for t in &tokenizers {
        let tok = dir.join(t);
        let has_vocab = tok.join("vocab.json").is_file() && tok.join("merges.txt").is_file();
        if !tok.join("tokenizer.json").is_file() && !has_vocab {
            missing.push(format!(
                "{} (tokenizer.json, or vocab.json and merges.txt)",
                tok.display()
            ));
        }
    }
    if need_weights {
        let mut weights = vec![
            ("unet".to_string(), files::DIFFUSERS_WEIGHTS),
            ("vae".to_string(), files::DIFFUSERS_WEIGHTS),
        ];
        weights.extend(
            text_encoders
                .iter()
                .map(|t| (t.clone(), files::TRANSFORMERS_WEIGHTS)),
        );
        for (sub, stem) in weights {
            if let Err(m) = weights_in(&dir.join(sub), stem) {
                missing.push(m.to_string());
            }
        }
    }
    if !missing.is_empty() {
        return Err(PretrainedError::Incomplete {
            dir: dir.to_path_buf(),
            missing,
        });
    }
    let parts = FolderParts {
        unet: json_config(
            &dir.join("unet/config.json"),
            UNet2DConditionConfig::from_diffusers_json,
        )?,
        vae: json_config(
            &dir.join("vae/config.json"),
            AutoencoderKLConfig::from_diffusers_json,
        )?,
        text: text_encoders
            .iter()
            .zip(&tokenizers)
            .map(|(te, tok)| {
                Ok((
                    json_config(
                        &dir.join(te).join(files::CONFIG),
                        CLIPTextConfig::from_transformers_json,
                    )?,
                    ClipTokenizer::from_dir(&dir.join(tok))?,
                ))
            })
            .collect::<Result<_, PretrainedError>>()?,
        scheduler: json_config(
            &dir.join(files::SCHEDULER_CONFIG),
            SchedulerConfig::from_diffusers_json,
        )?,
    };
    check_widths(dir, &parts.unet, &text_encoders, &parts.text)?;
    Ok(parts)
}

/// The U-Net attends to the text encoders' hidden states (concatenated, in order): its
/// `cross_attention_dim` must be their `hidden_size`s' sum.
fn check_widths(
    dir: &Path,
    unet: &UNet2DConditionConfig,
    names: &[String],
    text: &[(CLIPTextConfig, ClipTokenizer)],
) -> Result<(), PretrainedError> {
    let widths: Vec<usize> = text.iter().map(|(c, _)| c.hidden_size).collect();
    let total: usize = widths.iter().sum();
    if text.is_empty() || unet.cross_attention_dim == total {
        return Ok(());
    }
    let each = names
        .iter()
        .zip(&widths)
        .map(|(n, w)| format!("{n}/{}: hidden_size = {w}", files::CONFIG))
        .collect::<Vec<_>>()
        .join(", ");
    Err(PretrainedError::Config {
        path: dir.join("unet").join(files::CONFIG),
        message: format!(
            "cross_attention_dim = {} does not fit the text encoder ({each}); the U-Net's \
             cross-attention reads the text encoder's output, so the two must be equal",
            unet.cross_attention_dim
        ),
    })
}

fn check<T>(path: &Path, problems: Vec<String>, value: T) -> Result<T, PretrainedError> {
    if problems.is_empty() {
        Ok(value)
    } else {
        Err(PretrainedError::Config {
            path: path.to_path_buf(),
            message: problems.join("; "),
        })
    }
}

/// Loads `source` onto `device`.
pub fn load(source: &Pretrained, device: &Device) -> Result<StableDiffusion, PretrainedError> {
    match source {
        Pretrained::Folder(dir) => load_folder(dir, device),
        Pretrained::SingleFile { file, configs } => {
            let configs = configs
                .as_ref()
                .ok_or_else(|| PretrainedError::NeedConfigFolder { path: file.clone() })?;
            load_single_file(file, configs, device)
        }
    }
}

fn build<M>(make: impl FnOnce() -> M) -> M {
    crate::nn::without_init(make)
}

fn load_folder(dir: &Path, device: &Device) -> Result<StableDiffusion, PretrainedError> {
    if !dir.exists() {
        return Err(PretrainedError::NotFound {
            path: dir.to_path_buf(),
        });
    }
    let parts = folder_parts(dir, true)?;
    let unet_path = component_weights(dir, "unet", files::DIFFUSERS_WEIGHTS)?;
    check(&unet_path, parts.unet.problems("unet"), ())?;
    let unet = safetensors::load_file(build(|| parts.unet.init(device)), &unet_path)?;
    let (vae, _) = vae_from_folder(dir, &parts.vae, device)?;
    let mut text_encoders = Vec::new();
    for (i, (cfg, _)) in parts.text.iter().enumerate() {
        text_encoders.push(text_encoder_from_folder(dir, i, cfg, device)?.0);
    }
    Ok(parts.assemble(unet, vae, text_encoders))
}

/// `<dir>/<sub>/<stem>[.fp16].safetensors`, or an `Incomplete` error naming it.
fn component_weights(dir: &Path, sub: &str, stem: &str) -> Result<PathBuf, PretrainedError> {
    weights_in(&dir.join(sub), stem).map_err(|m| PretrainedError::Incomplete {
        dir: dir.to_path_buf(),
        missing: vec![m.to_string()],
    })
}

/// A folder's `vae/` weights (old attention names accepted); returns the file read.
fn vae_from_folder(
    dir: &Path,
    cfg: &AutoencoderKLConfig,
    device: &Device,
) -> Result<(AutoencoderKL, PathBuf), PretrainedError> {
    let path = component_weights(dir, "vae", files::DIFFUSERS_WEIGHTS)?;
    check(&path, cfg.problems("vae"), ())?;
    let file = SafetensorsFile::open(&path)?;
    let view = View::renamed(&file, keys::vae_legacy_attention, |_| false);
    let vae = safetensors::load_into(build(|| cfg.init(device)), &view, &path)?;
    Ok((vae, path))
}

/// A folder's `i`-th text encoder's weights (`text_encoder/`, `text_encoder_2/`; with or without
/// transformers 4's `text_model.`).
fn text_encoder_from_folder(
    dir: &Path,
    i: usize,
    cfg: &CLIPTextConfig,
    device: &Device,
) -> Result<(CLIPTextModel, PathBuf), PretrainedError> {
    let folder = component_name("text_encoder", i);
    let path = component_weights(dir, &folder, files::TRANSFORMERS_WEIGHTS)?;
    check(&path, cfg.problems(&folder), ())?;
    let file = SafetensorsFile::open(&path)?;
    let view = View::renamed(&file, keys::clip_text_model_prefix, keys::clip_buffer);
    let te = safetensors::load_into(build(|| cfg.init(device)), &view, &path)?;
    Ok((te, path))
}

/// The VAE of a pretrained model, its config and the weights file: a folder's `vae/`, or a
/// single file's `first_stage_model.*` with `vae/config.json` from its config folder.
pub fn load_vae(
    source: &Pretrained,
    device: &Device,
) -> Result<(AutoencoderKL, AutoencoderKLConfig, PathBuf), PretrainedError> {
    let (dir, file) = match source {
        Pretrained::Folder(dir) => (dir.clone(), None),
        Pretrained::SingleFile { file, configs } => (
            configs
                .clone()
                .ok_or_else(|| PretrainedError::NeedConfigFolder { path: file.clone() })?,
            Some(file.clone()),
        ),
    };
    let cfg = json_config(
        &dir.join("vae/config.json"),
        AutoencoderKLConfig::from_diffusers_json,
    )?;
    match file {
        None => {
            let (vae, path) = vae_from_folder(&dir, &cfg, device)?;
            Ok((vae, cfg, path))
        }
        Some(file) => {
            let st = SafetensorsFile::open(&file)?;
            let keys = st.keys();
            let levels = cfg.block_out_channels.len();
            let view = View::from_entries(&st, single_file::vae_entries(&keys, levels, &st));
            let vae = safetensors::load_into(build(|| cfg.init(device)), &view, &file)?;
            Ok((vae, cfg, file))
        }
    }
}

/// The text encoders and tokenizers of a folder (`text_encoder/` + `tokenizer/`, ...), in
/// order, each with the weights file it was read from.
pub fn load_text_encoders(
    dir: &Path,
    device: &Device,
) -> Result<Vec<(PretrainedTextEncoder, PathBuf)>, PretrainedError> {
    (0..TEXT_ENCODERS)
        .map(|i| {
            let config = json_config(
                &dir.join(component_name("text_encoder", i))
                    .join(files::CONFIG),
                CLIPTextConfig::from_transformers_json,
            )?;
            let tokenizer = ClipTokenizer::from_dir(&dir.join(component_name("tokenizer", i)))?;
            let (model, path) = text_encoder_from_folder(dir, i, &config, device)?;
            Ok((
                PretrainedTextEncoder {
                    model,
                    config,
                    tokenizer,
                },
                path,
            ))
        })
        .collect()
}

/// Writes `sd` as one original-layout `.safetensors` file (what A1111 and ComfyUI load, and
/// what [`load`] reads back): `model.diffusion_model.*`, `first_stage_model.*` and
/// `cond_stage_model.transformer.*`, float32. SD 1.x text encoders only: an SD 2.x model's
/// OpenCLIP layout (fused q/k/v) is refused.
pub fn write_single_file(sd: &StableDiffusion, out: &Path) -> Result<(), PretrainedError> {
    if !sd.base.writes_single_file() {
        return Err(PretrainedError::Config {
            path: out.to_path_buf(),
            message: format!(
                "a single-file output is written in SD 1.x's layout, and this model is {} \
                 (its OpenCLIP text encoder has fused q/k/v there): write a diffusers folder \
                 instead (an --out without .safetensors)",
                sd.base.name()
            ),
        });
    }
    let layout = unet_layout(&sd.unet_config);
    let levels = sd.vae_config.block_out_channels.len();
    let mut tensors = std::collections::BTreeMap::new();
    let mut put = |name: String, t: safetensors::HostTensor| {
        let previous = tensors.insert(name.clone(), TensorData::new(t.data, t.shape));
        assert!(
            previous.is_none(),
            "two parameters map to the single-file key {name}"
        );
    };
    for (name, t) in safetensors::named_tensors(&sd.unet) {
        put(single_file::unet_original_name(&name, &layout), t);
    }
    for (name, mut t) in safetensors::named_tensors(&sd.vae) {
        let (key, conv) = single_file::vae_original_name(&name, levels);
        if conv && t.shape.len() == 2 {
            t.shape.extend([1, 1]);
        }
        put(key, t);
    }
    for te in &sd.text_encoders {
        for (name, t) in safetensors::named_tensors(&te.model) {
            put(single_file::clip_original_name(&name), t);
        }
    }
    safetensors::save_tensors(out, &tensors, &files::pt_metadata())?;
    Ok(())
}

fn unet_layout(cfg: &UNet2DConditionConfig) -> UNetLayout {
    UNetLayout {
        layers_per_block: cfg.layers_per_block,
        down_attention: cfg
            .down_block_types
            .iter()
            .map(|t| *t == CondDownBlockType::CrossAttnDownBlock2D)
            .collect(),
        up_attention: cfg
            .up_block_types
            .iter()
            .map(|t| *t == CondUpBlockType::CrossAttnUpBlock2D)
            .collect(),
        class_embedding: cfg.num_class_embeds.is_some(),
    }
}

fn load_single_file(
    file: &Path,
    configs: &Path,
    device: &Device,
) -> Result<StableDiffusion, PretrainedError> {
    let parts = folder_parts(configs, false)?;
    let st = SafetensorsFile::open(file)?;
    let keys = st.keys();
    let not_sd = |why: &str| PretrainedError::NotSingleFile {
        path: file.to_path_buf(),
        why: why.to_string(),
    };
    if !keys.iter().any(|k| k.starts_with(single_file::UNET_PREFIX)) {
        return Err(not_sd(
            "it has no model.diffusion_model.* tensors (a diffusers component or a LoRA?)",
        ));
    }
    let text_layout = single_file::text_encoder_layout(&keys)
        .ok_or_else(|| not_sd("it has no text encoder (cond_stage_model.*)"))?;
    check(file, parts.unet.problems("unet"), ())?;
    let unet_view = View::from_entries(
        &st,
        single_file::unet_entries(&keys, &unet_layout(&parts.unet)),
    );
    let unet = safetensors::load_into(build(|| parts.unet.init(device)), &unet_view, file)?;
    let levels = parts.vae.block_out_channels.len();
    let vae_view = View::from_entries(&st, single_file::vae_entries(&keys, levels, &st));
    let vae = safetensors::load_into(build(|| parts.vae.init(device)), &vae_view, file)?;
    // The original layout holds one text encoder (`cond_stage_model`).
    let text_cfg = &parts.text[0].0;
    let te_entries = single_file::text_encoder_entries(
        &keys,
        text_layout,
        text_cfg.num_hidden_layers,
        &st as &dyn TensorSource,
    );
    let te_view = View::from_entries(&st, te_entries);
    let text_encoder = safetensors::load_into(build(|| text_cfg.init(device)), &te_view, file)?;
    Ok(parts.assemble(unet, vae, vec![text_encoder]))
}

/// Parameters of each network (U-Net, VAE, the text encoders together), for messages.
pub fn parameter_counts(sd: &StableDiffusion) -> [usize; 3] {
    [
        sd.unet.num_params(),
        sd.vae.num_params(),
        sd.text_encoders.iter().map(|t| t.model.num_params()).sum(),
    ]
}
