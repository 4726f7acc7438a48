//! diffusers `models/attention_processor.py` `Attention` and `models/attention.py`
//! (`BasicTransformerBlock`, `FeedForward` with `GEGLU`).
//!
//! One `Attention` serves every use: spatial self-attention with `group_norm`, biased
//! projections and a residual connection (`AttnDownBlock2D`, the mid blocks, the VAE), and the
//! transformer blocks' self- and cross-attention (`attn1`, `attn2`: no q/k/v bias). It computes
//! what `AttnProcessor2_0` computes: `softmax(q k^T / sqrt(d)) v` per head, in f32.

use burn::module::Module;
use burn::prelude::*;

use crate::kernels::{geglu, scaled_dot_product_attention, softmax_last};
use crate::nn::{GroupNorm, LayerNorm, Linear};

/// Multi-head scaled dot-product attention over `[b, n, heads * d]` projections, with an
/// optional causal mask (CLIP's text encoder).
///
/// # Shapes
/// - `q`: `[b, n, heads * d]`, `k`, `v`: `[b, m, heads * d]`; returns `[b, n, heads * d]`
pub fn multi_head_attention(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    heads: usize,
    causal: bool,
) -> Tensor<3> {
    let [b, n, inner] = q.dims();
    let m = k.dims()[1];
    let d = inner / heads;
    let split =
        |t: Tensor<3>, len: usize| -> Tensor<4> { t.reshape([b, len, heads, d]).swap_dims(1, 2) };
    let (q, k, v) = (split(q, n), split(k, m), split(v, m));
    if !causal {
        // The fused kernel: one query block's scores at a time (kernels::attention).
        let flat = |t: Tensor<4>, len: usize| -> Tensor<3> { t.reshape([b * heads, len, d]) };
        let out = scaled_dot_product_attention(flat(q, n), flat(k, m), flat(v, m));
        return out
            .reshape([b, heads, n, d])
            .swap_dims(1, 2)
            .reshape([b, n, inner]);
    }
    let mut scores = q
        .matmul(k.swap_dims(2, 3))
        .mul_scalar(1.0 / (d as f64).sqrt());
    {
        // -inf above the diagonal: position i attends to 0..=i (transformers'
        // `_create_4d_causal_attention_mask` uses the dtype's minimum; both give weight 0).
        // burn's `tril_mask` is true outside the lower triangle.
        let mask = Tensor::<2, Bool>::tril_mask([n, m], 0, &scores.device());
        scores = scores.mask_fill(
            mask.unsqueeze::<4>().expand([b, heads, n, m]),
            f32::NEG_INFINITY,
        );
    }
    let out = softmax_last(scores).matmul(v); // [b, heads, n, d]
    out.swap_dims(1, 2).reshape([b, n, inner])
}

/// diffusers `Attention`.
#[derive(Module, Debug)]
pub struct Attention {
    pub group_norm: Option<GroupNorm>,
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Vec<Linear>,
    pub heads: usize,
    pub residual_connection: bool,
}

impl Attention {
    /// Self-attention over the positions of a `[b, channels, h, w]` map as `AttnDownBlock2D`,
    /// `UNetMidBlock2D` and the VAE build it: group norm, biased q/k/v/out, residual.
    pub fn spatial(
        channels: usize,
        head_dim: usize,
        groups: usize,
        eps: f64,
        device: &Device,
    ) -> Self {
        Self {
            group_norm: Some(GroupNorm::new(groups, channels, eps, device)),
            to_q: Linear::new(channels, channels, true, device),
            to_k: Linear::new(channels, channels, true, device),
            to_v: Linear::new(channels, channels, true, device),
            to_out: vec![Linear::new(channels, channels, true, device)],
            heads: channels / head_dim,
            residual_connection: true,
        }
    }

    /// A transformer block's attention (`attn1` with `context_dim = None`, `attn2` with the
    /// text encoder's width): no q/k/v bias, biased output projection, no residual (the block
    /// adds it).
    pub fn transformer(
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        head_dim: usize,
        device: &Device,
    ) -> Self {
        let inner = heads * head_dim;
        let context = context_dim.unwrap_or(query_dim);
        Self {
            group_norm: None,
            to_q: Linear::new(query_dim, inner, false, device),
            to_k: Linear::new(context, inner, false, device),
            to_v: Linear::new(context, inner, false, device),
            to_out: vec![Linear::new(inner, query_dim, true, device)],
            heads,
            residual_connection: false,
        }
    }

    /// # Shapes
    /// - `x`: `[b, n, query_dim]`, `context`: `[b, m, context_dim]` (self-attention when
    ///   `None`); returns `[b, n, query_dim]`
    pub fn forward(&self, x: Tensor<3>, context: Option<Tensor<3>>) -> Tensor<3> {
        let q = self.to_q.forward(x.clone());
        let context = context.unwrap_or(x);
        let k = self.to_k.forward(context.clone());
        let v = self.to_v.forward(context);
        self.to_out[0].forward(multi_head_attention(q, k, v, self.heads, false))
    }

    /// Spatial self-attention with the group norm and the residual connection.
    ///
    /// # Shapes
    /// - `x`: `[b, c, h, w]`; returns the same
    pub fn forward_spatial(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let seq = x.clone().reshape([b, c, h * w]);
        let seq = match &self.group_norm {
            Some(norm) => norm.forward(seq),
            None => seq,
        };
        let out = self
            .forward(seq.swap_dims(1, 2), None)
            .swap_dims(1, 2)
            .reshape([b, c, h, w]);
        if self.residual_connection {
            out + x
        } else {
            out
        }
    }
}

/// `GEGLU`: `proj` to twice the width, then `hidden * gelu(gate)` (exact, erf-based GELU).
#[derive(Module, Debug)]
pub struct GEGLU {
    pub proj: Linear,
}

impl GEGLU {
    /// # Shapes
    /// - `x`: `[b, n, dim]`; returns `[b, n, inner]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        geglu(self.proj.forward(x))
    }
}

/// One entry of `FeedForward.net`: `net.0` is the GEGLU, `net.1` the dropout (its
/// probability; no parameters, and 0 in every model here), `net.2` the output projection.
#[derive(Module, Debug)]
pub enum FeedForwardLayer {
    Geglu(GEGLU),
    Dropout(f64),
    Linear(Linear),
}

/// `FeedForward(dim, activation_fn="geglu")`, mult 4.
#[derive(Module, Debug)]
pub struct FeedForward {
    pub net: Vec<FeedForwardLayer>,
}

impl FeedForward {
    pub fn new(dim: usize, device: &Device) -> Self {
        let inner = 4 * dim;
        Self {
            net: vec![
                FeedForwardLayer::Geglu(GEGLU {
                    proj: Linear::new(dim, 2 * inner, true, device),
                }),
                FeedForwardLayer::Dropout(0.0),
                FeedForwardLayer::Linear(Linear::new(inner, dim, true, device)),
            ],
        }
    }

    /// # Shapes
    /// - `x`: `[b, n, dim]`; returns the same
    pub fn forward(&self, mut x: Tensor<3>) -> Tensor<3> {
        for layer in &self.net {
            x = match layer {
                FeedForwardLayer::Geglu(g) => g.forward(x),
                FeedForwardLayer::Dropout(_) => x,
                FeedForwardLayer::Linear(l) => l.forward(x),
            };
        }
        x
    }
}

/// `BasicTransformerBlock` (norm_type "layer_norm"): self-attention, cross-attention on the
/// text embeddings, GEGLU feed-forward, each pre-normed with a residual.
#[derive(Module, Debug)]
pub struct BasicTransformerBlock {
    pub norm1: LayerNorm<1>,
    pub attn1: Attention,
    pub norm2: LayerNorm<1>,
    pub attn2: Attention,
    pub norm3: LayerNorm<1>,
    pub ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn new(
        dim: usize,
        heads: usize,
        head_dim: usize,
        cross_attention_dim: usize,
        device: &Device,
    ) -> Self {
        Self {
            norm1: LayerNorm::new([dim], device),
            attn1: Attention::transformer(dim, None, heads, head_dim, device),
            norm2: LayerNorm::new([dim], device),
            attn2: Attention::transformer(dim, Some(cross_attention_dim), heads, head_dim, device),
            norm3: LayerNorm::new([dim], device),
            ff: FeedForward::new(dim, device),
        }
    }

    /// # Shapes
    /// - `x`: `[b, n, dim]`, `context`: `[b, m, cross_attention_dim]` (without it `attn2`
    ///   attends to its own input, as in diffusers); returns `[b, n, dim]`
    pub fn forward(&self, x: Tensor<3>, context: Option<&Tensor<3>>) -> Tensor<3> {
        let x = self.attn1.forward(self.norm1.forward(x.clone()), None) + x;
        let x = self
            .attn2
            .forward(self.norm2.forward(x.clone()), context.cloned())
            + x;
        self.ff.forward(self.norm3.forward(x.clone())) + x
    }
}
