//! diffusers `models/autoencoders/vae.py`: the VAE's `Encoder` and `Decoder` and the
//! `DiagonalGaussianDistribution` of its latents.

use burn::module::Module;
use burn::prelude::*;

use super::attention::Attention;
use super::unet_2d_blocks::{
    AttentionLayer, DownBlock, MidBlock, ResnetSpec, UpBlock, down_block, mid_block, up_block,
};
use crate::kernels::silu;
use crate::nn::{Conv2d, GroupNorm};

/// What the encoder and decoder are built from (the `AutoencoderKL` config's shape fields).
#[derive(Debug, Clone)]
pub struct VaeShape {
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    pub mid_block_add_attention: bool,
}

/// diffusers builds every VAE norm with eps 1e-6.
const EPS: f64 = 1e-6;

impl VaeShape {
    fn resnet(&self) -> ResnetSpec {
        ResnetSpec {
            temb: None,
            groups: self.norm_num_groups,
            eps: EPS,
        }
    }

    /// `UNetMidBlock2D(attention_head_dim = channels)`: one head as wide as the channels.
    fn mid(&self, c: usize, device: &Device) -> MidBlock {
        let groups = self.norm_num_groups;
        let attention =
            |c: usize| AttentionLayer::Spatial(Attention::spatial(c, c, groups, EPS, device));
        let attention: Option<&dyn Fn(usize) -> AttentionLayer> =
            self.mid_block_add_attention.then_some(&attention);
        mid_block(c, self.resnet(), attention, device)
    }
}

/// `Encoder(double_z=True)`: image -> mean and log-variance of the latent (`2 * latent`
/// channels).
#[derive(Module, Debug)]
pub struct Encoder {
    pub conv_in: Conv2d,
    pub down_blocks: Vec<DownBlock>,
    pub mid_block: MidBlock,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

impl Encoder {
    pub fn new(shape: &VaeShape, in_channels: usize, latent: usize, device: &Device) -> Self {
        let ch = &shape.block_out_channels;
        let levels = ch.len();
        let conv_in = Conv2d::new(in_channels, ch[0], 3, 1, 1, device);
        let mut down_blocks = Vec::with_capacity(levels);
        let mut cout = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            let cin = cout;
            cout = c;
            // DownEncoderBlock2D(downsample_padding=0): padded right/bottom, then stride 2.
            let downsample = (i + 1 < levels).then_some(0);
            down_blocks.push(down_block(
                cin,
                cout,
                shape.layers_per_block,
                shape.resnet(),
                None,
                downsample,
                device,
            ));
        }
        let c = ch[levels - 1];
        Self {
            conv_in,
            down_blocks,
            mid_block: shape.mid(c, device),
            conv_norm_out: GroupNorm::new(shape.norm_num_groups, c, EPS, device),
            conv_out: Conv2d::new(c, 2 * latent, 3, 1, 1, device),
        }
    }

    /// # Shapes
    /// - `x`: `[b, in_channels, h, w]`; returns `[b, 2 * latent, h / f, w / f]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut x = self.conv_in.forward(x);
        let mut unused = Vec::new();
        for block in &self.down_blocks {
            x = block.forward(x, None, None, &mut unused);
            unused.clear();
        }
        x = self.mid_block.forward(x, None, None);
        self.conv_out.forward(silu(self.conv_norm_out.forward(x)))
    }
}

/// `Decoder`: latent -> image.
#[derive(Module, Debug)]
pub struct Decoder {
    pub conv_in: Conv2d,
    pub mid_block: MidBlock,
    pub up_blocks: Vec<UpBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

impl Decoder {
    pub fn new(shape: &VaeShape, latent: usize, out_channels: usize, device: &Device) -> Self {
        let ch = &shape.block_out_channels;
        let levels = ch.len();
        let top = ch[levels - 1];
        let conv_in = Conv2d::new(latent, top, 3, 1, 1, device);
        let mid_block = shape.mid(top, device);
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(levels);
        let mut out_c = rev[0];
        for (i, &c) in rev.iter().enumerate() {
            let prev = out_c;
            out_c = c;
            up_blocks.push(up_block(
                prev,
                out_c,
                None,
                shape.layers_per_block + 1,
                shape.resnet(),
                None,
                i + 1 < levels,
                device,
            ));
        }
        Self {
            conv_in,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(shape.norm_num_groups, ch[0], EPS, device),
            conv_out: Conv2d::new(ch[0], out_channels, 3, 1, 1, device),
        }
    }

    /// # Shapes
    /// - `z`: `[b, latent, h, w]`; returns `[b, out_channels, h * f, w * f]`
    pub fn forward(&self, z: Tensor<4>) -> Tensor<4> {
        let mut x = self.conv_in.forward(z);
        x = self.mid_block.forward(x, None, None);
        for block in &self.up_blocks {
            x = block.forward(x, None, None, None);
        }
        self.conv_out.forward(silu(self.conv_norm_out.forward(x)))
    }
}

/// `DiagonalGaussianDistribution`: the posterior `N(mean, exp(logvar))` of a latent.
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    pub mean: Tensor<4>,
    /// Clamped to [-30, 20] as diffusers does.
    pub logvar: Tensor<4>,
}

impl DiagonalGaussian {
    /// Splits `[b, 2c, h, w]` moments into mean and log-variance, in f32 whatever the encoder
    /// computed in (mixed precision).
    pub fn new(moments: Tensor<4>) -> Self {
        let moments = crate::dtype::to_f32(moments);
        let c = moments.dims()[1] / 2;
        let mean = moments.clone().narrow(1, 0, c);
        let logvar = moments.narrow(1, c, c).clamp(-30.0, 20.0);
        Self { mean, logvar }
    }

    pub fn std(&self) -> Tensor<4> {
        self.logvar.clone().mul_scalar(0.5).exp()
    }

    /// `mean + std * noise` with standard normal `noise` of the mean's shape.
    pub fn sample(&self, noise: Tensor<4>) -> Tensor<4> {
        self.mean.clone() + self.std() * noise
    }

    /// The mean (diffusers' `mode()`).
    pub fn mode(&self) -> Tensor<4> {
        self.mean.clone()
    }

    /// KL divergence to `N(0, 1)` per sample: `0.5 * sum(mean^2 + var - 1 - logvar)` over
    /// `[c, h, w]`.
    ///
    /// # Shapes
    /// - returns `[b]`
    pub fn kl(&self) -> Tensor<1> {
        let b = self.mean.dims()[0];
        let var = self.logvar.clone().exp();
        let terms = self.mean.clone().square() + var - self.logvar.clone().add_scalar(1.0);
        terms.sum_dims(&[1, 2, 3]).reshape([b]).mul_scalar(0.5)
    }
}
