//! diffusers `models/transformers/transformer_2d.py` `Transformer2DModel` for continuous
//! inputs: group norm, `proj_in` (1x1 conv, or linear with `use_linear_projection` as in SD 2.x),
//! `BasicTransformerBlock`s over the positions, `proj_out`, residual.

use burn::module::Module;
use burn::prelude::*;

use super::attention::BasicTransformerBlock;
use crate::nn::{Conv2d, GroupNorm, Linear};

/// `proj_in` / `proj_out`: a 1x1 convolution or a linear layer (same key, different shape).
#[derive(Module, Debug)]
pub enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

/// `Transformer2DModel`.
#[derive(Module, Debug)]
pub struct Transformer2DModel {
    pub norm: GroupNorm,
    pub proj_in: Projection,
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    pub proj_out: Projection,
}

/// What a `Transformer2DModel` is built from (the arguments `CrossAttnDownBlock2D` passes).
#[derive(Debug, Clone, Copy)]
pub struct Transformer2DSpec {
    pub heads: usize,
    pub head_dim: usize,
    pub layers: usize,
    pub cross_attention_dim: usize,
    pub norm_num_groups: usize,
    pub use_linear_projection: bool,
}

impl Transformer2DModel {
    pub fn new(channels: usize, spec: Transformer2DSpec, device: &Device) -> Self {
        let inner = spec.heads * spec.head_dim;
        let proj = |cin: usize, cout: usize| {
            if spec.use_linear_projection {
                Projection::Linear(Linear::new(cin, cout, true, device))
            } else {
                Projection::Conv(Conv2d::new(cin, cout, 1, 1, 0, device))
            }
        };
        // diffusers builds the norm with eps 1e-6 whatever the U-Net's norm_eps.
        let norm = GroupNorm::new(spec.norm_num_groups, channels, 1e-6, device);
        let proj_in = proj(channels, inner);
        let transformer_blocks = (0..spec.layers)
            .map(|_| {
                BasicTransformerBlock::new(
                    inner,
                    spec.heads,
                    spec.head_dim,
                    spec.cross_attention_dim,
                    device,
                )
            })
            .collect();
        Self {
            norm,
            proj_in,
            transformer_blocks,
            proj_out: proj(inner, channels),
        }
    }

    /// # Shapes
    /// - `x`: `[b, c, h, w]`, `context`: `[b, m, cross_attention_dim]` (self-attention in
    ///   `attn2` when `None`, as diffusers does); returns `[b, c, h, w]`
    pub fn forward(&self, x: Tensor<4>, context: Option<&Tensor<3>>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let to_seq = |t: Tensor<4>| -> Tensor<3> {
            let inner = t.dims()[1];
            t.reshape([b, inner, h * w]).swap_dims(1, 2)
        };
        let normed = self.norm.forward(x.clone());
        let mut seq = match &self.proj_in {
            Projection::Conv(conv) => to_seq(conv.forward(normed)),
            Projection::Linear(lin) => lin.forward(to_seq(normed)),
        };
        for block in &self.transformer_blocks {
            seq = block.forward(seq, context);
        }
        let inner = seq.dims()[2];
        let to_map =
            |t: Tensor<3>, ch: usize| -> Tensor<4> { t.swap_dims(1, 2).reshape([b, ch, h, w]) };
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(to_map(seq, inner)),
            Projection::Linear(lin) => to_map(lin.forward(seq), c),
        };
        out + x
    }
}
