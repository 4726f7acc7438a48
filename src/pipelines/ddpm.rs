//! The pixel-space diffusion family end to end, like diffusers' `DDPMPipeline`: train a
//! denoiser, generate images with DDPM/DDIM, and export/read the pipeline folder
//! (`model_index.json`, `unet/`, `scheduler/`; `tutorial_unet/` for the tutorial U-Net, which has
//! no diffusers twin).

use std::path::{Path, PathBuf};

use burn::prelude::*;

use super::weights_file;
use crate::config::Config;
use crate::diffusion::sampling::{self, SamplerKind, SamplerOptions, TimestepSpacing};
use crate::io;
use crate::io::image::Grid;
use crate::models::DenoiserModel;
use crate::train::objectives::diffusion::DiffusionObjective;
use crate::train::{Outputs, TrainError, TrainOptions, TrainOutcome};

/// Trains a denoiser (`unet_2d` or `tutorial_unet`) with the diffusion loss.
pub fn train(cfg: &Config, opts: &TrainOptions) -> Result<TrainOutcome<DenoiserModel>, TrainError> {
    super::train_run(
        cfg,
        opts,
        DiffusionObjective::new(cfg),
        DdpmOutputs { cfg: cfg.clone() },
    )
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
    (seed, first): (u64, usize),
) -> (Vec<f32>, [usize; 4]) {
    let s = &cfg.sample;
    let res = cfg.data.resolution;
    let shape = [num, cfg.image_channels(), res, res];
    let schedule = cfg.diffusion.schedule();
    let opts = SamplerOptions {
        kind: sampler.unwrap_or(s.sampler),
        num_inference_steps: steps.unwrap_or(s.num_inference_steps),
        prediction: cfg.diffusion.prediction_type,
        spacing: s.timestep_spacing,
        eta: s.eta,
        clip_sample: s.clip_sample.then_some(s.clip_sample_range),
        set_alpha_to_one: true,
        steps_offset: 0,
    };
    let mut rngs = crate::seeds::ImageRngs::new(seed, first, num);
    let per_image = shape[1..].iter().product::<usize>();
    let mut randn =
        move || Tensor::<4>::from_data(TensorData::new(rngs.normals(per_image), shape), device);
    let initial = randn();
    let out = sampling::sample(model, &schedule, &opts, initial, &mut randn);
    let pixels = out
        .clamp(-1.0, 1.0)
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 after convert");
    (pixels, shape)
}

/// diffusers `DDPMScheduler` config matching the run's schedule.
fn scheduler_json(cfg: &Config) -> serde_json::Value {
    let d = &cfg.diffusion;
    serde_json::json!({
        "_class_name": "DDPMScheduler",
        "_diffusers_version": crate::io::layout::DIFFUSERS_VERSION,
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
    let weights: Vec<(&DenoiserModel, &str)> = std::iter::once((model, ""))
        .chain(raw.map(|r| (r, "_no_ema")))
        .collect();
    for (m, suffix) in weights {
        let mut meta = io::layout::pt_metadata();
        meta.insert(
            "difftrain_version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        );
        if matches!(m, DenoiserModel::Unet2d(_)) {
            let which = if suffix.is_empty() && raw.is_some() {
                "ema"
            } else {
                "training"
            };
            meta.insert("difftrain_weights".into(), which.into());
        }
        let path = weights_file(&cfg.model, dir, suffix);
        io::safetensors::save_module(&path, m, None, &meta)?;
        if let DenoiserModel::Unet2d(_) = m {
            io::write_json(
                &path.with_file_name(io::layout::CONFIG),
                &cfg.model.unet.to_diffusers_json(),
            )?;
        }
    }
    if let DenoiserModel::Unet2d(_) = model {
        io::write_json(
            &dir.join(io::layout::SCHEDULER_CONFIG),
            &scheduler_json(cfg),
        )?;
        io::write_json(
            &dir.join(io::layout::MODEL_INDEX),
            &io::layout::model_index(
                "DDPMPipeline",
                &[
                    ("scheduler", "diffusers", "DDPMScheduler"),
                    ("unet", "diffusers", "UNet2DModel"),
                ],
                &[],
                &[],
            ),
        )?;
    }
    Ok(dir.to_path_buf())
}

/// Sample grids and the `DDPMPipeline` export of a diffusion run.
pub struct DdpmOutputs {
    cfg: Config,
}

impl Outputs<DenoiserModel> for DdpmOutputs {
    fn grid(&self, weights: &DenoiserModel, device: &Device) -> Result<Grid, TrainError> {
        let s = &self.cfg.sample;
        let (images, shape) = generate(
            weights,
            &self.cfg,
            device,
            s.num_images,
            None,
            None,
            (s.seed, 0),
        );
        Ok(Grid::square(images, shape))
    }

    fn export(
        &self,
        weights: &DenoiserModel,
        raw: Option<&DenoiserModel>,
        dir: &Path,
    ) -> Result<(), TrainError> {
        export(weights, raw, &self.cfg, dir).map(|_| ())
    }
}
