//! The latent diffusion family end to end: train the first stage (`autoencoder_kl`), train the
//! conditional latent U-Net on a frozen first stage (ours, a VQ-VAE of the discrete family, or
//! a Stable Diffusion VAE), chained by one config when stage 1 is missing, and export what
//! diffusers loads: a `StableDiffusionPipeline` folder for text conditioning (vae, unet,
//! text_encoder, tokenizer, scheduler, model_index.json), unet/vae/scheduler for class or no
//! conditioning. A VQ first stage exports difftrain's own layout (diffusers has no loader for
//! the discrete family's VQ-VAE).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::module::Module;
use burn::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::stable_diffusion::{self, Pretrained};
use super::text_to_image::{Condition, Generation, LatentModel, generate, token_ids};
use super::{load_run, locate, save_weights, vq, weights_file};
use crate::checkpoint;
use crate::config::{Config, Resume};
use crate::data::Dataset;
use crate::data::latent_cache::fingerprint;
use crate::device::parse_device;
use crate::diffusion::sampling::SamplerKind;
use crate::diffusion::scheduler_config::SchedulerConfig;
use crate::io;
use crate::io::image::Grid;
use crate::models::Architecture;
use crate::models::autoencoder_kl::AutoencoderKLConfig;
use crate::models::clip::{CLIPTextConfig, CLIPTextModel};
use crate::models::latent_diffusion::{
    ConditioningKind, FirstStage, LatentDiffusionConfig, LatentDiffusionModel, latent_samples,
    scale_by_std,
};
use crate::models::vqvae::VQVAEConfig;
use crate::nn::to_host;
use crate::optim::precision::{compute_dtype, hold_frozen};
use crate::tokenizer::{ClipTokenizer, learn_bpe, write_tokenizer_dir};
use crate::train::objectives::ldm::{LatentDiffusionObjective, LatentDiffusionParts, TextEncoder};
use crate::train::{Outputs, TrainError, TrainOptions, TrainOutcome, train_with};

fn stage_error(message: String) -> TrainError {
    TrainError::Stage(message)
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
    Ok(fingerprint(&[&bytes]))
}

/// Loads `ldm.first_stage`: a Stable Diffusion model's VAE, or an `autoencoder_kl` / `vqvae`
/// run (output_dir, export or checkpoint).
pub fn load_first_stage(
    ldm: &LatentDiffusionConfig,
    device: &Device,
) -> Result<LoadedFirstStage, TrainError> {
    let path = &ldm.first_stage;
    if Pretrained::looks_like(path) {
        let source = Pretrained::detect(path, ldm.first_stage_config_from.as_deref())
            .map_err(|e| stage_error(e.to_string()))?;
        let (vae, cfg, weights) =
            stable_diffusion::load_vae(&source, device).map_err(|e| stage_error(e.to_string()))?;
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
    let transform = crate::data::Transform {
        random_flip: false,
        ..cfg.data.transform()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.run.seed);
    let mut images = Vec::new();
    for &i in &order[..b] {
        images.extend(transform.apply(dataset.decode(i)?, &mut rng));
    }
    let r = cfg.data.resolution;
    let x = Tensor::<4>::from_data(
        TensorData::new(images, [b, transform.channels(), r, r]),
        device,
    );
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

/// The text side of stage 2: a tokenizer and a frozen or trainable text encoder.
struct Text {
    tokenizer: Arc<ClipTokenizer>,
    encoder: TextEncoder,
    /// Where the tokenizer files are (copied into the export).
    tokenizer_dir: PathBuf,
    /// The trained encoder's config, or the pretrained one's.
    config: CLIPTextConfig,
    fingerprint: Option<(String, String)>,
}

fn text_side(cfg: &Config, dataset: &Dataset, device: &Device) -> Result<Text, TrainError> {
    let c = &cfg.model.conditioning;
    if let Some(dir) = &c.pretrained_text_encoder {
        let (te, config, tokenizer, weights) = stable_diffusion::load_text_encoder(dir, device)
            .map_err(|e| stage_error(e.to_string()))?;
        return Ok(Text {
            tokenizer: Arc::new(tokenizer),
            encoder: TextEncoder::Frozen(te),
            tokenizer_dir: dir.join("tokenizer"),
            config,
            fingerprint: Some(("text encoder".into(), file_fingerprint(&weights)?)),
        });
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
    let (vocab, merges) =
        learn_bpe(&captions, c.vocab_size).map_err(|e| stage_error(e.to_string()))?;
    let dir = cfg.output_dir().join("tokenizer");
    write_tokenizer_dir(&dir, &vocab, &merges, c.max_length)?;
    let tokenizer = ClipTokenizer::from_dir(&dir).map_err(|e| stage_error(e.to_string()))?;
    let config = CLIPTextConfig {
        vocab_size: tokenizer.vocab_size(),
        max_position_embeddings: c.max_length,
        bos_token_id: tokenizer.bos as usize,
        eos_token_id: tokenizer.eos as usize,
        pad_token_id: tokenizer.pad as usize,
        ..c.clip.clone()
    };
    Ok(Text {
        tokenizer: Arc::new(tokenizer),
        encoder: TextEncoder::Trained(config.clone()),
        tokenizer_dir: dir,
        config,
        fingerprint: None,
    })
}

/// Stage 2: trains the conditional latent U-Net, first training stage 1 from
/// `model.ldm.first_stage_config` when that is set and `first_stage` holds no weights yet.
pub fn train_ldm(
    cfg: &Config,
    opts: &TrainOptions,
) -> Result<TrainOutcome<LatentDiffusionModel>, TrainError> {
    let ldm = &cfg.model.ldm;
    let cond_cfg = &cfg.model.conditioning;
    if !Pretrained::looks_like(&ldm.first_stage)
        && let (Err(_), Some(stage_path)) = (locate(&ldm.first_stage), &ldm.first_stage_config)
    {
        let mut stage_cfg = Config::load(stage_path, &[])?;
        stage_cfg.checkpoint.resume = Resume::Latest;
        if !opts.quiet {
            eprintln!(
                "stage 1: {} holds no first stage yet; training it from {}",
                ldm.first_stage.display(),
                stage_path.display()
            );
        }
        super::train(&stage_cfg, opts)?;
        if !opts.quiet {
            eprintln!("stage 2: training the latent diffusion U-Net");
        }
    }
    let device = parse_device(&cfg.run.device)?;
    let mut first = load_first_stage(ldm, &device)?;
    let res = cfg.data.resolution;
    let unet_cfg = ldm.unet_config(cond_cfg);
    let mut problems = Vec::new();
    if res % first.factor != 0 {
        problems.push(format!(
            "data.resolution = {res} is not divisible by the first stage's factor {}",
            first.factor
        ));
    }
    if unet_cfg.in_channels != first.latent_channels
        || unet_cfg.out_channels != first.latent_channels
    {
        problems.push(format!(
            "model.ldm.unet in_channels/out_channels = {}/{} but the first stage's latents have \
             {} channels",
            unet_cfg.in_channels, unet_cfg.out_channels, first.latent_channels
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
        ConditioningKind::Text => Some(text_side(cfg, &dataset, &device)?),
        _ => None,
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
        text = text.map(|mut t| {
            t.encoder = t.encoder.held_in(dtype);
            t
        });
        crate::memory::release_cached();
    }
    let mut fingerprints = vec![("first stage".to_string(), first.fingerprint.clone())];
    fingerprints.extend(text.as_ref().and_then(|t| t.fingerprint.clone()));
    let parts = LatentDiffusionParts {
        first_stage: first.model.clone(),
        scale,
        latent_shape: lat,
        tokenizer: text.as_ref().map(|t| t.tokenizer.clone()),
        text_encoder: text.as_ref().map(|t| t.encoder.clone()),
        cache,
        fingerprints,
        base_unet: None,
        lora: None,
        cache_text: false,
    };
    // The resolved scale and latent size are part of the run's config (and so of every
    // checkpoint and the export): resuming with a first stage that gives another scale is
    // refused by name, and diffusers' default image size is the training resolution.
    let mut cfg = cfg.clone();
    cfg.model.ldm.scale_factor = Some(scale);
    cfg.model.ldm.unet.sample_size = res / first.factor;
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
    train_with(&cfg, opts, objective, outputs)
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
    text: Option<Text>,
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
        let ldm = &self.cfg.model.ldm;
        let cond_cfg = &self.cfg.model.conditioning;
        let first = self.first.model.clone().to_device(device);
        let decode = |z: Tensor<4>| first.decode(z);
        let scheduler = scheduler_for(&self.cfg);
        let model = LatentModel {
            unet: &weights.unet,
            decode: &decode,
            scale: self.scale,
            latent_channels: self.first.latent_channels,
            factor: self.first.factor,
            scheduler: &scheduler,
        };
        let res = self.cfg.data.resolution;
        let context = ldm.unet.cross_attention_dim;
        let conds: Vec<Condition> = match cond_cfg.kind {
            ConditioningKind::None => vec![Condition::None { context }],
            ConditioningKind::Class => (0..cond_cfg.num_classes.min(8))
                .map(|class| Condition::Class {
                    class: class as i64,
                    null: cond_cfg.num_classes as i64,
                    context,
                })
                .collect(),
            ConditioningKind::Text => {
                let prompts = self.prompts();
                let mut conds = Vec::new();
                for p in prompts.iter().take(8) {
                    let cond = self.objective.embed(weights, &[p], device);
                    let uncond = self.objective.embed(weights, &[""], device);
                    conds.push(Condition::Text { cond, uncond });
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
                width: res,
                height: res,
                num: per,
                latents: None,
            };
            let out = generate(&model, cond, &g, device).map_err(|e| stage_error(e.to_string()))?;
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
        let cond_cfg = &self.cfg.model.conditioning;
        let unet_json = ldm.unet_config(cond_cfg).to_diffusers_json();
        for (m, sub) in std::iter::once((weights, "unet")).chain(raw.map(|r| (r, "unet_no_ema"))) {
            save_weights(
                &m.unet,
                &weights_file(Architecture::LatentDiffusion, dir, &sub[4..]),
            )?;
            io::write_json(&dir.join(sub).join("config.json"), &unet_json)?;
        }
        io::write_json(
            &dir.join("scheduler/scheduler_config.json"),
            &scheduler_for(&self.cfg).to_diffusers_json(),
        )?;
        match &self.first.kind {
            FirstStageKind::Kl(vae_cfg) => {
                let vae_cfg = AutoencoderKLConfig {
                    scaling_factor: self.scale,
                    ..vae_cfg.clone()
                };
                if let FirstStage::Kl(vae) = &self.first.model {
                    save_weights(vae, &weights_file(Architecture::AutoencoderKl, dir, ""))?;
                }
                io::write_json(&dir.join("vae/config.json"), &vae_cfg.to_diffusers_json())?;
            }
            FirstStageKind::Vq(stage_cfg) => {
                if let FirstStage::Vq(vq) = &self.first.model {
                    save_weights(vq, &weights_file(Architecture::Vqvae, dir, ""))?;
                }
                io::write_atomic(&dir.join(vq::STAGE1_CONFIG), stage_cfg.to_toml().as_bytes())?;
            }
        }
        let kl = matches!(self.first.kind, FirstStageKind::Kl(_));
        if let Some(text) = &self.text {
            let te: Option<&CLIPTextModel> = match &text.encoder {
                TextEncoder::Frozen(te) => Some(te),
                TextEncoder::Trained(_) | TextEncoder::Adapted(_) => weights.text_encoder.as_ref(),
            };
            if let Some(te) = te {
                save_weights(te, &dir.join("text_encoder/model.safetensors"))?;
            }
            io::write_json(
                &dir.join("text_encoder/config.json"),
                &text.config.to_transformers_json(),
            )?;
            for f in [
                "vocab.json",
                "merges.txt",
                "special_tokens_map.json",
                "tokenizer_config.json",
                "tokenizer.json",
            ] {
                let src = text.tokenizer_dir.join(f);
                if src.is_file() {
                    let bytes = std::fs::read(&src).map_err(|source| {
                        TrainError::Io(io::IoError::Read { path: src, source })
                    })?;
                    io::write_atomic(&dir.join("tokenizer").join(f), &bytes)?;
                }
            }
            if kl {
                io::write_json(
                    &dir.join("model_index.json"),
                    &serde_json::json!({
                        "_class_name": "StableDiffusionPipeline",
                        "_diffusers_version": "0.32.0",
                        "feature_extractor": [null, null],
                        "image_encoder": [null, null],
                        "requires_safety_checker": false,
                        "safety_checker": [null, null],
                        "scheduler": ["diffusers", "DDIMScheduler"],
                        "text_encoder": ["transformers", "CLIPTextModel"],
                        "tokenizer": ["transformers", "CLIPTokenizer"],
                        "unet": ["diffusers", "UNet2DConditionModel"],
                        "vae": ["diffusers", "AutoencoderKL"],
                    }),
                )?;
            }
        }
        Ok(())
    }
}

// ------------------------------------------------------------------------------- sampling

/// A stage-2 run loaded for sampling.
struct LoadedLdm {
    model: LatentDiffusionModel,
    first: FirstStage,
    factor: usize,
    latent_channels: usize,
    /// The tokenizer and the encoder of the captions, for text conditioning.
    text: Option<(ClipTokenizer, CLIPTextModel)>,
}

fn pretrained_error(e: stable_diffusion::PretrainedError) -> TrainError {
    stage_error(e.to_string())
}

/// Loads a stage-2 run: from a checkpoint (`weights` is its model file: U-Net and a trained
/// text encoder; the first stage from `model.ldm.first_stage`, the tokenizer from the run) or
/// from an export in `root` (`unet/`, `vae/` or `vqvae/`, `text_encoder/`, `tokenizer/`).
fn load_ldm(
    cfg: &Config,
    root: &Path,
    weights: Option<&Path>,
    device: &Device,
) -> Result<LoadedLdm, TrainError> {
    let ldm = &cfg.model.ldm;
    let cond_cfg = &cfg.model.conditioning;
    let text = cond_cfg.kind == ConditioningKind::Text;
    let Some(weights) = weights else {
        // An export.
        let unet = io::safetensors::load_file(
            ldm.unet_config(cond_cfg).init(device),
            &weights_file(Architecture::LatentDiffusion, root, ""),
        )?;
        let (first, factor, latent_channels) = if root.join(vq::STAGE1_CONFIG).is_file() {
            let stage1 = vq::load_stage1(cfg, Some(root), device)?;
            let lc = stage1.cfg.model.vqvae.embedding_dim;
            (FirstStage::Vq(stage1.model), VQVAEConfig::DOWNSAMPLING, lc)
        } else {
            let (vae, vae_cfg, _) =
                stable_diffusion::load_vae(&Pretrained::Folder(root.into()), device)
                    .map_err(pretrained_error)?;
            (
                FirstStage::Kl(vae),
                vae_cfg.downsampling(),
                vae_cfg.latent_channels,
            )
        };
        let text = if text {
            let (te, _, tok, _) =
                stable_diffusion::load_text_encoder(root, device).map_err(pretrained_error)?;
            Some((tok, te))
        } else {
            None
        };
        return Ok(LoadedLdm {
            model: LatentDiffusionModel {
                unet,
                text_encoder: None,
            },
            first,
            factor,
            latent_channels,
            text,
        });
    };
    let first = load_first_stage(ldm, device)?;
    let trained_te = text && cond_cfg.pretrained_text_encoder.is_none();
    let text_encoder = if trained_te {
        let tokenizer_dir = cfg.output_dir().join("tokenizer");
        let tok = ClipTokenizer::from_dir(&tokenizer_dir).map_err(|e| {
            stage_error(format!(
                "{e} (the run's tokenizer, written when it started training)"
            ))
        })?;
        let te_cfg = CLIPTextConfig {
            vocab_size: tok.vocab_size(),
            max_position_embeddings: tok.max_length,
            bos_token_id: tok.bos as usize,
            eos_token_id: tok.eos as usize,
            pad_token_id: tok.pad as usize,
            ..cond_cfg.clip.clone()
        };
        Some((tok, te_cfg))
    } else {
        None
    };
    let model = LatentDiffusionModel {
        unet: ldm.unet_config(cond_cfg).init(device),
        text_encoder: text_encoder.as_ref().map(|(_, c)| c.init(device)),
    };
    let model = io::safetensors::load_file(model, weights)?;
    let text = match (text, text_encoder, &cond_cfg.pretrained_text_encoder) {
        (false, _, _) => None,
        (true, Some((tok, _)), _) => Some((tok, model.text_encoder.clone().expect("built above"))),
        (true, None, Some(dir)) => {
            let (te, _, tok, _) =
                stable_diffusion::load_text_encoder(dir, device).map_err(pretrained_error)?;
            Some((tok, te))
        }
        (true, None, None) => unreachable!("trained_te covers a missing pretrained encoder"),
    };
    Ok(LoadedLdm {
        model,
        factor: first.factor,
        latent_channels: first.latent_channels,
        first: first.model,
        text,
    })
}

/// `sample` on a stage-2 run, export or checkpoint. A text-conditioned KL export is a Stable
/// Diffusion folder and samples through `text_to_image` (the caller routes it there).
pub fn sample(
    cfg: &Config,
    root: &Path,
    weights: Option<&Path>,
    req: &super::SampleRequest,
    device: &Device,
) -> Result<Grid, super::PipelineError> {
    let bad = |m: String| super::PipelineError::Invalid(m);
    let ldm = &cfg.model.ldm;
    let cond_cfg = &cfg.model.conditioning;
    let kind = cond_cfg.kind;
    if kind != ConditioningKind::Text && (req.prompt.is_some() || req.negative_prompt.is_some()) {
        return Err(bad(format!(
            "this latent diffusion model is conditioned on {}: --prompt applies to text \
             conditioning{}",
            if kind == ConditioningKind::Class {
                "a class"
            } else {
                "nothing"
            },
            if kind == ConditioningKind::Class {
                " (use --class N)"
            } else {
                ""
            }
        )));
    }
    if kind != ConditioningKind::Class && req.class.is_some() {
        return Err(bad(
            "--class applies to class-conditioned models; this one is not".into(),
        ));
    }
    let loaded = load_ldm(cfg, root, weights, device)?;
    let scale = ldm.scale_factor.ok_or_else(|| {
        bad(format!(
            "{}: model.ldm.scale_factor is missing (training writes it)",
            root.join(checkpoint::CONFIG_FILE).display()
        ))
    })?;
    let context = ldm.unet.cross_attention_dim;
    let cond = match kind {
        ConditioningKind::None => Condition::None { context },
        ConditioningKind::Class => {
            let n = cond_cfg.num_classes;
            let class = req.class.ok_or_else(|| {
                bad(format!(
                    "this model is class-conditioned: give --class N with N in 0..{n}"
                ))
            })?;
            if class >= n {
                return Err(bad(format!("--class {class} must be in 0..{n}")));
            }
            Condition::Class {
                class: class as i64,
                null: n as i64,
                context,
            }
        }
        ConditioningKind::Text => {
            let (tok, te) = loaded
                .text
                .as_ref()
                .expect("text conditioning loads an encoder");
            let embed = |p: &str| -> Result<Tensor<3>, super::PipelineError> {
                let ids = token_ids(tok, &[p], device).map_err(|e| bad(e.to_string()))?;
                Ok(te.forward(ids, 1))
            };
            Condition::Text {
                cond: embed(req.prompt.as_deref().unwrap_or(""))?,
                uncond: embed(req.negative_prompt.as_deref().unwrap_or(""))?,
            }
        }
    };
    let decode = |z: Tensor<4>| loaded.first.decode(z);
    let scheduler = scheduler_for(cfg);
    let model = LatentModel {
        unet: &loaded.model.unet,
        decode: &decode,
        scale,
        latent_channels: loaded.latent_channels,
        factor: loaded.factor,
        scheduler: &scheduler,
    };
    let res = cfg.data.resolution;
    let g = Generation {
        guidance_scale: req.guidance_scale.unwrap_or(cfg.sample.guidance_scale),
        steps: req.steps.unwrap_or(cfg.sample.num_inference_steps),
        sampler: Some(req.sampler.unwrap_or(cfg.sample.sampler)),
        seed: req.seed,
        width: req.width.unwrap_or(res),
        height: req.height.unwrap_or(res),
        num: req.num.unwrap_or(16),
        latents: match &req.latents {
            Some(file) => Some(super::text_to_image::read_latents(file, device)?),
            None => None,
        },
    };
    let images = generate(&model, &cond, &g, device)?.clamp(-1.0, 1.0);
    let shape = images.dims();
    Ok(Grid::square(to_host(images), shape))
}
