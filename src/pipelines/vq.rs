//! The discrete family end to end: train the VQ-VAE (stage 1, `input | reconstruction` grids)
//! and the Gated PixelCNN prior over its codes (stage 2, training stage 1 first when a chained
//! config asks for it), sample code maps and decode them, and export/read both.
//!
//! A PixelCNN export carries a copy of its VQ-VAE (`vqvae/`, `vqvae.toml`) so it samples on its
//! own.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::prelude::*;

use super::{load_run, locate, save_weights, stage_weights_file};
use crate::config::Config;
use crate::data::Dataset;
use crate::device::parse_device;
use crate::io;
use crate::io::image::Grid;
use crate::models::Architecture;
use crate::models::pixelcnn::GatedPixelCNN;
use crate::models::vqvae::{VQVAE, VQVAEConfig};
use crate::nn::to_host;
use crate::train::objectives::vq::{PixelCnnObjective, VqvaeObjective};
use crate::train::{Outputs, TrainError, TrainOptions, TrainOutcome};

/// The file a PixelCNN export stores its VQ-VAE's config in (weights in `vqvae/`).
pub const STAGE1_CONFIG: &str = "vqvae.toml";

/// `<dir>/<name>/model.safetensors`, plus `<dir>/<name>_no_ema/` for the training weights.
fn export_pair<M: Module>(
    architecture: Architecture,
    weights: &M,
    raw: Option<&M>,
    dir: &Path,
) -> Result<(), TrainError> {
    save_weights(weights, &stage_weights_file(architecture, dir, ""))?;
    if let Some(raw) = raw {
        save_weights(raw, &stage_weights_file(architecture, dir, "_no_ema"))?;
    }
    Ok(())
}

/// Stage 1: trains the VQ-VAE `cfg` describes.
pub fn train_vqvae(cfg: &Config, opts: &TrainOptions) -> Result<TrainOutcome<VQVAE>, TrainError> {
    let outputs = VqvaeOutputs {
        cfg: cfg.clone(),
        fixed: None,
    };
    super::train_run(
        cfg,
        opts,
        VqvaeObjective::new(&cfg.model.vqvae, cfg.train.mixed_precision),
        outputs,
    )
}

/// Reconstruction grids and the `vqvae/` export of a stage-1 run.
pub struct VqvaeOutputs {
    cfg: Config,
    /// A fixed batch (the first images, unflipped) for the reconstruction grid.
    fixed: Option<(Vec<f32>, [usize; 4])>,
}

impl Outputs<VQVAE> for VqvaeOutputs {
    fn prepare(&mut self, dataset: &Dataset) -> Result<(), TrainError> {
        self.fixed = Some(super::fixed_batch(&self.cfg, dataset)?);
        Ok(())
    }

    /// Pairs `input | reconstruction`, four pairs to a row.
    fn grid(&self, weights: &VQVAE, device: &Device) -> Result<Grid, TrainError> {
        let Some((images, shape)) = &self.fixed else {
            return Err(TrainError::Incompatible(
                "the VQ-VAE grid needs the reconstruction batch prepare() fixes".into(),
            ));
        };
        let x = Tensor::<4>::from_data(TensorData::new(images.clone(), *shape), device);
        let (recon, _) = weights.forward(x);
        Ok(super::pairs_grid(
            images,
            *shape,
            &to_host(recon.clamp(-1.0, 1.0)),
        ))
    }

    fn export(&self, weights: &VQVAE, raw: Option<&VQVAE>, dir: &Path) -> Result<(), TrainError> {
        export_pair(Architecture::Vqvae, weights, raw, dir)
    }
}

/// A trained VQ-VAE with the config it was trained with.
#[derive(Clone)]
pub struct Stage1 {
    pub cfg: Config,
    pub model: VQVAE,
    pub weights: PathBuf,
}

/// Loads the VQ-VAE a PixelCNN run builds on: from `dir` when it is a PixelCNN export that
/// carries its own copy, else from `cfg.model.pixelcnn.vqvae`.
pub fn load_stage1(
    cfg: &Config,
    dir: Option<&Path>,
    device: &Device,
) -> Result<Stage1, TrainError> {
    let build = |c: &Config| Ok(c.model.vqvae.init(device));
    let (stage_cfg, model, weights) = match dir.filter(|d| d.join(STAGE1_CONFIG).is_file()) {
        Some(d) => {
            let stage_cfg = Config::load(&d.join(STAGE1_CONFIG), &[])?;
            let weights = stage_weights_file(Architecture::Vqvae, d, "");
            let model = io::safetensors::load_file(build(&stage_cfg)?, &weights)?;
            (stage_cfg, model, weights)
        }
        None => load_run(&cfg.model.pixelcnn.vqvae, &[], build)?,
    };
    if stage_cfg.model.architecture != Architecture::Vqvae {
        return Err(TrainError::Incompatible(format!(
            "model.pixelcnn.vqvae = {}: that run is a {:?}, not a VQ-VAE",
            cfg.model.pixelcnn.vqvae.display(),
            stage_cfg.model.architecture
        )));
    }
    Ok(Stage1 {
        cfg: stage_cfg,
        model,
        weights,
    })
}

/// Stage 2: trains the PixelCNN prior, first training stage 1 from
/// `model.pixelcnn.vqvae_config` when that is set and `model.pixelcnn.vqvae` holds no weights
/// yet, and checks that the two stages' data agree.
pub fn train_pixelcnn(
    cfg: &Config,
    opts: &TrainOptions,
) -> Result<TrainOutcome<GatedPixelCNN>, TrainError> {
    let p = &cfg.model.pixelcnn;
    if let Some(stage_path) = &p.vqvae_config {
        let ready = || locate(&p.vqvae).is_ok();
        super::chain::ensure_stage(
            "model.pixelcnn.vqvae",
            &p.vqvae,
            stage_path,
            ready,
            opts,
            cfg,
        )?;
        if !opts.quiet {
            eprintln!("stage 2: training the PixelCNN prior");
        }
    }
    let device = parse_device(&cfg.run.device)?;
    let stage1 = load_stage1(cfg, None, &device)?;
    let (a, b) = (&stage1.cfg.data, &cfg.data);
    if (a.resolution, a.color) != (b.resolution, b.color) {
        return Err(TrainError::Incompatible(format!(
            "the VQ-VAE at {} was trained on {:?} images at {}px, this config has {:?} at {}px; \
             data.resolution and data.color must match",
            cfg.model.pixelcnn.vqvae.display(),
            a.color,
            a.resolution,
            b.color,
            b.resolution
        )));
    }
    let objective = PixelCnnObjective::new(
        p,
        stage1.model.clone(),
        stage1.cfg.model.vqvae.num_embeddings,
        cfg.data.resolution,
        cfg.train.mixed_precision,
        &device,
    );
    let outputs = PixelCnnOutputs {
        cfg: cfg.clone(),
        stage1,
    };
    super::train_run(cfg, opts, objective, outputs)
}

/// Samples `num` code maps autoregressively with `temperature` and decodes them.
pub fn sample_images(
    prior: &GatedPixelCNN,
    vqvae: &VQVAE,
    resolution: usize,
    num: usize,
    temperature: f64,
    (seed, first): (u64, usize),
    device: &Device,
) -> Vec<f32> {
    let mut rngs = crate::seeds::ImageRngs::new(seed, first, num);
    let code_size = VQVAEConfig::code_size(resolution);
    let codes = prior.sample(num, code_size, code_size, temperature, &mut rngs, device);
    to_host(vqvae.decode(codes).clamp(-1.0, 1.0))
}

/// Sample grids and the self-contained export of a stage-2 run.
pub struct PixelCnnOutputs {
    cfg: Config,
    stage1: Stage1,
}

impl Outputs<GatedPixelCNN> for PixelCnnOutputs {
    fn grid(&self, weights: &GatedPixelCNN, device: &Device) -> Result<Grid, TrainError> {
        let s = &self.cfg.sample;
        let res = self.cfg.data.resolution;
        let stage1 = self.stage1.model.clone().to_device(device);
        let images = sample_images(
            weights,
            &stage1,
            res,
            s.num_images,
            s.temperature,
            (s.seed, 0),
            device,
        );
        Ok(Grid::square(
            images,
            [s.num_images, self.cfg.image_channels(), res, res],
        ))
    }

    /// `pixelcnn/` (and `pixelcnn_no_ema/`) plus a copy of the VQ-VAE (`vqvae/`, `vqvae.toml`),
    /// so the export samples on its own.
    fn export(
        &self,
        weights: &GatedPixelCNN,
        raw: Option<&GatedPixelCNN>,
        dir: &Path,
    ) -> Result<(), TrainError> {
        export_pair(Architecture::GatedPixelcnn, weights, raw, dir)?;
        save_weights(
            &self.stage1.model,
            &stage_weights_file(Architecture::Vqvae, dir, ""),
        )?;
        io::write_atomic(
            &dir.join(STAGE1_CONFIG),
            self.stage1.cfg.to_toml().as_bytes(),
        )?;
        Ok(())
    }
}
