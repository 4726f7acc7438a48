//! Stage 2 of latent diffusion: the diffusion recipe of `diffusion::training` on the latents of
//! a frozen first stage, as diffusers' `train_text_to_image.py` does for Stable Diffusion:
//! `z = (mean + std · ε) · scale` from the posterior (cached or encoded now), the caption through
//! the text encoder (or the class through the U-Net's class embedding), dropped to the empty
//! caption / null class with probability `cond_drop_prob` so sampling can use classifier-free
//! guidance, then noise, target and the (min-SNR weighted) MSE.
//!
//! Every random number of a micro-batch (posterior noise, dropout, timesteps and noise) is drawn
//! from the run's stream for the global batch, in sample order, so accumulation, data
//! parallelism, caching and resume all replay the same numbers.

use std::sync::Arc;

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::FloatDType;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::autoencoder::global_normals;
use crate::data::Batch;
use crate::data::latent_cache::LatentCache;
use crate::diffusion::DiffusionConfig;
use crate::diffusion::schedule::NoiseSchedule;
use crate::diffusion::training::{NoiseDraw, diffusion_loss};
use crate::models::clip::{CLIPTextConfig, CLIPTextModel};
use crate::models::latent_diffusion::{
    ConditioningConfig, ConditioningKind, FirstStage, LatentDiffusionConfig, LatentDiffusionModel,
    latent_samples,
};
use crate::models::lora::{LoraConfig, attach, is_adapter_key};
use crate::models::unet_2d_condition::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::nn::to_host;
use crate::optim::precision::{MixedPrecision, compute_dtype, hold_frozen};
use crate::tokenizer::ClipTokenizer;
use crate::train::TrainError;
use crate::train::objective::{Objective, backward_scaled, split_grads};

/// Where the text embeddings come from.
#[derive(Clone)]
pub enum TextEncoder {
    /// Trained with the U-Net (part of the model), from this config.
    Trained(CLIPTextConfig),
    /// Frozen, pretrained, on the objective's device.
    Frozen(CLIPTextModel),
    /// Pretrained and part of the model (LoRA adapters on it train).
    Adapted(CLIPTextModel),
}

/// Everything stage 2 needs besides the config. Under mixed precision the frozen networks
/// arrive held in the compute dtype: the pipelines cast them once, before sharing them with
/// their sample grids.
#[derive(Clone)]
pub struct LatentDiffusionParts {
    pub first_stage: FirstStage,
    /// Latents are multiplied by this.
    pub scale: f64,
    /// The latent shape `[c, h, w]` at the data's resolution.
    pub latent_shape: [usize; 3],
    pub tokenizer: Option<Arc<ClipTokenizer>>,
    pub text_encoder: Option<TextEncoder>,
    pub cache: Option<Arc<LatentCache>>,
    /// Hashes of the frozen first stage (and a pretrained text encoder), for resume checks.
    pub fingerprints: Vec<(String, String)>,
    /// A pretrained U-Net to start from instead of fresh weights (LoRA runs).
    pub base_unet: Option<UNet2DConditionModel>,
    /// LoRA: adapters on the base (the rest frozen); checkpoints then hold the adapters only.
    pub lora: Option<LoraConfig>,
    /// Keep a frozen text encoder's embedding of each caption after its first use.
    pub cache_text: bool,
}

impl TextEncoder {
    /// A pretrained encoder's weights held in `dtype` (mixed precision); a trained one's
    /// config is left alone (its weights are master weights, f32).
    pub fn held_in(self, dtype: FloatDType) -> Self {
        match self {
            Self::Frozen(m) => Self::Frozen(hold_frozen(m, dtype)),
            Self::Adapted(m) => Self::Adapted(hold_frozen(m, dtype)),
            trained => trained,
        }
    }
}

#[derive(Clone)]
pub struct LatentDiffusionObjective {
    unet: UNet2DConditionConfig,
    kind: ConditioningKind,
    cond_drop_prob: f64,
    num_classes: usize,
    diffusion: DiffusionConfig,
    schedule: NoiseSchedule,
    dtype: FloatDType,
    /// `train.batch_split`: slices of a micro-batch computed concurrently.
    batch_split: usize,
    parts: LatentDiffusionParts,
    /// Where the frozen networks live (the rank's device).
    device: Device,
    /// `train.learning_rate` (the text encoder adapters' rate is relative to it).
    pub base_lr: f64,
    /// Frozen-encoder embeddings by caption (`cache_text`), `[len, hidden]` each.
    text_cache: Arc<std::sync::Mutex<std::collections::HashMap<String, Vec<f32>>>>,
}

impl LatentDiffusionObjective {
    pub fn new(
        ldm: &LatentDiffusionConfig,
        conditioning: &ConditioningConfig,
        diffusion: &DiffusionConfig,
        precision: MixedPrecision,
        batch_split: usize,
        parts: LatentDiffusionParts,
        device: &Device,
    ) -> Self {
        Self {
            unet: ldm.unet_config(conditioning),
            kind: conditioning.kind,
            cond_drop_prob: conditioning.cond_drop_prob,
            num_classes: conditioning.num_classes,
            diffusion: diffusion.clone(),
            schedule: diffusion.schedule(),
            dtype: compute_dtype(precision),
            batch_split,
            parts,
            device: device.clone(),
            text_cache: Default::default(),
            base_lr: 1.0,
        }
    }

    /// `train.learning_rate`, for a separate text encoder rate.
    pub fn with_base_lr(mut self, lr: f64) -> Self {
        self.base_lr = lr;
        self
    }

    /// Uses `unet` as the U-Net's config (a pretrained base's own).
    pub fn with_unet_config(mut self, unet: UNet2DConditionConfig) -> Self {
        self.unet = unet;
        self
    }

    /// The posteriors `(mean, std)` of the batch's images on the host, `[b, c, h, w]` each.
    fn moments(&self, batch: &Batch) -> (Vec<f32>, Option<Vec<f32>>) {
        if let Some(cache) = &self.parts.cache {
            let (mut mean, mut std) = (Vec::new(), Vec::new());
            for (&i, &f) in batch.indices.iter().zip(&batch.flipped) {
                let (m, s) = cache.get(i, f);
                mean.extend_from_slice(m);
                std.extend_from_slice(s);
            }
            return (mean, Some(std));
        }
        let x = Tensor::<4>::from_data(
            TensorData::new(batch.images.clone(), batch.shape),
            &self.device,
        );
        let (mean, std) = self.parts.first_stage.moments(x.cast(self.dtype));
        (to_host(mean), std.map(to_host))
    }

    /// The conditioning inputs of the batch after dropout: captions or class labels.
    fn condition(
        &self,
        model: &LatentDiffusionModel,
        batch: &Batch,
        dropped: &[bool],
        device: &Device,
    ) -> (Tensor<3>, Option<Tensor<1, Int>>) {
        let b = batch.shape[0];
        let zeros = || Tensor::<3>::zeros([b, 1, self.unet.cross_attention_dim], device);
        match self.kind {
            ConditioningKind::None => (zeros(), None),
            ConditioningKind::Class => {
                let labels: Vec<i64> = batch
                    .labels
                    .iter()
                    .zip(dropped)
                    .map(|(l, &drop)| match l {
                        Some(l) if !drop => *l,
                        _ => self.num_classes as i64,
                    })
                    .collect();
                let labels = Tensor::<1, Int>::from_data(TensorData::new(labels, [b]), device);
                (zeros(), Some(labels))
            }
            ConditioningKind::Text => {
                let captions: Vec<&str> = batch
                    .captions
                    .iter()
                    .zip(dropped)
                    .map(|(c, &drop)| if drop { "" } else { c.as_deref().unwrap_or("") })
                    .collect();
                (self.embed(model, &captions, device), None)
            }
        }
    }

    /// Text embeddings of `captions`, `[n, len, hidden]`, on `device`.
    pub fn embed(
        &self,
        model: &LatentDiffusionModel,
        captions: &[&str],
        device: &Device,
    ) -> Tensor<3> {
        let tok = self
            .parts
            .tokenizer
            .as_ref()
            .expect("text conditioning is built with a tokenizer");
        let len = tok.max_length;
        // Captions that do not tokenize (never for valid UTF-8) become empty captions.
        let ids: Vec<i64> = captions
            .iter()
            .flat_map(|c| {
                tok.encode(c)
                    .or_else(|_| tok.encode(""))
                    .unwrap_or_default()
            })
            .map(i64::from)
            .collect();
        let n = captions.len();
        match (&model.text_encoder, &self.parts.text_encoder) {
            (Some(te), _) => {
                let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [n, len]), device);
                te.forward_in(ids, 1, self.dtype.into())
            }
            (None, Some(TextEncoder::Frozen(te))) => {
                if self.parts.cache_text {
                    let mut cache = self.text_cache.lock().expect("text cache lock");
                    let missing: Vec<usize> = (0..n)
                        .filter(|&i| !cache.contains_key(captions[i]))
                        .collect();
                    if !missing.is_empty() {
                        let ids: Vec<i64> = missing
                            .iter()
                            .flat_map(|&i| ids[i * len..(i + 1) * len].iter().copied())
                            .collect();
                        let m = missing.len();
                        let ids = Tensor::<2, Int>::from_data(
                            TensorData::new(ids, [m, len]),
                            &self.device,
                        );
                        let out = to_host(te.forward_in(ids, 1, self.dtype.into()));
                        let per = out.len() / m;
                        for (j, &i) in missing.iter().enumerate() {
                            cache.insert(
                                captions[i].to_string(),
                                out[j * per..(j + 1) * per].to_vec(),
                            );
                        }
                    }
                    let per = cache[captions[0]].len();
                    let values: Vec<f32> = captions
                        .iter()
                        .flat_map(|c| cache[*c].iter().copied())
                        .collect();
                    return Tensor::from_data(TensorData::new(values, [n, len, per / len]), device);
                }
                let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [n, len]), &self.device);
                let out = te.forward_in(ids, 1, self.dtype.into());
                let dims = out.dims();
                Tensor::from_data(TensorData::new(to_host(out), dims), device)
            }
            _ => Tensor::zeros([n, len, self.unet.cross_attention_dim], device),
        }
    }
}

impl Objective for LatentDiffusionObjective {
    type Model = LatentDiffusionModel;

    fn build(&self, device: &Device) -> Result<LatentDiffusionModel, TrainError> {
        let mut text_encoder = match &self.parts.text_encoder {
            Some(TextEncoder::Trained(cfg)) => Some(cfg.init(device)),
            Some(TextEncoder::Adapted(te)) => Some(te.clone().to_device(device)),
            _ => None,
        };
        let mut unet = match &self.parts.base_unet {
            Some(u) => u.clone().to_device(device),
            None => self.unet.init(device),
        };
        if let Some(l) = &self.parts.lora {
            let fail = |m: String| TrainError::Stage(m);
            unet = attach(unet, l, &l.target_modules, "lora.target_modules", device)
                .map_err(fail)?
                .0;
            if let Some(te) = text_encoder.take() {
                text_encoder = Some(if l.text_encoder {
                    attach(
                        te,
                        l,
                        &l.text_encoder_target_modules,
                        "lora.text_encoder_target_modules",
                        device,
                    )
                    .map_err(fail)?
                    .0
                } else {
                    te.no_grad()
                });
            }
        }
        Ok(LatentDiffusionModel { unet, text_encoder })
    }

    fn lr_factor(&self) -> Option<(fn(&str) -> bool, f64)> {
        let l = self.parts.lora.as_ref().filter(|l| l.text_encoder)?;
        let factor = l.text_encoder_lr? / self.base_lr;
        Some((
            |k: &str| k.starts_with("text_encoder.") && is_adapter_key(k),
            factor,
        ))
    }

    fn checkpoint_keys(&self) -> Option<fn(&str) -> bool> {
        self.parts
            .lora
            .as_ref()
            .map(|_| is_adapter_key as fn(&str) -> bool)
    }

    fn loss(
        &mut self,
        model: &LatentDiffusionModel,
        batch: &Batch,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Tensor<1> {
        let (b, global, offset) = (batch.shape[0], batch.global_size, batch.offset);
        let [c, h, w] = self.parts.latent_shape;
        let per = c * h * w;
        let (mean, std) = self.moments(batch);
        // z = (mean + std·ε)·scale, ε drawn for the global batch.
        let eps = global_normals(rng, global, per, offset, b);
        let z = latent_samples(&mean, std.as_deref(), &eps, self.parts.scale as f32);
        let drops: Vec<f32> = (0..global).map(|_| rng.random::<f32>()).collect();
        let dropped: Vec<bool> = drops[offset..offset + b]
            .iter()
            .map(|&u| (u as f64) < self.cond_drop_prob)
            .collect();
        // LoRA dropout masks replay on resume (seeded from the run's stream) and do not depend
        // on the split of the global batch (each sample's mask is found by its position).
        if self.parts.lora.as_ref().is_some_and(|l| l.dropout > 0.0) {
            crate::nn::set_lora_dropout_seed(Some((rng.random(), offset)));
        }
        let (context, labels) = self.condition(model, batch, &dropped, device);
        let shape = [b, c, h, w];
        let draw =
            NoiseDraw::for_slice(&self.diffusion, &self.schedule, shape, offset, global, rng);
        let loss = diffusion_loss(&z, shape, draw, self.dtype, device, |x, t| {
            model.unet.forward(x, t, &context, labels)
        });
        crate::nn::set_lora_dropout_seed(None);
        loss
    }

    fn grads(
        &mut self,
        model: &LatentDiffusionModel,
        batch: &Batch,
        scale: f64,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> (GradientsParams, f64) {
        if self.batch_split > 1 {
            split_grads(&*self, model, batch, self.batch_split, scale, rng, device)
        } else {
            backward_scaled(self.loss(model, batch, rng, device), scale, model)
        }
    }

    fn fingerprints(&self) -> Vec<(String, String)> {
        self.parts.fingerprints.clone()
    }

    fn place(&mut self, device: &Device) {
        self.parts.first_stage = self.parts.first_stage.clone().to_device(device);
        if let Some(TextEncoder::Frozen(te) | TextEncoder::Adapted(te)) =
            &mut self.parts.text_encoder
        {
            *te = te.clone().to_device(device);
        }
        self.device = device.clone();
    }
}
