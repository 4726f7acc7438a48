//! The latent diffusion family end to end: train the first stage (`autoencoder_kl`), train the
//! conditional latent U-Net on a frozen first stage (ours, a VQ-VAE of the discrete family, or
//! a Stable Diffusion VAE), chained by one config when stage 1 is missing, and export what
//! diffusers loads: a `StableDiffusionPipeline` folder for text conditioning (vae, unet,
//! text_encoder, tokenizer, scheduler, model_index.json), unet/vae/scheduler for class or no
//! conditioning. A VQ first stage exports difftrain's own layout (diffusers has no loader for
//! the discrete family's VQ-VAE).

mod sample;

pub use sample::load_sampler;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::module::Module;
use burn::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::stable_diffusion::{self, Pretrained};
use super::text_to_image::{Generation, LatentModel, Prompted, generate};
use super::{load_run, locate, save_weights, vq};
use crate::checkpoint;
use crate::config::Config;
use crate::data::Dataset;

use crate::device::parse_device;
use crate::diffusion::sampling::SamplerKind;
use crate::diffusion::scheduler_config::SchedulerConfig;
use crate::io;
use crate::io::image::Grid;
use crate::io::layout::{self as files, component_name};
use crate::models::Architecture;
use crate::models::autoencoder_kl::AutoencoderKLConfig;
use crate::models::backbone::Conditioning;
use crate::models::clip::{CLIPTextConfig, CLIPTextModel};
use crate::models::latent_diffusion::{
    ConditioningKind, FirstStage, LatentDiffusionConfig, LatentDiffusionModel, latent_samples,
    scale_by_std,
};
use crate::models::text_encoders::TextEncoderSlot;
use crate::models::vqvae::VQVAEConfig;
use crate::nn::to_host;
use crate::optim::precision::{compute_dtype, hold_frozen};
use crate::tokenizer::{ClipTokenizer, learn_bpe, write_tokenizer_dir};
use crate::train::objectives::ldm::{
    LatentDiffusionObjective, LatentDiffusionParts, TextEncoder, TextPart,
};
use crate::train::{Outputs, TrainError, TrainOptions, TrainOutcome};

fn stage_error(message: String) -> TrainError {
    TrainError::Incompatible(message)
}

// ------------------------------------------------------------------------------- first stage

/// A loaded first stage and what stage 2 needs to know of it.
#[derive(Clone)]
pub struct LoadedFirstStage {
    pub model: FirstStage,
    pub kind: FirstStageKind,
    /// Image pixels per latent position.
    pub factor: usize,
    pub latent_channels: usize,
    /// A pretrained VAE's `scaling_factor`.
    pub pretrained_scale: Option<f64>,
    pub weights: PathBuf,
    /// Hash of the weights file.
    pub fingerprint: String,
}

/// Which first stage, with its config (for the export).
#[derive(Clone)]
pub enum FirstStageKind {
    Kl(AutoencoderKLConfig),
    /// A VQ-VAE run's config (saved beside the export as `vqvae.toml`).
    Vq(Box<Config>),
}

fn file_fingerprint(path: &Path) -> Result<String, TrainError> {
    let bytes = std::fs::read(path).map_err(|source| {
        TrainError::Io(io::IoError::Read {
            path: path.to_path_buf(),
            source,
        })
    })?;
    Ok(files::fingerprint(&[&bytes]))
}

/// Loads `ldm.first_stage`: a Stable Diffusion model's VAE, or an `autoencoder_kl` / `vqvae`
/// run (output_dir, export or checkpoint).
pub fn load_first_stage(
    ldm: &LatentDiffusionConfig,
    device: &Device,
) -> Result<LoadedFirstStage, TrainError> {
    let path = &ldm.first_stage;
    if Pretrained::looks_like(path) {
        let context = || format!("model.ldm.first_stage = {}", path.display());
        let source = Pretrained::detect(path, ldm.first_stage_config_from.as_deref())
            .map_err(|e| TrainError::stage(context(), e))?;
        let (vae, cfg, weights) = stable_diffusion::load_vae(&source, device)
            .map_err(|e| TrainError::stage(context(), e))?;
        return Ok(LoadedFirstStage {
            factor: cfg.downsampling(),
            latent_channels: cfg.latent_channels,
            pretrained_scale: Some(cfg.scaling_factor),
            fingerprint: file_fingerprint(&weights)?,
            weights,
            model: FirstStage::Kl(vae),
            kind: FirstStageKind::Kl(cfg),
        });
    }
    let (root, _) = locate(path)?;
    let run = Config::load(&root.join(checkpoint::CONFIG_FILE), &[])?;
    match run.model.architecture {
        Architecture::AutoencoderKl => {
            let (stage_cfg, vae, weights) =
                load_run(path, &[], |c| Ok(c.model.autoencoder.vae.init(device)))?;
            let vae_cfg = stage_cfg.model.autoencoder.vae.clone();
            Ok(LoadedFirstStage {
                factor: vae_cfg.downsampling(),
                latent_channels: vae_cfg.latent_channels,
                pretrained_scale: None,
                fingerprint: file_fingerprint(&weights)?,
                weights,
                model: FirstStage::Kl(vae),
                kind: FirstStageKind::Kl(vae_cfg),
            })
        }
        Architecture::Vqvae => {
            let (stage_cfg, vq, weights) = load_run(path, &[], |c| Ok(c.model.vqvae.init(device)))?;
            Ok(LoadedFirstStage {
                factor: VQVAEConfig::DOWNSAMPLING,
                latent_channels: stage_cfg.model.vqvae.embedding_dim,
                pretrained_scale: None,
                fingerprint: file_fingerprint(&weights)?,
                weights,
                model: FirstStage::Vq(vq),
                kind: FirstStageKind::Vq(Box::new(stage_cfg)),
            })
        }
        other => Err(stage_error(format!(
            "model.ldm.first_stage = {}: that run is a {other:?}, not an autoencoder_kl or \
             vqvae run (or a Stable Diffusion model)",
            path.display()
        ))),
    }
}

/// The LDM paper's `scale_by_std`: 1 / std of the first training batch's latents (posterior
/// samples, with noise from `seed`), so the diffusion sees unit-variance latents.
fn latent_scale(
    first: &FirstStage,
    cfg: &Config,
    dataset: &Dataset,
    device: &Device,
) -> Result<f64, TrainError> {
    let b = cfg.train.batch_size.min(dataset.len());
    let order = crate::data::loader::epoch_order(dataset.len(), cfg.run.seed, 0);
    let transform = cfg.data.transform().without_flip();
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.run.seed);
    let (images, shape) = transform.batch(dataset, &order[..b], &mut rng)?;
    let x = Tensor::<4>::from_data(TensorData::new(images, shape), device);
    let (mean, std) = first.moments(x);
    let mean = to_host(mean);
    let eps: Vec<f32> = (0..mean.len())
        .map(|_| rng.sample(rand_distr::StandardNormal))
        .collect();
    let z = latent_samples(&mean, std.map(to_host).as_deref(), &eps, 1.0);
    scale_by_std(&z).ok_or_else(|| {
        stage_error(
            "the first stage's latents of the first batch are all equal; cannot scale them by \
             their spread (set model.ldm.scale_factor)"
                .into(),
        )
    })
}

// ------------------------------------------------------------------------------- stage 2

/// One text encoder of stage 2: its part in the objective, and what the export needs of it.
struct Text {
    part: TextPart,
    /// Where the tokenizer files are (copied into the export).
    tokenizer_dir: PathBuf,
    /// The trained encoder's config, or the pretrained one's.
    config: CLIPTextConfig,
    fingerprint: Option<(String, String)>,
}

/// The resume fingerprint's name of the `i`-th pretrained text encoder.
fn text_fingerprint_name(i: usize) -> String {
    match i {
        0 => "text encoder".into(),
        i => format!("text encoder {}", i + 1),
    }
}

/// The text encoders of stage 2: every encoder (and tokenizer) of a pretrained folder, frozen;
/// else one trained from scratch on a vocabulary learned from the captions.
fn text_sides(cfg: &Config, dataset: &Dataset, device: &Device) -> Result<Vec<Text>, TrainError> {
    let c = &cfg.model.conditioning;
    if let Some(dir) = &c.pretrained_text_encoder {
        let encoders = stable_diffusion::load_text_encoders(dir, device).map_err(|e| {
            TrainError::stage(
                format!(
                    "model.conditioning.pretrained_text_encoder = {}",
                    dir.display()
                ),
                e,
            )
        })?;
        return encoders
            .into_iter()
            .enumerate()
            .map(|(i, (te, weights))| {
                Ok(Text {
                    part: TextPart {
                        slot: TextEncoderSlot::hidden_states(Arc::new(te.tokenizer)),
                        encoder: TextEncoder::Frozen(te.model),
                    },
                    tokenizer_dir: dir.join(component_name("tokenizer", i)),
                    config: te.config,
                    fingerprint: Some((text_fingerprint_name(i), file_fingerprint(&weights)?)),
                })
            })
            .collect();
    }
    // A vocabulary learned from the captions, written where diffusers can read it.
    let captions: Vec<&str> = (0..dataset.len())
        .filter_map(|i| dataset.caption(i))
        .collect();
    if captions.is_empty() {
        return Err(stage_error(format!(
            "model.conditioning.kind = \"text\" but {} has no captions (a metadata.jsonl \
             with a \"text\" per image)",
            dataset.path().display()
        )));
    }
    let (vocab, merges) = learn_bpe(&captions, c.vocab_size)
        .map_err(|e| TrainError::stage("cannot learn a vocabulary from the captions", e))?;
    let dir = cfg.output_dir().join("tokenizer");
    write_tokenizer_dir(&dir, &vocab, &merges, c.max_length)?;
    let tokenizer = ClipTokenizer::from_dir(&dir)
        .map_err(|e| TrainError::stage("cannot read back the learned tokenizer", e))?;
    let config = trained_text_config(&tokenizer, c);
    Ok(vec![Text {
        part: TextPart {
            slot: TextEncoderSlot::hidden_states(Arc::new(tokenizer)),
            encoder: TextEncoder::Trained(config.clone()),
        },
        tokenizer_dir: dir,
        config,
        fingerprint: None,
    }])
}

/// The config of the text encoder trained from scratch with `tokenizer`.
fn trained_text_config(
    tokenizer: &ClipTokenizer,
    c: &crate::models::latent_diffusion::ConditioningConfig,
) -> CLIPTextConfig {
    CLIPTextConfig {
        vocab_size: tokenizer.vocab_size(),
        max_position_embeddings: tokenizer.max_length,
        bos_token_id: tokenizer.bos as usize,
        eos_token_id: tokenizer.eos as usize,
        pad_token_id: tokenizer.pad as usize,
        ..c.clip.clone()
    }
}

/// Stage 2: trains the conditional latent backbone, first training stage 1 from
/// `model.ldm.first_stage_config` when that is set and `first_stage` holds no weights yet.
pub fn train_ldm(
    cfg: &Config,
    opts: &TrainOptions,
) -> Result<TrainOutcome<LatentDiffusionModel>, TrainError> {
    let ldm = &cfg.model.ldm;
    let cond_cfg = &cfg.model.conditioning;
    if !Pretrained::looks_like(&ldm.first_stage)
        && let Some(stage_path) = &ldm.first_stage_config
    {
        let ready = || locate(&ldm.first_stage).is_ok();
        let key = "model.ldm.first_stage";
        super::chain::ensure_stage(key, &ldm.first_stage, stage_path, ready, opts, cfg)?;
        if !opts.quiet {
            eprintln!("stage 2: training the latent diffusion backbone");
        }
    }
    let device = parse_device(&cfg.run.device)?;
    let mut first = load_first_stage(ldm, &device)?;
    let res = cfg.data.resolution;
    let backbone_cfg = ldm.backbone_config(cond_cfg);
    let mut problems = Vec::new();
    if !res.is_multiple_of(first.factor) {
        problems.push(format!(
            "data.resolution = {res} is not divisible by the first stage's factor {}",
            first.factor
        ));
    }
    let (in_channels, out_channels) = backbone_cfg.channels();
    if in_channels != first.latent_channels || out_channels != first.latent_channels {
        problems.push(format!(
            "model.ldm.backbone in_channels/out_channels = {in_channels}/{out_channels} but the \
             first stage's latents have {} channels",
            first.latent_channels
        ));
    }
    if !problems.is_empty() {
        return Err(stage_error(problems.join("; ")));
    }
    let dataset = Dataset::open(cfg.data.source, &cfg.data.path, cfg.data.on_bad_image)?;
    let scale = match (ldm.scale_factor, first.pretrained_scale) {
        (Some(s), _) | (None, Some(s)) => s,
        (None, None) => latent_scale(&first.model, cfg, &dataset, &device)?,
    };
    if !opts.quiet {
        eprintln!("latent scale: {scale:.6} (latents are multiplied by it)");
    }
    let mut text = match cond_cfg.kind {
        ConditioningKind::Text => {
            dataset.require_captions(cfg.data.allow_empty_captions)?;
            let text = text_sides(cfg, &dataset, &device)?;
            // Before the latent cache is built: the backbone reads the encoders' output.
            let width: usize = text.iter().map(|t| t.config.hidden_size).sum();
            if let (Some(dir), Some(want)) = (
                &cond_cfg.pretrained_text_encoder,
                backbone_cfg.context_width(),
            ) && want != width
            {
                return Err(stage_error(format!(
                    "model.ldm.backbone.cross_attention_dim = {want} does not fit \
                     model.conditioning.pretrained_text_encoder = {} (its text encoder's \
                     hidden_size is {width}); the two must be equal",
                    dir.display()
                )));
            }
            text
        }
        _ => Vec::new(),
    };
    let lat = [
        first.latent_channels,
        res / first.factor,
        res / first.factor,
    ];
    let cache = super::latent_cache::latent_cache(
        cfg,
        &first.model,
        &first.fingerprint,
        &dataset,
        &device,
        opts.quiet,
    )?;
    // Mixed precision: from here the frozen first stage and a pretrained text encoder are held
    // in the compute dtype, shared by the objective and the sample grids. (The latent scale and
    // the latent cache above come from the f32 weights, so they do not depend on the precision.)
    let dtype = compute_dtype(cfg.train.mixed_precision);
    if dtype != burn::tensor::FloatDType::F32 {
        first.model = hold_frozen(first.model, dtype);
        for t in &mut text {
            t.part.encoder = t.part.encoder.clone().held_in(dtype);
        }
        crate::memory::release_cached();
    }
    let mut fingerprints = vec![("first stage".to_string(), first.fingerprint.clone())];
    fingerprints.extend(text.iter().filter_map(|t| t.fingerprint.clone()));
    let parts = LatentDiffusionParts {
        first_stage: first.model.clone(),
        scale,
        latent_shape: lat,
        text: text.iter().map(|t| t.part.clone()).collect(),
        cache,
        fingerprints,
        base_backbone: None,
        lora: None,
        cache_text: false,
    };
    // The resolved scale and latent size are part of the run's config (and so of every
    // checkpoint and the export): resuming with a first stage that gives another scale is
    // refused by name, and diffusers' default image size is the training resolution.
    let mut cfg = cfg.clone();
    cfg.model.ldm.scale_factor = Some(scale);
    cfg.model.ldm.backbone.set_sample_size(res / first.factor);
    let objective = LatentDiffusionObjective::new(
        &cfg.model.ldm,
        &cfg.model.conditioning,
        &cfg.diffusion,
        cfg.train.mixed_precision,
        cfg.train.batch_split,
        parts,
        &device,
    );
    let outputs = LdmOutputs {
        cfg: cfg.clone(),
        first,
        scale,
        text,
        objective: objective.clone(),
        dataset_prompts: Vec::new(),
    };
    super::train_run(&cfg, opts, objective, outputs)
}

/// The scheduler an LDM export samples with: DDIM over the training schedule.
pub fn scheduler_for(cfg: &Config) -> SchedulerConfig {
    let d = &cfg.diffusion;
    SchedulerConfig {
        kind: SamplerKind::Ddim,
        num_train_timesteps: d.num_train_timesteps,
        beta_schedule: d.beta_schedule,
        beta_start: d.beta_start,
        beta_end: d.beta_end,
        prediction_type: d.prediction_type,
        timestep_spacing: cfg.sample.timestep_spacing,
        steps_offset: 1,
        set_alpha_to_one: false,
        clip_sample: None,
    }
}

/// Grids and the export of a stage-2 run.
struct LdmOutputs {
    cfg: Config,
    first: LoadedFirstStage,
    scale: f64,
    text: Vec<Text>,
    objective: LatentDiffusionObjective,
    /// Captions for the grids when `sample.prompts` is empty.
    dataset_prompts: Vec<String>,
}

impl LdmOutputs {
    fn prompts(&self) -> Vec<String> {
        if self.cfg.sample.prompts.is_empty() {
            self.dataset_prompts.clone()
        } else {
            self.cfg.sample.prompts.clone()
        }
    }
}

impl Outputs<LatentDiffusionModel> for LdmOutputs {
    fn prepare(&mut self, dataset: &Dataset) -> Result<(), TrainError> {
        let mut seen = Vec::new();
        for i in 0..dataset.len() {
            if let Some(c) = dataset.caption(i)
                && !seen.iter().any(|s: &String| s == c)
            {
                seen.push(c.to_string());
                if seen.len() == 8 {
                    break;
                }
            }
        }
        seen.sort();
        self.dataset_prompts = seen;
        Ok(())
    }

    /// One row per prompt (text), per class (class) or plain samples (none), with guidance.
    fn grid(&self, weights: &LatentDiffusionModel, device: &Device) -> Result<Grid, TrainError> {
        let s = &self.cfg.sample;
        let cond_cfg = &self.cfg.model.conditioning;
        let first = self.first.model.clone().to_device(device);
        let decode = |z: Tensor<4>| first.decode(z);
        let scheduler = scheduler_for(&self.cfg);
        let model = LatentModel {
            backbone: &weights.backbone,
            decode: &decode,
            scale: self.scale,
            latent_channels: self.first.latent_channels,
            factor: self.first.factor,
            scheduler: &scheduler,
        };
        let res = self.cfg.data.resolution;
        let labels = |c: i64| {
            Conditioning::classes(Tensor::from_data(TensorData::new(vec![c], [1]), device))
        };
        let conds: Vec<Prompted> = match cond_cfg.kind {
            ConditioningKind::None => vec![Prompted {
                cond: Conditioning::none(),
                uncond: None,
            }],
            ConditioningKind::Class => (0..cond_cfg.num_classes.min(8))
                .map(|class| Prompted {
                    cond: labels(class as i64),
                    uncond: Some(labels(cond_cfg.num_classes as i64)),
                })
                .collect(),
            ConditioningKind::Text => {
                let prompts = self.prompts();
                let mut conds = Vec::new();
                for p in prompts.iter().take(8) {
                    let cond = self.objective.embed(weights, &[p], device);
                    let uncond = self.objective.embed(weights, &[""], device);
                    conds.push(Prompted {
                        cond,
                        uncond: Some(uncond),
                    });
                }
                conds
            }
        };
        let per = s.num_images.div_ceil(conds.len().max(1)).max(1);
        let mut images = Vec::new();
        let mut n = 0;
        for (i, cond) in conds.iter().enumerate() {
            let g = Generation {
                guidance_scale: s.guidance_scale,
                steps: s.num_inference_steps,
                sampler: Some(s.sampler),
                seed: s.seed + i as u64,
                first_index: 0,
                width: res,
                height: res,
                num: per,
                latents: None,
            };
            let out = generate(&model, cond, &g, device)
                .map_err(|e| TrainError::stage("cannot draw the sample grid", e))?;
            images.extend(to_host(out.clamp(-1.0, 1.0)));
            n += per;
        }
        let c = self.cfg.image_channels();
        Ok(Grid {
            images,
            shape: [n, c, res, res],
            columns: per,
        })
    }

    fn export(
        &self,
        weights: &LatentDiffusionModel,
        raw: Option<&LatentDiffusionModel>,
        dir: &Path,
    ) -> Result<(), TrainError> {
        let ldm = &self.cfg.model.ldm;
        let backbone = ldm.backbone_config(&self.cfg.model.conditioning);
        let component = backbone.component();
        let json = backbone.to_diffusers_json();
        for (m, suffix) in std::iter::once((weights, "")).chain(raw.map(|r| (r, "_no_ema"))) {
            let folder = format!("{component}{suffix}");
            save_weights(
                &m.backbone,
                &files::weights_path(dir, &folder, files::DIFFUSERS_WEIGHTS),
            )?;
            io::write_json(&dir.join(&folder).join(files::CONFIG), &json)?;
        }
        io::write_json(
            &dir.join(files::SCHEDULER_CONFIG),
            &scheduler_for(&self.cfg).to_diffusers_json(),
        )?;
        match &self.first.kind {
            FirstStageKind::Kl(vae_cfg) => {
                let vae_cfg = AutoencoderKLConfig {
                    scaling_factor: self.scale,
                    ..vae_cfg.clone()
                };
                if let FirstStage::Kl(vae) = &self.first.model {
                    save_weights(
                        vae,
                        &files::weights_path(dir, "vae", files::DIFFUSERS_WEIGHTS),
                    )?;
                }
                io::write_json(
                    &dir.join("vae").join(files::CONFIG),
                    &vae_cfg.to_diffusers_json(),
                )?;
            }
            FirstStageKind::Vq(stage_cfg) => {
                if let FirstStage::Vq(vq) = &self.first.model {
                    save_weights(vq, &super::stage_weights_file(Architecture::Vqvae, dir, ""))?;
                }
                io::write_atomic(&dir.join(vq::STAGE1_CONFIG), stage_cfg.to_toml().as_bytes())?;
            }
        }
        let kl = matches!(self.first.kind, FirstStageKind::Kl(_));
        let mut components: Vec<(String, &str, &str)> = Vec::new();
        for (i, text) in self.text.iter().enumerate() {
            let te: Option<&CLIPTextModel> = match &text.part.encoder {
                TextEncoder::Frozen(te) => Some(te),
                TextEncoder::Trained(_) | TextEncoder::Adapted(_) => {
                    weights.text_encoders.get(i).and_then(Option::as_ref)
                }
            };
            let (te_dir, tok_dir) = (
                component_name("text_encoder", i),
                component_name("tokenizer", i),
            );
            if let Some(te) = te {
                save_weights(
                    te,
                    &files::weights_path(dir, &te_dir, files::TRANSFORMERS_WEIGHTS),
                )?;
            }
            io::write_json(
                &dir.join(&te_dir).join(files::CONFIG),
                &text.config.to_transformers_json(),
            )?;
            files::copy_tokenizer(&text.tokenizer_dir, &dir.join(&tok_dir))?;
            components.push((te_dir, "transformers", "CLIPTextModel"));
            components.push((tok_dir, "transformers", "CLIPTokenizer"));
        }
        if kl && !self.text.is_empty() {
            components.extend([
                ("scheduler".to_string(), "diffusers", "DDIMScheduler"),
                (
                    component.to_string(),
                    "diffusers",
                    backbone.diffusers_class(),
                ),
                ("vae".to_string(), "diffusers", "AutoencoderKL"),
            ]);
            let components: Vec<(&str, &str, &str)> = components
                .iter()
                .map(|(n, l, c)| (n.as_str(), *l, *c))
                .collect();
            io::write_json(
                &dir.join(files::MODEL_INDEX),
                &files::model_index(
                    "StableDiffusionPipeline",
                    &components,
                    &["feature_extractor", "image_encoder", "safety_checker"],
                    &[("requires_safety_checker", false.into())],
                ),
            )?;
        }
        Ok(())
    }
}
