//! LoRA fine-tuning of a Stable Diffusion model (`architecture = "sd_lora"`), the step of
//! diffusers' `train_text_to_image_lora.py`: the pretrained VAE, text encoder and U-Net
//! frozen, adapters on the U-Net's attention projections (and optionally the text encoder's),
//! latents `vae.encode(x).latent_dist.sample() * scaling_factor`, CLIP `last_hidden_state`,
//! noise offset, min-SNR, epsilon or v-prediction, caption dropout. It is the latent diffusion
//! objective with a pretrained base; checkpoints hold the adapters only. Exports the two LoRA
//! files the inference tools read (`io::lora`); applies LoRA files to a model for `sample
//! --lora` and `merge`.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::module::{Module, Param};
use burn::prelude::*;

use super::stable_diffusion::{self, Pretrained, StableDiffusion};
use super::text_to_image::{TextToImage, text_to_image};
use crate::config::{Config, Resume};
use crate::data::Dataset;
use crate::device::parse_device;
use crate::io::image::Grid;
use crate::io::lora::{self as lora_io, Component, KohyaInfo, LoraFile, LoraModule, ModuleName};
use crate::io::safetensors::HostTensor;
use crate::io::{self, IoError};
use crate::models::clip::CLIPTextModel;
use crate::models::latent_diffusion::{FirstStage, LatentDiffusionConfig, LatentDiffusionModel};
use crate::models::lora::{Linears, is_adapter_key};
use crate::models::unet_2d_condition::UNet2DConditionModel;
use crate::nn::to_host;
use crate::optim::precision::compute_dtype;
use crate::train::objectives::ldm::{LatentDiffusionObjective, LatentDiffusionParts, TextEncoder};
use crate::train::{Outputs, TrainError, TrainOptions, TrainOutcome, train_with};

/// The diffusers-layout file of an export.
pub const DIFFUSERS_FILE: &str = "pytorch_lora_weights.safetensors";

fn err(message: String) -> TrainError {
    TrainError::Stage(message)
}

/// A hash of the files a pretrained model's weights come from, streamed (SD 1.5 is 4 GB).
fn base_fingerprint(source: &Pretrained) -> Result<String, TrainError> {
    let mut files = Vec::new();
    match source {
        Pretrained::SingleFile { file, .. } => files.push(file.clone()),
        Pretrained::Folder(dir) => {
            for sub in ["unet", "vae", "text_encoder"] {
                let mut f: Vec<PathBuf> = std::fs::read_dir(dir.join(sub))
                    .map(|d| {
                        d.filter_map(|e| e.ok().map(|e| e.path()))
                            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                            .collect()
                    })
                    .unwrap_or_default();
                f.sort();
                files.extend(f);
            }
        }
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut buf = vec![0u8; 1 << 20];
    for path in files {
        let mut file = std::fs::File::open(&path).map_err(|source| {
            TrainError::Io(IoError::Read {
                path: path.clone(),
                source,
            })
        })?;
        loop {
            let n = file.read(&mut buf).map_err(|source| {
                TrainError::Io(IoError::Read {
                    path: path.clone(),
                    source,
                })
            })?;
            if n == 0 {
                break;
            }
            // FNV-1a over 8-byte words: fast enough for gigabytes, stable across runs.
            for chunk in buf[..n].chunks(8) {
                let mut w = [0u8; 8];
                w[..chunk.len()].copy_from_slice(chunk);
                h = (h ^ u64::from_le_bytes(w)).wrapping_mul(0x0100_0000_01b3);
            }
        }
    }
    Ok(format!("{h:016x}"))
}

/// The pretrained model a LoRA run adapts, training it first from
/// `model.pretrained_train_config` when it is missing.
fn pretrained_source(cfg: &Config, opts: &TrainOptions) -> Result<Pretrained, TrainError> {
    let path = cfg
        .model
        .pretrained
        .as_ref()
        .ok_or_else(|| err("model.pretrained is not set".into()))?;
    if !path.exists()
        && let Some(base_cfg) = &cfg.model.pretrained_train_config
    {
        let mut c = Config::load(base_cfg, &[])?;
        c.checkpoint.resume = Resume::Latest;
        if !opts.quiet {
            eprintln!(
                "base model: {} does not exist yet; training it from {}",
                path.display(),
                base_cfg.display()
            );
        }
        super::train(&c, opts)?;
    }
    Pretrained::detect(path, cfg.model.pretrained_config.as_deref())
        .map_err(|e| err(format!("model.pretrained = {}: {e}", path.display())))
}

/// Trains LoRA adapters on `model.pretrained`.
pub fn train_lora(
    cfg: &Config,
    opts: &TrainOptions,
) -> Result<TrainOutcome<LatentDiffusionModel>, TrainError> {
    let source = pretrained_source(cfg, opts)?;
    let device = parse_device(&cfg.run.device)?;
    // Mixed precision: the base is read straight into the compute dtype (never all in f32).
    let dtype = compute_dtype(cfg.train.mixed_precision);
    let sd = crate::nn::loading_in(dtype, || stable_diffusion::load(&source, &device))
        .map_err(|e| err(e.to_string()))?;
    // The noise schedule and prediction type are the model's own (its scheduler config), as
    // diffusers' script takes `DDPMScheduler.from_pretrained(model, subfolder="scheduler")`;
    // `[diffusion]` keeps noise offset, min-SNR and the rest.
    let mut cfg = cfg.clone();
    let s = &sd.scheduler;
    let d = &mut cfg.diffusion;
    d.num_train_timesteps = s.num_train_timesteps;
    d.beta_schedule = s.beta_schedule;
    d.beta_start = s.beta_start;
    d.beta_end = s.beta_end;
    d.prediction_type = s.prediction_type;
    let cfg = &cfg;
    let fingerprint = base_fingerprint(&source)?;
    let factor = sd.vae_factor();
    let res = cfg.data.resolution;
    if res % factor != 0 {
        return Err(err(format!(
            "data.resolution = {res} is not divisible by the VAE's factor {factor}"
        )));
    }
    let l = &cfg.lora;
    // Fail before training when a target matches nothing.
    {
        let mut probe = sd.unet.clone();
        let paths = crate::models::lora::linear_paths(&mut probe);
        crate::models::lora::select(&l.target_modules, &paths, "lora.target_modules")
            .map_err(err)?;
        if l.text_encoder {
            let mut probe = sd.text_encoder.clone();
            let paths = crate::models::lora::linear_paths(&mut probe);
            crate::models::lora::select(
                &l.text_encoder_target_modules,
                &paths,
                "lora.text_encoder_target_modules",
            )
            .map_err(err)?;
        }
    }
    let dataset = Dataset::open(cfg.data.source, &cfg.data.path, cfg.data.on_bad_image)?;
    let scale = sd.vae_config.scaling_factor;
    let lat = [sd.vae_config.latent_channels, res / factor, res / factor];
    let cache = super::latent_cache::latent_cache(
        cfg,
        &FirstStage::Kl(sd.vae.clone()),
        &fingerprint,
        &dataset,
        &device,
        opts.quiet,
    )?;
    // Mixed precision: the U-Net, VAE and text encoder are held in the compute dtype
    // (diffusers' `weight_dtype`; their norms' parameters are cast here, the rest was read in
    // it), shared by the objective and the sample grids.
    let sd = sd.held_in(dtype);
    let first = FirstStage::Kl(sd.vae.clone());
    let text_encoder = if l.text_encoder {
        TextEncoder::Adapted(sd.text_encoder.clone())
    } else {
        TextEncoder::Frozen(sd.text_encoder.clone())
    };
    let parts = LatentDiffusionParts {
        first_stage: first,
        scale,
        latent_shape: lat,
        tokenizer: Some(Arc::new(sd.tokenizer.clone())),
        text_encoder: Some(text_encoder),
        cache,
        fingerprints: vec![("base model".to_string(), fingerprint)],
        base_unet: Some(sd.unet.clone()),
        lora: Some(l.clone()),
        cache_text: cfg.data.cache_text_embeddings,
    };
    let mut conditioning = cfg.model.conditioning.clone();
    conditioning.kind = crate::models::latent_diffusion::ConditioningKind::Text;
    let ldm = LatentDiffusionConfig {
        unet: sd.unet_config.clone(),
        ..LatentDiffusionConfig::default()
    };
    let mut ldm = ldm;
    ldm.unet.cross_attention_dim = sd.unet_config.cross_attention_dim;
    let objective = LatentDiffusionObjective::new(
        &ldm,
        &conditioning,
        &cfg.diffusion,
        cfg.train.mixed_precision,
        cfg.train.batch_split,
        parts,
        &device,
    )
    .with_unet_config(sd.unet_config.clone())
    .with_base_lr(cfg.train.learning_rate);
    let outputs = LoraOutputs {
        cfg: cfg.clone(),
        base: Arc::new(sd),
        prompts: Vec::new(),
    };
    train_with(cfg, opts, objective, outputs)
}

/// Grids (the sample prompts through the adapted model) and the LoRA files.
struct LoraOutputs {
    cfg: Config,
    base: Arc<StableDiffusion>,
    prompts: Vec<String>,
}

/// The adapted model as a Stable Diffusion pipeline (adapters unmerged).
fn with_weights(
    base: &StableDiffusion,
    weights: &LatentDiffusionModel,
    device: &Device,
) -> StableDiffusion {
    StableDiffusion {
        unet: weights.unet.clone().to_device(device),
        unet_config: base.unet_config.clone(),
        vae: base.vae.clone().to_device(device),
        vae_config: base.vae_config.clone(),
        text_encoder: weights
            .text_encoder
            .clone()
            .unwrap_or_else(|| base.text_encoder.clone())
            .to_device(device),
        text_config: base.text_config.clone(),
        tokenizer: base.tokenizer.clone(),
        scheduler: base.scheduler.clone(),
    }
}

impl Outputs<LatentDiffusionModel> for LoraOutputs {
    fn prepare(&mut self, dataset: &Dataset) -> Result<(), TrainError> {
        self.prompts = if self.cfg.sample.prompts.is_empty() {
            let mut seen: Vec<String> = Vec::new();
            for i in 0..dataset.len() {
                if let Some(c) = dataset.caption(i)
                    && !seen.iter().any(|s| s == c)
                    && seen.len() < 4
                {
                    seen.push(c.to_string());
                }
            }
            seen
        } else {
            self.cfg.sample.prompts.clone()
        };
        if self.prompts.is_empty() {
            self.prompts.push(String::new());
        }
        Ok(())
    }

    fn grid(&self, weights: &LatentDiffusionModel, device: &Device) -> Result<Grid, TrainError> {
        let sd = with_weights(&self.base, weights, device);
        let s = &self.cfg.sample;
        let res = self.cfg.data.resolution;
        let per = s.num_images.div_ceil(self.prompts.len()).max(1);
        let mut images = Vec::new();
        for (i, p) in self.prompts.iter().enumerate() {
            let req = TextToImage {
                prompt: p.clone(),
                negative_prompt: String::new(),
                guidance_scale: s.guidance_scale,
                steps: s.num_inference_steps,
                sampler: Some(s.sampler),
                seed: s.seed + i as u64,
                width: res,
                height: res,
                num: per,
                latents: None,
                clip_skip: 1,
            };
            let out = text_to_image(&sd, &req, device).map_err(|e| err(e.to_string()))?;
            images.extend(to_host(out.clamp(-1.0, 1.0)));
        }
        Ok(Grid {
            images,
            shape: [per * self.prompts.len(), 3, res, res],
            columns: per,
        })
    }

    fn export(
        &self,
        weights: &LatentDiffusionModel,
        raw: Option<&LatentDiffusionModel>,
        dir: &Path,
    ) -> Result<(), TrainError> {
        let modules = adapter_modules(weights);
        if modules.is_empty() {
            return Err(err("the model has no LoRA adapters to export".into()));
        }
        lora_io::write_diffusers(&dir.join(DIFFUSERS_FILE), &modules)?;
        let l = &self.cfg.lora;
        let v2 = self.base.unet_config.cross_attention_dim == 1024;
        let name = &self.cfg.run.name;
        let info = KohyaInfo {
            rank: l.rank,
            alpha: l.alpha,
            base_model_version: if v2 { "sd_v2" } else { "sd_v1" },
            output_name: name.clone(),
            extra: vec![
                (
                    "ss_learning_rate".into(),
                    self.cfg.train.learning_rate.to_string(),
                ),
                (
                    "ss_max_train_steps".into(),
                    self.cfg.train.max_steps.to_string(),
                ),
                (
                    "ss_resolution".into(),
                    format!("({0}, {0})", self.cfg.data.resolution),
                ),
                (
                    "ss_noise_offset".into(),
                    self.cfg.diffusion.noise_offset.to_string(),
                ),
                ("ss_seed".into(), self.cfg.run.seed.to_string()),
                (
                    "ss_sd_model_name".into(),
                    self.cfg
                        .model
                        .pretrained
                        .as_ref()
                        .and_then(|p| p.file_name())
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                ),
                (
                    "ss_training_comment".into(),
                    "trained with difftrain".into(),
                ),
            ],
        };
        lora_io::write_kohya(&dir.join(format!("{name}.safetensors")), &modules, &info)?;
        if let Some(raw) = raw {
            lora_io::write_diffusers(
                &dir.join("pytorch_lora_weights_no_ema.safetensors"),
                &adapter_modules(raw),
            )?;
        }
        Ok(())
    }
}

/// Every adapter of `model` by component and module path, on the host.
pub fn adapter_modules(model: &LatentDiffusionModel) -> BTreeMap<(Component, String), LoraModule> {
    let mut out = BTreeMap::new();
    let collect = |comp: Component| {
        move |p: &str, l: &mut crate::nn::Linear| {
            if let Some(a) = &l.lora {
                let host = |t: Tensor<2>| HostTensor {
                    shape: t.dims().to_vec(),
                    data: to_host(t),
                };
                Some((
                    (comp, p.to_string()),
                    LoraModule {
                        down: host(a.down.weight.val()),
                        up: host(a.up.weight.val()),
                        scale: a.scale,
                    },
                ))
            } else {
                None
            }
        }
    };
    let mut unet = model.unet.clone();
    let f = collect(Component::Unet);
    unet.linears("", &mut |p, l| {
        if let Some((k, v)) = f(p, l) {
            out.insert(k, v);
        }
    });
    if let Some(te) = &model.text_encoder {
        let mut te = te.clone();
        let f = collect(Component::TextEncoder);
        te.linears("", &mut |p, l| {
            if let Some((k, v)) = f(p, l) {
                out.insert(k, v);
            }
        });
    }
    out
}

/// `FILE[:SCALE]` of `--lora`.
pub fn parse_lora_arg(arg: &str) -> Result<(PathBuf, f64), String> {
    if let Some((file, scale)) = arg.rsplit_once(':')
        && let Ok(s) = scale.parse::<f64>()
    {
        return Ok((PathBuf::from(file), s));
    }
    Ok((PathBuf::from(arg), 1.0))
}

/// Folds LoRA `file` into `unet` and `text_encoder` at `scale` (times the file's own
/// `alpha / rank`): `W += scale · alpha / r · up · down`. Every module of the file must name
/// a linear layer of the model.
pub fn apply_file(
    file: &LoraFile,
    scale: f64,
    unet: &mut UNet2DConditionModel,
    text_encoder: &mut CLIPTextModel,
) -> Result<usize, TrainError> {
    let mut by_comp: HashMap<Component, HashMap<String, &LoraModule>> = HashMap::new();
    for ((comp, name), m) in &file.modules {
        let key = match name {
            ModuleName::Path(p) => p.clone(),
            ModuleName::Underscored(_) => name.underscored(),
        };
        by_comp.entry(*comp).or_default().insert(key, m);
    }
    let mut applied = 0;
    let mut problems = Vec::new();
    for (comp, wanted) in &mut by_comp {
        let underscored = matches!(
            file.modules.keys().find(|(c, _)| c == comp),
            Some((_, ModuleName::Underscored(_)))
        );
        let mut visit = |p: &str, l: &mut crate::nn::Linear| {
            let key = if underscored {
                p.replace('.', "_")
            } else {
                p.to_string()
            };
            if let Some(m) = wanted.remove(&key) {
                let [out, inp] = l.weight.dims();
                if m.up.shape[0] != out || m.down.shape[1] != inp {
                    problems.push(format!(
                        "{p}: LoRA up {:?} / down {:?} do not fit the layer's weight [{out}, {inp}]",
                        m.up.shape, m.down.shape
                    ));
                    return;
                }
                let device = l.weight.val().device();
                let up = Tensor::<2>::from_data(
                    TensorData::new(m.up.data.clone(), m.up.shape.clone()),
                    &device,
                );
                let down = Tensor::<2>::from_data(
                    TensorData::new(m.down.data.clone(), m.down.shape.clone()),
                    &device,
                );
                let w = l.weight.val();
                let delta = up.matmul(down).mul_scalar(scale * m.scale).cast(w.dtype());
                l.weight = Param::initialized(l.weight.id, w + delta);
                applied += 1;
            }
        };
        match comp {
            Component::Unet => unet.linears("", &mut visit),
            Component::TextEncoder => text_encoder.linears("", &mut visit),
        }
        for (k, _) in wanted.iter() {
            problems.push(format!(
                "{} module {k} is not a linear layer of this model",
                comp.diffusers_prefix()
            ));
        }
    }
    if !problems.is_empty() {
        problems.sort();
        return Err(err(format!(
            "{}: does not fit this model ({} of {} modules):\n  {}",
            file.path.display(),
            problems.len(),
            file.modules.len(),
            problems
                .into_iter()
                .take(8)
                .collect::<Vec<_>>()
                .join("\n  ")
        )));
    }
    Ok(applied)
}

/// Reads and folds every `(file, scale)` into `sd`.
pub fn apply_files(sd: &mut StableDiffusion, loras: &[(PathBuf, f64)]) -> Result<(), TrainError> {
    for (path, scale) in loras {
        let file = lora_io::read(path)?;
        apply_file(&file, *scale, &mut sd.unet, &mut sd.text_encoder)?;
    }
    Ok(())
}

/// A LoRA run's file for sampling: the export's diffusers file, or a checkpoint's adapters
/// (raw factors, scaled by the run's `alpha / rank`).
pub fn run_lora_file(
    cfg: &Config,
    root: &Path,
    weights: Option<&Path>,
) -> Result<LoraFile, TrainError> {
    match weights {
        None => Ok(lora_io::read(&root.join(DIFFUSERS_FILE))?),
        Some(w) => {
            let mut f = lora_io::read(w)?;
            let s = cfg.lora.alpha / cfg.lora.rank as f64;
            f.modules.values_mut().for_each(|m| m.scale *= s);
            Ok(f)
        }
    }
}

/// Whether a checkpoint parameter key is saved by a LoRA run.
pub fn checkpoint_key(key: &str) -> bool {
    is_adapter_key(key)
}

/// The base model of a LoRA run with its adapters folded in.
pub fn load_adapted(
    cfg: &Config,
    root: &Path,
    weights: Option<&Path>,
    device: &Device,
) -> Result<StableDiffusion, TrainError> {
    let path = cfg
        .model
        .pretrained
        .as_ref()
        .ok_or_else(|| err("the run's model.pretrained is not set".into()))?;
    let source = Pretrained::detect(path, cfg.model.pretrained_config.as_deref()).map_err(|e| {
        err(format!(
            "the run's base model.pretrained = {}: {e}",
            path.display()
        ))
    })?;
    let mut sd = stable_diffusion::load(&source, device).map_err(|e| err(e.to_string()))?;
    let file = run_lora_file(cfg, root, weights)?;
    apply_file(&file, 1.0, &mut sd.unet, &mut sd.text_encoder)?;
    Ok(sd)
}

/// Writes `sd` as a diffusers folder at `out`, taking the configs, tokenizer and scheduler
/// from `configs` (a diffusers folder of the same model).
pub fn write_folder(sd: &StableDiffusion, configs: &Path, out: &Path) -> Result<(), TrainError> {
    let copy = |rel: &str| -> Result<(), TrainError> {
        let src = configs.join(rel);
        if src.is_file() {
            let bytes = std::fs::read(&src).map_err(|source| {
                TrainError::Io(IoError::Read {
                    path: src.clone(),
                    source,
                })
            })?;
            io::write_atomic(&out.join(rel), &bytes)?;
        }
        Ok(())
    };
    for rel in [
        "model_index.json",
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "scheduler/scheduler_config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/tokenizer.json",
    ] {
        copy(rel)?;
    }
    super::save_weights(
        &sd.unet,
        &out.join("unet/diffusion_pytorch_model.safetensors"),
    )?;
    super::save_weights(
        &sd.vae,
        &out.join("vae/diffusion_pytorch_model.safetensors"),
    )?;
    super::save_weights(
        &sd.text_encoder,
        &out.join("text_encoder/model.safetensors"),
    )?;
    Ok(())
}
