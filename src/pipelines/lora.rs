//! LoRA fine-tuning of a Stable Diffusion model (`architecture = "sd_lora"`), the step of
//! diffusers' `train_text_to_image_lora.py`: the pretrained VAE, text encoder and U-Net
//! frozen, adapters on the U-Net's attention projections (and optionally the text encoder's),
//! latents `vae.encode(x).latent_dist.sample() * scaling_factor`, CLIP `last_hidden_state`,
//! noise offset, min-SNR, epsilon or v-prediction, caption dropout. It is the latent diffusion
//! objective with a pretrained base; checkpoints hold the adapters only. Exports the two LoRA
//! files the inference tools read (`io::lora`); applies LoRA files to a model for `sample
//! --lora` and `merge`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::module::Module;
use burn::prelude::*;

use super::stable_diffusion::{self, Pretrained, StableDiffusion};
use super::text_to_image::{TextToImage, text_to_image};
use crate::config::Config;
use crate::data::Dataset;
use crate::device::parse_device;
use crate::io::image::Grid;
use crate::io::layout::{self as files, component_name};
use crate::io::lora::{self as lora_io, Component, KohyaInfo, LoraFile, LoraModule};
use crate::io::{self, IoError};
use crate::lora::merge::{apply_file as fold_file, collect_adapters};
use crate::lora::{Linears, LoraError, LoraPlan, select};
use crate::models::backbone::{Backbone, BackboneConfig};
use crate::models::clip::CLIPTextModel;
use crate::models::latent_diffusion::{FirstStage, LatentDiffusionConfig, LatentDiffusionModel};
use crate::models::unet_2d_condition::UNet2DConditionModel;
use crate::nn::to_host;
use crate::optim::precision::compute_dtype;
use crate::train::objectives::ldm::{
    LatentDiffusionObjective, LatentDiffusionParts, TextEncoder, TextPart,
};
use crate::train::{Outputs, TrainError, TrainOptions, TrainOutcome};

/// The diffusers-layout file of an export.
pub const DIFFUSERS_FILE: &str = "pytorch_lora_weights.safetensors";

fn err(message: String) -> TrainError {
    TrainError::Incompatible(message)
}

/// A hash of the files a pretrained model's weights come from, streamed (SD 1.5 is 4 GB):
/// a single file, or every `.safetensors` of a folder's U-Net, VAE and text encoders.
fn base_fingerprint(source: &Pretrained, text_encoders: usize) -> Result<String, TrainError> {
    let mut files_in = Vec::new();
    match source {
        Pretrained::SingleFile { file, .. } => files_in.push(file.clone()),
        Pretrained::Folder(dir) => {
            let mut components = vec!["unet".to_string(), "vae".to_string()];
            components.extend((0..text_encoders).map(|i| component_name("text_encoder", i)));
            for sub in components {
                let mut f: Vec<PathBuf> = std::fs::read_dir(dir.join(sub))
                    .map(|d| {
                        d.filter_map(|e| e.ok().map(|e| e.path()))
                            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                            .collect()
                    })
                    .unwrap_or_default();
                f.sort();
                files_in.extend(f);
            }
        }
    }
    Ok(files::fingerprint_files(&files_in)?)
}

/// The pretrained model a LoRA run adapts, training it first from
/// `model.pretrained_train_config` when it is missing.
fn pretrained_source(cfg: &Config, opts: &TrainOptions) -> Result<Pretrained, TrainError> {
    let path = cfg
        .model
        .pretrained
        .as_ref()
        .ok_or_else(|| err("model.pretrained is not set".into()))?;
    if let Some(base_cfg) = &cfg.model.pretrained_train_config {
        let ready = || path.exists();
        super::chain::ensure_stage("model.pretrained", path, base_cfg, ready, opts, cfg)?;
    }
    Pretrained::detect(path, cfg.model.pretrained_config.as_deref())
        .map_err(|e| TrainError::stage(format!("model.pretrained = {}", path.display()), e))
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
        .map_err(|e| TrainError::stage("cannot load the base model (model.pretrained)", e))?;
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
    let fingerprint = base_fingerprint(&source, sd.text_encoders.len())?;
    let factor = sd.vae_factor();
    let res = cfg.data.resolution;
    if !res.is_multiple_of(factor) {
        return Err(err(format!(
            "data.resolution = {res} is not divisible by the VAE's factor {factor}"
        )));
    }
    let l = &cfg.lora;
    // The layers that get adapters, chosen once (before training: a target that matches
    // nothing fails here).
    let plan = {
        let mut probe = sd.unet.clone();
        let paths = crate::lora::linear_paths(&mut probe);
        let backbone = select(&l.target_modules, &paths, "lora.target_modules")?;
        let mut text_encoders = Vec::new();
        if l.text_encoder {
            for te in &sd.text_encoders {
                let mut probe = te.model.clone();
                let paths = crate::lora::linear_paths(&mut probe);
                text_encoders.push(select(
                    &l.text_encoder_target_modules,
                    &paths,
                    "lora.text_encoder_target_modules",
                )?);
            }
        }
        LoraPlan {
            config: l.clone(),
            backbone,
            text_encoders,
        }
    };
    let dataset = Dataset::open(cfg.data.source, &cfg.data.path, cfg.data.on_bad_image)?;
    dataset.require_captions(cfg.data.allow_empty_captions)?;
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
    let text: Vec<TextPart> = sd
        .text_slots(1)
        .into_iter()
        .zip(&sd.text_encoders)
        .map(|(slot, te)| TextPart {
            slot,
            encoder: if l.text_encoder {
                TextEncoder::Adapted(te.model.clone())
            } else {
                TextEncoder::Frozen(te.model.clone())
            },
        })
        .collect();
    let parts = LatentDiffusionParts {
        first_stage: first,
        scale,
        latent_shape: lat,
        text,
        cache,
        fingerprints: vec![("base model".to_string(), fingerprint)],
        base_backbone: Some(Backbone::Unet2DCondition(sd.unet.clone())),
        lora: Some(plan),
        cache_text: cfg.data.cache_text_embeddings,
    };
    let mut conditioning = cfg.model.conditioning.clone();
    conditioning.kind = crate::models::latent_diffusion::ConditioningKind::Text;
    let backbone = BackboneConfig::Unet2DCondition(sd.unet_config.clone());
    let ldm = LatentDiffusionConfig {
        backbone: backbone.clone(),
        ..LatentDiffusionConfig::default()
    };
    let objective = LatentDiffusionObjective::new(
        &ldm,
        &conditioning,
        &cfg.diffusion,
        cfg.train.mixed_precision,
        cfg.train.batch_split,
        parts,
        &device,
    )
    .with_backbone_config(backbone)
    .with_base_lr(cfg.train.learning_rate);
    let outputs = LoraOutputs {
        cfg: cfg.clone(),
        base: Arc::new(sd),
        prompts: Vec::new(),
    };
    super::train_run(cfg, opts, objective, outputs)
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
) -> Result<StableDiffusion, TrainError> {
    let unet = weights
        .backbone
        .as_unet()
        .ok_or_else(|| err("a Stable Diffusion LoRA run adapts a U-Net".into()))?;
    let mut text_encoders = base.text_encoders.clone();
    for (i, te) in text_encoders.iter_mut().enumerate() {
        if let Some(Some(trained)) = weights.text_encoders.get(i) {
            te.model = trained.clone();
        }
        te.model = te.model.clone().to_device(device);
    }
    Ok(StableDiffusion {
        unet: unet.clone().to_device(device),
        unet_config: base.unet_config.clone(),
        vae: base.vae.clone().to_device(device),
        vae_config: base.vae_config.clone(),
        text_encoders,
        scheduler: base.scheduler.clone(),
        base: base.base,
    })
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
        let sd = with_weights(&self.base, weights, device)?;
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
                first_index: 0,
                width: res,
                height: res,
                num: per,
                latents: None,
                clip_skip: 1,
            };
            let out = text_to_image(&sd, &req, device)
                .map_err(|e| TrainError::stage("cannot draw the sample grid", e))?;
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
            return Err(LoraError::NoAdapters.into());
        }
        lora_io::write_diffusers(&dir.join(DIFFUSERS_FILE), &modules)?;
        let l = &self.cfg.lora;
        let name = &self.cfg.run.name;
        let info = KohyaInfo {
            rank: l.rank,
            alpha: l.alpha,
            base_model: self.base.base,
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
pub fn adapter_modules(
    model: &LatentDiffusionModel,
) -> std::collections::BTreeMap<(Component, String), LoraModule> {
    let mut backbone = model.backbone.clone();
    let mut text: Vec<(usize, CLIPTextModel)> = model
        .text_encoders
        .iter()
        .enumerate()
        .filter_map(|(i, t)| t.clone().map(|t| (i, t)))
        .collect();
    let mut components: Vec<(Component, &mut dyn Linears)> =
        vec![(Component::Unet, &mut backbone as &mut dyn Linears)];
    components.extend(
        text.iter_mut()
            .map(|(i, t)| (Component::TextEncoder(*i), t as &mut dyn Linears)),
    );
    collect_adapters(&mut components)
}

/// `FILE[:SCALE]` of `--lora`.
pub fn parse_lora_arg(arg: &str) -> Result<(PathBuf, f64), LoraError> {
    if let Some((file, scale)) = arg.rsplit_once(':')
        && let Ok(s) = scale.parse::<f64>()
    {
        if !s.is_finite() {
            return Err(LoraError::ScaleNotFinite { arg: arg.into() });
        }
        return Ok((PathBuf::from(file), s));
    }
    Ok((PathBuf::from(arg), 1.0))
}

/// Folds LoRA `file` into `unet` and the `text_encoders` (in the pipeline's order) at `scale`
/// (times the file's own `alpha / rank`): `W += scale · alpha / r · up · down`. Every module
/// of the file must name a linear layer of the model.
pub fn apply_file(
    file: &LoraFile,
    scale: f64,
    unet: &mut UNet2DConditionModel,
    text_encoders: &mut [&mut CLIPTextModel],
) -> Result<usize, LoraError> {
    let mut components: Vec<(Component, &mut dyn Linears)> =
        vec![(Component::Unet, unet as &mut dyn Linears)];
    components.extend(
        text_encoders
            .iter_mut()
            .enumerate()
            .map(|(i, t)| (Component::TextEncoder(i), &mut **t as &mut dyn Linears)),
    );
    fold_file(file, scale, &mut components)
}

/// Folds `file` into the whole pipeline `sd`.
fn apply_to(file: &LoraFile, scale: f64, sd: &mut StableDiffusion) -> Result<usize, LoraError> {
    let mut text: Vec<&mut CLIPTextModel> =
        sd.text_encoders.iter_mut().map(|t| &mut t.model).collect();
    apply_file(file, scale, &mut sd.unet, &mut text)
}

/// Reads and folds every `(file, scale)` into `sd`.
pub fn apply_files(sd: &mut StableDiffusion, loras: &[(PathBuf, f64)]) -> Result<(), TrainError> {
    for (path, scale) in loras {
        let file = lora_io::read(path)?;
        apply_to(&file, *scale, sd)?;
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
        TrainError::stage(
            format!("the run's base model.pretrained = {}", path.display()),
            e,
        )
    })?;
    let mut sd = stable_diffusion::load(&source, device)
        .map_err(|e| TrainError::stage("cannot load the run's base model", e))?;
    let file = run_lora_file(cfg, root, weights)?;
    apply_to(&file, 1.0, &mut sd)?;
    Ok(sd)
}

/// Writes `sd` as a diffusers folder at `out`, taking the configs, tokenizers and scheduler
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
    let mut rels = vec![
        files::MODEL_INDEX.to_string(),
        format!("unet/{}", files::CONFIG),
        format!("vae/{}", files::CONFIG),
        files::SCHEDULER_CONFIG.to_string(),
    ];
    for i in 0..sd.text_encoders.len() {
        rels.push(format!(
            "{}/{}",
            component_name("text_encoder", i),
            files::CONFIG
        ));
        let tok = component_name("tokenizer", i);
        rels.extend(files::TOKENIZER_FILES.iter().map(|f| format!("{tok}/{f}")));
    }
    for rel in &rels {
        copy(rel)?;
    }
    super::save_weights(
        &sd.unet,
        &files::weights_path(out, "unet", files::DIFFUSERS_WEIGHTS),
    )?;
    super::save_weights(
        &sd.vae,
        &files::weights_path(out, "vae", files::DIFFUSERS_WEIGHTS),
    )?;
    for (i, te) in sd.text_encoders.iter().enumerate() {
        super::save_weights(
            &te.model,
            &files::weights_path(
                out,
                &component_name("text_encoder", i),
                files::TRANSFORMERS_WEIGHTS,
            ),
        )?;
    }
    Ok(())
}
