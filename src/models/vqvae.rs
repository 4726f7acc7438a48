//! VQ-VAE (van den Oord et al. 2017, "Neural Discrete Representation Learning"), laid out as
//! the DeepMind Sonnet VQ-VAE example and its PyTorch port: an encoder of two stride-2 4x4
//! convolutions, a 3x3 convolution and residual blocks; a codebook; a decoder mirroring it.
//! The codebook is stored like diffusers' `VectorQuantizer` (`quantize.embedding.weight`,
//! `[K, D]`, initialised `U(-1/K, 1/K)`).

use burn::module::Module;
use burn::prelude::*;
use burn::tensor::activation::relu;
use serde::{Deserialize, Serialize};

use crate::dtype::{as_dtype, to_f32};
use crate::nn::{Conv2d, ConvTranspose2d, Embedding};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VQVAEConfig {
    pub in_channels: usize,
    /// Hidden channels of encoder and decoder (the first conv has half).
    pub dim: usize,
    /// Hidden channels inside a residual block.
    pub res_dim: usize,
    pub num_res_blocks: usize,
    /// D: the width of a code vector.
    pub embedding_dim: usize,
    /// K: the number of codebook entries.
    pub num_embeddings: usize,
    /// Weight of `||sg(z_e) - z_q||^2` (moves the codebook).
    pub embedding_cost: f64,
    /// Weight of `||z_e - sg(z_q)||^2` (keeps the encoder close to its codes).
    pub commitment_cost: f64,
    /// Re-initialise codes unused in an optimizer step's batch to random encoder outputs of
    /// that batch (see docs/vqvae.md).
    pub dead_code_restart: bool,
}

impl Default for VQVAEConfig {
    fn default() -> Self {
        Self {
            in_channels: 1,
            dim: 32,
            res_dim: 32,
            num_res_blocks: 2,
            embedding_dim: 32,
            num_embeddings: 32,
            embedding_cost: 1.0,
            commitment_cost: 0.25,
            dead_code_restart: true,
        }
    }
}

impl VQVAEConfig {
    /// Image pixels per code-map position along each axis (two stride-2 convolutions).
    pub const DOWNSAMPLING: usize = 4;

    /// The side of the code map of `resolution`-pixel images.
    pub fn code_size(resolution: usize) -> usize {
        resolution / Self::DOWNSAMPLING
    }

    pub fn problems(&self, resolution: usize) -> Vec<String> {
        let mut p = Vec::new();
        if !resolution.is_multiple_of(Self::DOWNSAMPLING) {
            p.push(format!(
                "model.vqvae: data.resolution = {resolution} must be divisible by {} (two stride-2 convolutions)",
                Self::DOWNSAMPLING
            ));
        }
        if self.dim < 2 || !self.dim.is_multiple_of(2) {
            p.push(format!(
                "model.vqvae.dim = {} must be even and >= 2",
                self.dim
            ));
        }
        for (name, v) in [
            ("res_dim", self.res_dim),
            ("embedding_dim", self.embedding_dim),
        ] {
            if v == 0 {
                p.push(format!("model.vqvae.{name} must be positive"));
            }
        }
        if self.num_embeddings < 2 {
            p.push("model.vqvae.num_embeddings must be at least 2".into());
        }
        if self.embedding_cost < 0.0 || self.commitment_cost < 0.0 {
            p.push("model.vqvae.embedding_cost and commitment_cost must be >= 0".into());
        }
        p
    }

    pub fn init(&self, device: &Device) -> VQVAE {
        let (d, half) = (self.dim, self.dim / 2);
        let res = |device: &Device| {
            (0..self.num_res_blocks)
                .map(|_| ResidualBlock::new(d, self.res_dim, device))
                .collect::<Vec<_>>()
        };
        VQVAE {
            encoder: Encoder {
                conv_1: Conv2d::new(self.in_channels, half, 4, 2, 1, device),
                conv_2: Conv2d::new(half, d, 4, 2, 1, device),
                conv_3: Conv2d::new(d, d, 3, 1, 1, device),
                res_blocks: res(device),
                pre_quant: Conv2d::new(d, self.embedding_dim, 1, 1, 0, device),
            },
            quantize: VectorQuantizer {
                embedding: Embedding::uniform(
                    self.num_embeddings,
                    self.embedding_dim,
                    1.0 / self.num_embeddings as f64,
                    device,
                ),
            },
            decoder: Decoder {
                conv_1: Conv2d::new(self.embedding_dim, d, 3, 1, 1, device),
                res_blocks: res(device),
                conv_t1: ConvTranspose2d::new(d, half, 4, 2, 1, device),
                conv_t2: ConvTranspose2d::new(half, self.in_channels, 4, 2, 1, device),
            },
        }
    }
}

/// `x + conv_2(relu(conv_1(relu(x))))` with a 3x3 then a 1x1 convolution.
#[derive(Module, Debug)]
pub struct ResidualBlock {
    pub conv_1: Conv2d,
    pub conv_2: Conv2d,
}

impl ResidualBlock {
    fn new(dim: usize, res_dim: usize, device: &Device) -> Self {
        Self {
            conv_1: Conv2d::new(dim, res_dim, 3, 1, 1, device).without_bias(),
            conv_2: Conv2d::new(res_dim, dim, 1, 1, 0, device).without_bias(),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        x.clone() + self.conv_2.forward(relu(self.conv_1.forward(relu(x))))
    }
}

#[derive(Module, Debug)]
pub struct Encoder {
    pub conv_1: Conv2d,
    pub conv_2: Conv2d,
    pub conv_3: Conv2d,
    pub res_blocks: Vec<ResidualBlock>,
    pub pre_quant: Conv2d,
}

impl Encoder {
    /// # Shapes
    /// - `x`: `[b, in_channels, h, w]`; returns `z_e`: `[b, embedding_dim, h/4, w/4]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut h = relu(self.conv_1.forward(x));
        h = relu(self.conv_2.forward(h));
        h = self.conv_3.forward(h);
        for block in &self.res_blocks {
            h = block.forward(h);
        }
        self.pre_quant.forward(relu(h))
    }
}

#[derive(Module, Debug)]
pub struct Decoder {
    pub conv_1: Conv2d,
    pub res_blocks: Vec<ResidualBlock>,
    pub conv_t1: ConvTranspose2d,
    pub conv_t2: ConvTranspose2d,
}

impl Decoder {
    /// # Shapes
    /// - `z`: `[b, embedding_dim, h', w']`; returns `[b, in_channels, 4h', 4w']` in (-1, 1)
    pub fn forward(&self, z: Tensor<4>) -> Tensor<4> {
        let mut h = self.conv_1.forward(z);
        for block in &self.res_blocks {
            h = block.forward(h);
        }
        h = relu(self.conv_t1.forward(relu(h)));
        self.conv_t2.forward(h).tanh()
    }
}

#[derive(Module, Debug)]
pub struct VectorQuantizer {
    pub embedding: Embedding,
}

/// The quantizer's outputs for one batch.
pub struct Quantized {
    /// `z_e + sg(z_q - z_e)`: the codes' values forward, the identity backward.
    pub z_q: Tensor<4>,
    /// `[b * h * w]`, raster order per image.
    pub indices: Tensor<1, Int>,
    /// `z_e` flattened to `[b * h * w, D]`, detached (dead-code restarts draw from it).
    pub z_e_flat: Tensor<2>,
    /// `mean ||sg(z_e) - z_q||^2`
    pub embedding_loss: Tensor<1>,
    /// `mean ||z_e - sg(z_q)||^2`
    pub commitment_loss: Tensor<1>,
}

/// Index of the nearest codebook row for each row of `z` by squared distance, computed as
/// `|z|^2 - 2 z E^T + |E|^2` (an `[N, K]` matrix, never `[N, K, D]`).
///
/// # Shapes
/// - `z`: `[n, d]`, `codebook`: `[k, d]`; returns `[n]`
pub fn nearest_codes(z: Tensor<2>, codebook: Tensor<2>) -> Tensor<1, Int> {
    let [n, _] = z.dims();
    let z_sq = z.clone().square().sum_dim(1); // [n, 1]
    let e_sq = codebook.clone().square().sum_dim(1).transpose(); // [1, k]
    let dist = z_sq - z.matmul(codebook.transpose()).mul_scalar(2.0) + e_sq;
    dist.argmin(1).reshape([n])
}

impl VectorQuantizer {
    /// # Shapes
    /// - `z_e`: `[b, d, h, w]`
    ///
    /// The search and both losses are computed in f32 (mixed precision: `z_e` may be half);
    /// `z_q` is returned in `z_e`'s dtype.
    pub fn forward(&self, z_e: Tensor<4>) -> Quantized {
        let [b, d, h, w] = z_e.dims();
        let dtype = z_e.dtype();
        let flat = to_f32(z_e).permute([0, 2, 3, 1]).reshape([b * h * w, d]);
        // f32 even when the codebook is held in half (a frozen stage 1 under mixed precision).
        let codebook = to_f32(self.embedding.weight.val());
        let indices = nearest_codes(flat.clone().detach(), codebook.detach());
        let z_q = to_f32(self.embedding.forward(indices.clone()));
        let embedding_loss = (z_q.clone() - flat.clone().detach()).square().mean();
        let commitment_loss = (flat.clone() - z_q.clone().detach()).square().mean();
        let st = flat.clone() + (z_q - flat.clone()).detach();
        Quantized {
            z_q: as_dtype(st.reshape([b, h, w, d]).permute([0, 3, 1, 2]), dtype),
            indices,
            z_e_flat: flat.detach(),
            embedding_loss,
            commitment_loss,
        }
    }

    /// # Shapes
    /// - `indices`: `[b, h, w]`; returns `[b, d, h, w]`
    pub fn lookup(&self, indices: Tensor<3, Int>) -> Tensor<4> {
        let [b, h, w] = indices.dims();
        let z = self.embedding.forward(indices.reshape([b * h * w]));
        let d = z.dims()[1];
        z.reshape([b, h, w, d]).permute([0, 3, 1, 2])
    }
}

#[derive(Module, Debug)]
pub struct VQVAE {
    pub encoder: Encoder,
    pub quantize: VectorQuantizer,
    pub decoder: Decoder,
}

impl VQVAE {
    /// # Shapes
    /// - `x`: `[b, c, h, w]`; returns the reconstruction `[b, c, h, w]` and the quantizer outputs
    pub fn forward(&self, x: Tensor<4>) -> (Tensor<4>, Quantized) {
        let q = self.quantize.forward(self.encoder.forward(x));
        (self.decoder.forward(q.z_q.clone()), q)
    }

    /// # Shapes
    /// - `x`: `[b, c, h, w]`; returns the code map `[b, h/4, w/4]`
    pub fn encode(&self, x: Tensor<4>) -> Tensor<3, Int> {
        let z = self.encoder.forward(x);
        let [b, _, h, w] = z.dims();
        self.quantize.forward(z).indices.reshape([b, h, w])
    }

    /// # Shapes
    /// - `codes`: `[b, h', w']`; returns images `[b, c, 4h', 4w']`
    pub fn decode(&self, codes: Tensor<3, Int>) -> Tensor<4> {
        self.decoder.forward(self.quantize.lookup(codes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::optim::GradientsParams;
    use burn::tensor::Distribution;

    #[test]
    fn nearest_codes_match_brute_force() {
        let device = Device::flex();
        let z = Tensor::<2>::random([200, 6], Distribution::Normal(0.0, 1.0), &device);
        let e = Tensor::<2>::random([17, 6], Distribution::Normal(0.0, 1.0), &device);
        let got: Vec<i64> = nearest_codes(z.clone(), e.clone())
            .into_data()
            .convert::<i64>()
            .try_to_vec()
            .unwrap();
        let zv: Vec<f32> = z.into_data().try_to_vec().unwrap();
        let ev: Vec<f32> = e.into_data().try_to_vec().unwrap();
        for (i, &g) in got.iter().enumerate() {
            let dist = |k: usize| -> f32 {
                (0..6)
                    .map(|c| (zv[i * 6 + c] - ev[k * 6 + c]).powi(2))
                    .sum()
            };
            let best = (0..17)
                .min_by(|&a, &b| dist(a).total_cmp(&dist(b)))
                .unwrap();
            // Ties aside (measure zero), the same index.
            assert!(
                g as usize == best || (dist(g as usize) - dist(best)).abs() < 1e-5,
                "row {i}: {g} vs {best}"
            );
        }
    }

    #[test]
    fn straight_through_gradient_reaches_the_encoder() {
        let device = Device::flex().autodiff();
        crate::nn::seed_init(1);
        let model = VQVAEConfig {
            dim: 8,
            res_dim: 4,
            embedding_dim: 4,
            num_embeddings: 8,
            ..VQVAEConfig::default()
        }
        .init(&device);
        let x = Tensor::<4>::random([2, 1, 8, 8], Distribution::Uniform(-1.0, 1.0), &device);
        let (recon, q) = model.forward(x.clone());
        assert_eq!(recon.dims(), [2, 1, 8, 8]);
        assert_eq!(q.indices.dims(), [2 * 2 * 2]);
        // Reconstruction loss alone: argmin has no gradient, so only the straight-through
        // estimator can carry it to the encoder.
        let loss = (recon - x).square().mean();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let g = grads
            .get::<4>(model.encoder.conv_1.weight.id)
            .expect("encoder gets a gradient");
        let norm: f32 = g.abs().sum().into_scalar();
        assert!(norm > 0.0, "encoder gradient norm {norm}");
        // ...and the codebook gets none from it (only the embedding loss moves it).
        assert!(grads.get::<2>(model.quantize.embedding.weight.id).is_none());
    }
}
