//! Latent diffusion, stage 1: training an `AutoencoderKL` from scratch (CompVis' reconstruction
//! plus KL loss, `train::objectives::autoencoder`), its `input | reconstruction` grids and its
//! diffusers `vae/` export. Stage 2 is `pipelines::ldm`.

use std::path::Path;

use burn::prelude::*;

use super::{save_weights, stage_weights_file};
use crate::config::Config;
use crate::data::Dataset;
use crate::io;
use crate::io::image::Grid;
use crate::models::Architecture;
use crate::models::autoencoder_kl::AutoencoderKL;
use crate::nn::to_host;
use crate::train::objectives::autoencoder::AutoencoderObjective;
use crate::train::{Outputs, TrainError, TrainOptions, TrainOutcome};

/// Stage 1: trains the `AutoencoderKL` `cfg` describes.
pub fn train_autoencoder(
    cfg: &Config,
    opts: &TrainOptions,
) -> Result<TrainOutcome<AutoencoderKL>, TrainError> {
    let outputs = AutoencoderOutputs {
        cfg: cfg.clone(),
        fixed: None,
    };
    super::train_run(
        cfg,
        opts,
        AutoencoderObjective::new(&cfg.model.autoencoder, cfg.train.mixed_precision),
        outputs,
    )
}

/// Reconstruction grids and the diffusers `vae/` export of a stage-1 run.
struct AutoencoderOutputs {
    cfg: Config,
    fixed: Option<(Vec<f32>, [usize; 4])>,
}

impl Outputs<AutoencoderKL> for AutoencoderOutputs {
    fn prepare(&mut self, dataset: &Dataset) -> Result<(), TrainError> {
        self.fixed = Some(super::fixed_batch(&self.cfg, dataset)?);
        Ok(())
    }

    /// `input | reconstruction` (decoded from the posterior mean).
    fn grid(&self, weights: &AutoencoderKL, device: &Device) -> Result<Grid, TrainError> {
        let (images, shape) = self.fixed.as_ref().ok_or_else(|| {
            TrainError::Incompatible("the reconstruction batch was not prepared".into())
        })?;
        let x = Tensor::<4>::from_data(TensorData::new(images.clone(), *shape), device);
        let recon = to_host(weights.decode(weights.encode(x).mode()).clamp(-1.0, 1.0));
        Ok(super::pairs_grid(images, *shape, &recon))
    }

    /// `vae/` (and `vae_no_ema/`): a diffusers `AutoencoderKL` folder.
    fn export(
        &self,
        weights: &AutoencoderKL,
        raw: Option<&AutoencoderKL>,
        dir: &Path,
    ) -> Result<(), TrainError> {
        let json = self.cfg.model.autoencoder.vae.to_diffusers_json();
        for (m, sub) in std::iter::once((weights, "vae")).chain(raw.map(|r| (r, "vae_no_ema"))) {
            save_weights(
                m,
                &stage_weights_file(Architecture::AutoencoderKl, dir, &sub[3..]),
            )?;
            io::write_json(&dir.join(sub).join(io::layout::CONFIG), &json)?;
        }
        Ok(())
    }
}
