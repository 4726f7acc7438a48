//! diffusers `models/resnet.py` and `models/{downsampling,upsampling}.py`: `ResnetBlock2D`,
//! `Downsample2D`, `Upsample2D`.

use burn::module::Module;
use burn::prelude::*;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};

use crate::kernels::silu;
use crate::nn::{Conv2d, GroupNorm, Linear};

/// `ResnetBlock2D` with `time_embedding_norm = "default"`, output_scale_factor 1. Without a
/// time embedding (`temb_channels = None`, the VAE's blocks) there is no `time_emb_proj`.
#[derive(Module, Debug)]
pub struct ResnetBlock2D {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub time_emb_proj: Option<Linear>,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    pub fn new(
        cin: usize,
        cout: usize,
        temb: Option<usize>,
        groups: usize,
        eps: f64,
        device: &Device,
    ) -> Self {
        Self {
            norm1: GroupNorm::new(groups, cin, eps, device),
            conv1: Conv2d::new(cin, cout, 3, 1, 1, device),
            time_emb_proj: temb.map(|t| Linear::new(t, cout, true, device)),
            norm2: GroupNorm::new(groups, cout, eps, device),
            conv2: Conv2d::new(cout, cout, 3, 1, 1, device),
            conv_shortcut: (cin != cout).then(|| Conv2d::new(cin, cout, 1, 1, 0, device)),
        }
    }

    /// # Shapes
    /// - `x`: `[b, cin, h, w]`, `temb`: `[b, temb]`; returns `[b, cout, h, w]`
    pub fn forward(&self, x: Tensor<4>, temb: Option<&Tensor<2>>) -> Tensor<4> {
        let mut h = self.conv1.forward(silu(self.norm1.forward(x.clone())));
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t: Tensor<4> = proj.forward(silu(temb.clone())).unsqueeze_dims(&[2, 3]);
            h = h + t;
        }
        let h = self.conv2.forward(silu(self.norm2.forward(h)));
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x),
            None => x,
        };
        skip + h
    }
}

/// `Downsample2D(use_conv=True)`: a stride-2 3x3 conv named `conv`. With `padding=0` (the VAE's
/// `DownEncoderBlock2D`) diffusers pads one zero column and row on the right and bottom first.
#[derive(Module, Debug)]
pub struct Downsample2D {
    pub conv: Conv2d,
    pub pad_right_bottom: bool,
}

impl Downsample2D {
    /// `padding` 1 (the U-Nets) or 0 (the VAE encoder).
    pub fn new(channels: usize, padding: usize, device: &Device) -> Self {
        Self {
            conv: Conv2d::new(channels, channels, 3, 2, padding, device),
            pad_right_bottom: padding == 0,
        }
    }

    /// # Shapes
    /// - `x`: `[b, c, h, w]`; returns `[b, c, ceil(h/2), ceil(w/2)]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x = if self.pad_right_bottom {
            x.pad([(0, 1), (0, 1)], burn::tensor::ops::PadMode::Constant(0.0))
        } else {
            x
        };
        self.conv.forward(x)
    }
}

/// `Upsample2D(use_conv=True)`: nearest-neighbour interpolation, then a 3x3 conv named `conv`.
#[derive(Module, Debug)]
pub struct Upsample2D {
    pub conv: Conv2d,
}

impl Upsample2D {
    pub fn new(channels: usize, device: &Device) -> Self {
        Self {
            conv: Conv2d::new(channels, channels, 3, 1, 1, device),
        }
    }

    /// Doubles the size, or interpolates to `size` (diffusers' `upsample_size`, the size of
    /// the skip connection when the input was not a multiple of the downsampling factor).
    ///
    /// # Shapes
    /// - `x`: `[b, c, h, w]`; returns `[b, c, 2h, 2w]` or `[b, c, size[0], size[1]]`
    pub fn forward(&self, x: Tensor<4>, size: Option<[usize; 2]>) -> Tensor<4> {
        let [_, _, h, w] = x.dims();
        let size = size.unwrap_or([2 * h, 2 * w]);
        let up = interpolate(
            x,
            InterpolateOptions::new(InterpolateMode::Nearest).with_output_size(size),
        );
        self.conv.forward(up)
    }
}
