//! diffusers `models/attention_processor.py` `Attention` as the spatial self-attention of
//! `AttnDownBlock2D`, `UNetMidBlock2D` and the VAE's mid block (with `group_norm`, biased
//! projections and the residual connection), computed like `AttnProcessor2_0`.

use burn::module::Module;
use burn::prelude::*;

use crate::kernels::softmax_last;
use crate::nn::{GroupNorm, Linear};

/// `Attention` over spatial positions as `AttnDownBlock2D` builds it: group norm, q/k/v/out
/// linears with bias, residual connection, softmax upcast (a no-op in f32).
#[derive(Module, Debug)]
pub struct SpatialAttention {
    pub group_norm: GroupNorm,
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Vec<Linear>,
    pub heads: usize,
}

impl SpatialAttention {
    pub fn new(channels: usize, head_dim: usize, groups: usize, eps: f64, device: &Device) -> Self {
        Self {
            group_norm: GroupNorm::new(groups, channels, eps, device),
            to_q: Linear::new(channels, channels, true, device),
            to_k: Linear::new(channels, channels, true, device),
            to_v: Linear::new(channels, channels, true, device),
            to_out: vec![Linear::new(channels, channels, true, device)],
            heads: channels / head_dim,
        }
    }

    /// # Shapes
    /// - `x`: `[b, c, h, w]`; returns the same
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let n = h * w;
        let (heads, dh) = (self.heads, c / self.heads);
        let normed: Tensor<3> = self
            .group_norm
            .forward(x.clone().reshape([b, c, n]))
            .swap_dims(1, 2);
        let split = |t: Tensor<3>| -> Tensor<4> { t.reshape([b, n, heads, dh]).swap_dims(1, 2) };
        let q = split(self.to_q.forward(normed.clone()));
        let k = split(self.to_k.forward(normed.clone()));
        let v = split(self.to_v.forward(normed));
        let scores = q
            .matmul(k.swap_dims(2, 3))
            .mul_scalar(1.0 / (dh as f64).sqrt());
        let attn = softmax_last(scores).matmul(v); // [b, heads, n, dh]
        let merged: Tensor<3> = attn.swap_dims(1, 2).reshape([b, n, c]);
        let out = self.to_out[0]
            .forward(merged)
            .swap_dims(1, 2)
            .reshape([b, c, h, w]);
        out + x
    }
}
