//! Timestep embeddings (diffusers `models/embeddings.py`): the sinusoidal projection
//! `get_timestep_embedding` and the `TimestepEmbedding` MLP.

use burn::module::Module;
use burn::prelude::*;

use crate::kernels::silu;
use crate::nn::Linear;

/// Sinusoidal timestep embedding (`get_timestep_embedding`, max_period 10000).
///
/// # Shapes
/// - `timesteps`: `[batch]`; returns `[batch, dim]`
pub fn timestep_embedding(
    timesteps: Tensor<1>,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Tensor<2> {
    let device = timesteps.device();
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-(10000f64.ln()) * i as f64 / (half as f64 - freq_shift)).exp() as f32)
        .collect();
    let freqs = Tensor::<1>::from_data(TensorData::new(freqs, [half]), &device);
    let args = timesteps.unsqueeze_dim::<2>(1) * freqs.unsqueeze_dim(0);
    let (sin, cos) = (args.clone().sin(), args.cos());
    let emb = if flip_sin_to_cos {
        Tensor::cat(vec![cos, sin], 1)
    } else {
        Tensor::cat(vec![sin, cos], 1)
    };
    if dim % 2 == 1 {
        let [b, _] = emb.dims();
        Tensor::cat(vec![emb, Tensor::zeros([b, 1], &device)], 1)
    } else {
        emb
    }
}

/// `TimestepEmbedding`: linear, SiLU, linear.
#[derive(Module, Debug)]
pub struct TimestepEmbedding {
    pub linear_1: Linear,
    pub linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn new(in_dim: usize, dim: usize, device: &Device) -> Self {
        Self {
            linear_1: Linear::new(in_dim, dim, true, device),
            linear_2: Linear::new(dim, dim, true, device),
        }
    }

    /// # Shapes
    /// - `x`: `[batch, in_dim]`; returns `[batch, dim]`
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.linear_2.forward(silu(self.linear_1.forward(x)))
    }
}
