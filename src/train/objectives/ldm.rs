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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

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
use crate::lora::groups::adapter_groups;
use crate::lora::{Linears, LoraPlan, attach_selected};
use crate::models::backbone::{Backbone, BackboneConfig, Conditioning, LatentBackbone};
use crate::models::clip::{CLIPTextConfig, CLIPTextModel};
use crate::models::latent_diffusion::{
    ConditioningConfig, ConditioningKind, FirstStage, LatentDiffusionConfig, LatentDiffusionModel,
    latent_samples,
};
use crate::models::text_encoders::TextEncoderSlot;
use crate::nn::to_host;
use crate::optim::groups::ParamGroups;
use crate::optim::precision::{MixedPrecision, compute_dtype, hold_frozen};
use crate::train::TrainError;
use crate::train::objective::{Objective, backward_scaled, split_grads};

/// Where a text encoder's weights come from.
#[derive(Clone)]
pub enum TextEncoder {
    /// Trained with the backbone (part of the model), from this config.
    Trained(CLIPTextConfig),
    /// Frozen, pretrained, on the objective's device.
    Frozen(CLIPTextModel),
    /// Pretrained and part of the model (LoRA adapters on it train).
    Adapted(CLIPTextModel),
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

    /// Whether its weights are part of the trained model.
    pub fn trains(&self) -> bool {
        !matches!(self, Self::Frozen(_))
    }
}

/// One text encoder of stage 2: how the pipeline uses it and where its weights come from.
#[derive(Clone)]
pub struct TextPart {
    pub slot: TextEncoderSlot,
    pub encoder: TextEncoder,
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
    /// The text encoders, in the pipeline's order (empty unless conditioned on text).
    pub text: Vec<TextPart>,
    pub cache: Option<Arc<LatentCache>>,
    /// Hashes of the frozen first stage (and a pretrained text encoder), for resume checks.
    pub fingerprints: Vec<(String, String)>,
    /// A pretrained backbone to start from instead of fresh weights (LoRA runs).
    pub base_backbone: Option<Backbone>,
    /// LoRA: adapters on the base (the rest frozen); checkpoints then hold the adapters only.
    pub lora: Option<LoraPlan>,
    /// Keep a frozen text encoder's embedding of each caption after its first use.
    pub cache_text: bool,
}

/// Frozen-encoder embeddings by caption (`cache_text`), `[len, hidden]` each, per encoder.
type TextCache = Arc<Mutex<Vec<HashMap<String, Vec<f32>>>>>;

#[derive(Clone)]
pub struct LatentDiffusionObjective {
    backbone: BackboneConfig,
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
    text_cache: TextCache,
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
        let encoders = parts.text.len();
        Self {
            backbone: ldm.backbone_config(conditioning),
            kind: conditioning.kind,
            cond_drop_prob: conditioning.cond_drop_prob,
            num_classes: conditioning.num_classes,
            diffusion: diffusion.clone(),
            schedule: diffusion.schedule(),
            dtype: compute_dtype(precision),
            batch_split,
            parts,
            device: device.clone(),
            text_cache: Arc::new(Mutex::new(vec![HashMap::new(); encoders])),
            base_lr: 1.0,
        }
    }

    /// `train.learning_rate`, for a separate text encoder rate.
    pub fn with_base_lr(mut self, lr: f64) -> Self {
        self.base_lr = lr;
        self
    }

    /// Uses `backbone` as the backbone's config (a pretrained base's own).
    pub fn with_backbone_config(mut self, backbone: BackboneConfig) -> Self {
        self.backbone = backbone;
        self
    }

    /// The text encoders' slots, in order.
    pub fn text_slots(&self) -> Vec<TextEncoderSlot> {
        self.parts.text.iter().map(|t| t.slot.clone()).collect()
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

    /// The conditioning of the batch after dropout: captions or class labels.
    fn condition(
        &self,
        model: &LatentDiffusionModel,
        batch: &Batch,
        dropped: &[bool],
        device: &Device,
    ) -> Conditioning {
        let b = batch.shape[0];
        match self.kind {
            ConditioningKind::None => Conditioning::none(),
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
                Conditioning::classes(Tensor::from_data(TensorData::new(labels, [b]), device))
            }
            ConditioningKind::Text => {
                let captions: Vec<&str> = batch
                    .captions
                    .iter()
                    .zip(dropped)
                    .map(|(c, &drop)| if drop { "" } else { c.as_deref().unwrap_or("") })
                    .collect();
                self.embed(model, &captions, device)
            }
        }
    }

    /// The text conditioning of `captions` on `device`: each encoder's hidden states (trained
    /// ones from `model`, frozen ones from the objective, their embeddings cached by caption
    /// with `cache_text`), concatenated along the width.
    ///
    /// # Shapes
    /// - returns `context` `[n, len, Σ hidden]`
    pub fn embed(
        &self,
        model: &LatentDiffusionModel,
        captions: &[&str],
        device: &Device,
    ) -> Conditioning {
        let n = captions.len();
        let mut hidden = Vec::with_capacity(self.parts.text.len());
        for (i, part) in self.parts.text.iter().enumerate() {
            let tok = &part.slot.tokenizer;
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
            let clip_skip = part.slot.clip_skip;
            let trained = model.text_encoders.get(i).and_then(Option::as_ref);
            hidden.push(match (trained, &part.encoder) {
                (Some(te), _) => {
                    let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [n, len]), device);
                    te.forward_in(ids, clip_skip, self.dtype.into())
                }
                (None, TextEncoder::Frozen(te)) if self.parts.cache_text => {
                    let mut caches = self.text_cache.lock().expect("text cache lock");
                    let cache = &mut caches[i];
                    let missing: Vec<usize> = (0..n)
                        .filter(|&j| !cache.contains_key(captions[j]))
                        .collect();
                    if !missing.is_empty() {
                        let ids: Vec<i64> = missing
                            .iter()
                            .flat_map(|&j| ids[j * len..(j + 1) * len].iter().copied())
                            .collect();
                        let m = missing.len();
                        let ids = Tensor::<2, Int>::from_data(
                            TensorData::new(ids, [m, len]),
                            &self.device,
                        );
                        let out = to_host(te.forward_in(ids, clip_skip, self.dtype.into()));
                        let per = out.len() / m;
                        for (k, &j) in missing.iter().enumerate() {
                            cache.insert(
                                captions[j].to_string(),
                                out[k * per..(k + 1) * per].to_vec(),
                            );
                        }
                    }
                    let per = cache[captions[0]].len();
                    let values: Vec<f32> = captions
                        .iter()
                        .flat_map(|c| cache[*c].iter().copied())
                        .collect();
                    Tensor::from_data(TensorData::new(values, [n, len, per / len]), device)
                }
                (None, TextEncoder::Frozen(te)) => {
                    let ids =
                        Tensor::<2, Int>::from_data(TensorData::new(ids, [n, len]), &self.device);
                    let out = te.forward_in(ids, clip_skip, self.dtype.into());
                    let dims = out.dims();
                    Tensor::from_data(TensorData::new(to_host(out), dims), device)
                }
                (None, TextEncoder::Trained(_) | TextEncoder::Adapted(_)) => {
                    unreachable!("a trained text encoder is part of the model")
                }
            });
        }
        let context = match hidden.len() {
            1 => hidden.pop().expect("one encoder"),
            _ => Tensor::cat(hidden, 2),
        };
        Conditioning::text(context)
    }
}

impl Objective for LatentDiffusionObjective {
    type Model = LatentDiffusionModel;

    fn build(&self, device: &Device) -> Result<LatentDiffusionModel, TrainError> {
        // Text encoders first, then the backbone: the order the init RNG draws in.
        let mut text_encoders: Vec<Option<CLIPTextModel>> = self
            .parts
            .text
            .iter()
            .map(|t| match &t.encoder {
                TextEncoder::Trained(cfg) => Some(cfg.init(device)),
                TextEncoder::Adapted(te) => Some(te.clone().to_device(device)),
                TextEncoder::Frozen(_) => None,
            })
            .collect();
        let mut backbone = match &self.parts.base_backbone {
            Some(b) => b.clone().to_device(device),
            None => self.backbone.init(device),
        };
        if let Some(plan) = &self.parts.lora {
            let l = &plan.config;
            backbone = attach_selected(backbone, l, &plan.backbone, device);
            for (i, te) in text_encoders.iter_mut().enumerate() {
                if let Some(m) = te.take() {
                    *te = Some(match plan.text_encoders.get(i) {
                        Some(paths) if l.text_encoder => attach_selected(m, l, paths, device),
                        _ => m.no_grad(),
                    });
                }
            }
        }
        Ok(LatentDiffusionModel {
            backbone,
            text_encoders,
        })
    }

    /// LoRA: the adapters only (the text encoders' at `lora.text_encoder_lr`); otherwise the
    /// whole model.
    fn param_groups(&self, model: &LatentDiffusionModel) -> ParamGroups {
        let Some(l) = self.parts.lora.as_ref().map(|p| &p.config) else {
            return ParamGroups::whole_model();
        };
        let factor = match l.text_encoder_lr {
            Some(lr) if l.text_encoder => lr / self.base_lr,
            _ => 1.0,
        };
        let mut backbone = model.backbone.clone();
        let mut text: Vec<CLIPTextModel> = model.text_encoders.iter().flatten().cloned().collect();
        let mut text: Vec<&mut dyn Linears> =
            text.iter_mut().map(|t| t as &mut dyn Linears).collect();
        adapter_groups(&mut backbone, &mut text, factor)
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
        if self
            .parts
            .lora
            .as_ref()
            .is_some_and(|p| p.config.dropout > 0.0)
        {
            crate::lora::adapter::set_lora_dropout_seed(Some((rng.random(), offset)));
        }
        let cond = self.condition(model, batch, &dropped, device);
        let shape = [b, c, h, w];
        let draw =
            NoiseDraw::for_slice(&self.diffusion, &self.schedule, shape, offset, global, rng);
        let loss = diffusion_loss(&z, shape, draw, self.dtype, device, |x, t| {
            model.backbone.predict(x, t, &cond)
        });
        crate::lora::adapter::set_lora_dropout_seed(None);
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
        for part in &mut self.parts.text {
            if let TextEncoder::Frozen(te) | TextEncoder::Adapted(te) = &mut part.encoder {
                *te = te.clone().to_device(device);
            }
        }
        self.device = device.clone();
    }
}
