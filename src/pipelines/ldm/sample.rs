//! `sample` on a latent diffusion run: its export (the backbone, first stage, text encoders
//! and tokenizers beside it) or a checkpoint (the model file, with the first stage from
//! `model.ldm.first_stage` and the tokenizer from the run), under the run's conditioning.

use std::path::Path;
use std::sync::Arc;

use burn::prelude::*;

use super::super::stable_diffusion::{self, Pretrained};
use super::super::text_to_image::{Generation, LatentModel, Prompted, generate};
use super::super::vq;
use super::{load_first_stage, scheduler_for, trained_text_config};
use crate::checkpoint;
use crate::config::Config;
use crate::io;
use crate::io::image::Grid;
use crate::io::layout as files;
use crate::models::backbone::{BackboneConfig, Conditioning};
use crate::models::clip::CLIPTextModel;
use crate::models::latent_diffusion::{ConditioningKind, FirstStage, LatentDiffusionModel};
use crate::models::text_encoders::{TextEncoderSlot, encode};
use crate::models::vqvae::VQVAEConfig;
use crate::nn::to_host;
use crate::tokenizer::ClipTokenizer;
use crate::train::TrainError;

/// A stage-2 run loaded for sampling.
struct LoadedLdm {
    model: LatentDiffusionModel,
    first: FirstStage,
    factor: usize,
    latent_channels: usize,
    /// The text encoders (slot and model, in order), for text conditioning.
    text: Vec<(TextEncoderSlot, CLIPTextModel)>,
}

fn pretrained_error(e: stable_diffusion::PretrainedError) -> TrainError {
    TrainError::stage("cannot load the run's export", e)
}

/// The frozen text encoders of a folder, as slots and models.
fn frozen_text(
    dir: &Path,
    device: &Device,
) -> Result<Vec<(TextEncoderSlot, CLIPTextModel)>, TrainError> {
    Ok(stable_diffusion::load_text_encoders(dir, device)
        .map_err(pretrained_error)?
        .into_iter()
        .map(|(te, _)| {
            (
                TextEncoderSlot::hidden_states(Arc::new(te.tokenizer)),
                te.model,
            )
        })
        .collect())
}

/// Loads a stage-2 run: from a checkpoint (`weights` is its model file: the backbone and a
/// trained text encoder; the first stage from `model.ldm.first_stage`, the tokenizer from the
/// run) or from an export in `root` (`unet/`, `vae/` or `vqvae/`, `text_encoder/`,
/// `tokenizer/`).
fn load_ldm(
    cfg: &Config,
    root: &Path,
    weights: Option<&Path>,
    device: &Device,
) -> Result<LoadedLdm, TrainError> {
    let ldm = &cfg.model.ldm;
    let cond_cfg = &cfg.model.conditioning;
    let text = cond_cfg.kind == ConditioningKind::Text;
    let backbone_cfg: BackboneConfig = ldm.backbone_config(cond_cfg);
    let Some(weights) = weights else {
        // An export.
        let backbone = io::safetensors::load_file(
            backbone_cfg.init(device),
            &files::weights_path(root, backbone_cfg.component(), files::DIFFUSERS_WEIGHTS),
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
            frozen_text(root, device)?
        } else {
            Vec::new()
        };
        return Ok(LoadedLdm {
            model: LatentDiffusionModel {
                backbone,
                text_encoders: Vec::new(),
            },
            first,
            factor,
            latent_channels,
            text,
        });
    };
    let first = load_first_stage(ldm, device)?;
    let trained_te = text && cond_cfg.pretrained_text_encoder.is_none();
    let trained = if trained_te {
        let tokenizer_dir = cfg.output_dir().join("tokenizer");
        let tok = ClipTokenizer::from_dir(&tokenizer_dir).map_err(|e| {
            TrainError::stage(
                "cannot read the run's tokenizer (written when it started training)",
                e,
            )
        })?;
        let te_cfg = trained_text_config(&tok, cond_cfg);
        Some((tok, te_cfg))
    } else {
        None
    };
    let model = LatentDiffusionModel {
        backbone: backbone_cfg.init(device),
        text_encoders: trained.iter().map(|(_, c)| Some(c.init(device))).collect(),
    };
    let model = io::safetensors::load_file(model, weights)?;
    let text = match (text, trained, &cond_cfg.pretrained_text_encoder) {
        (false, _, _) => Vec::new(),
        (true, Some((tok, _)), _) => {
            let te = model.text_encoders[0].clone().expect("built above");
            vec![(TextEncoderSlot::hidden_states(Arc::new(tok)), te)]
        }
        (true, None, Some(dir)) => frozen_text(dir, device)?,
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
pub fn load_sampler(
    cfg: Config,
    root: &Path,
    weights: Option<&Path>,
    req: &super::super::SampleRequest,
    device: Device,
    weights_path: std::path::PathBuf,
) -> Result<super::super::Loaded, super::super::PipelineError> {
    let bad = |m: String| super::super::PipelineError::Invalid(m);
    let (cfg, device) = (&cfg, &device);
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
    let labels =
        |c: i64| Conditioning::classes(Tensor::from_data(TensorData::new(vec![c], [1]), device));
    let prompted = match kind {
        ConditioningKind::None => Prompted {
            cond: Conditioning::none(),
            uncond: None,
        },
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
            Prompted {
                cond: labels(class as i64),
                uncond: Some(labels(n as i64)),
            }
        }
        ConditioningKind::Text => {
            let slots: Vec<TextEncoderSlot> = loaded.text.iter().map(|(s, _)| s.clone()).collect();
            let models: Vec<&CLIPTextModel> = loaded.text.iter().map(|(_, m)| m).collect();
            let embed = |p: &str| encode(&slots, &models, &[p], None, device);
            let text_error =
                |e: crate::models::text_encoders::TextError| super::super::PipelineError::Text(e);
            Prompted {
                cond: embed(req.prompt.as_deref().unwrap_or("")).map_err(text_error)?,
                uncond: Some(
                    embed(req.negative_prompt.as_deref().unwrap_or("")).map_err(text_error)?,
                ),
            }
        }
    };
    let res = cfg.data.resolution;
    let latents = match &req.latents {
        Some(file) => Some(super::super::text_to_image::read_latents(file, device)?),
        None => None,
    };
    let g = Generation {
        guidance_scale: req.guidance_scale.unwrap_or(cfg.sample.guidance_scale),
        steps: req.steps.unwrap_or(cfg.sample.num_inference_steps),
        sampler: Some(req.sampler.unwrap_or(cfg.sample.sampler)),
        seed: req.seed,
        first_index: 0,
        width: req.width.unwrap_or(res),
        height: req.height.unwrap_or(res),
        num: match &latents {
            Some(l) => req.num.unwrap_or(l.dims()[0]),
            None => req.num.unwrap_or(16),
        },
        latents,
    };
    let scheduler = scheduler_for(cfg);
    let image = [cfg.image_channels(), g.height, g.width];
    let (num, fixed, device) = (g.num, g.latents.is_some(), device.clone());
    Ok(super::super::Loaded::new(
        weights_path,
        image,
        num,
        fixed,
        move |first, n| {
            let decode = |z: Tensor<4>| loaded.first.decode(z);
            let model = LatentModel {
                backbone: &loaded.model.backbone,
                decode: &decode,
                scale,
                latent_channels: loaded.latent_channels,
                factor: loaded.factor,
                scheduler: &scheduler,
            };
            let batch = Generation {
                first_index: first,
                num: n,
                ..g.clone()
            };
            let images = generate(&model, &prompted, &batch, &device)?.clamp(-1.0, 1.0);
            let shape = images.dims();
            Ok(Grid::square(to_host(images), shape))
        },
    ))
}
