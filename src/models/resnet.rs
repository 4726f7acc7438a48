//! diffusers `models/resnet.py` and `models/{downsampling,upsampling}.py`: `ResnetBlock2D`,
//! `Downsample2D`, `Upsample2D`.

use burn::module::Module;
use burn::prelude::*;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};

use crate::kernels::silu;
use crate::nn::{Conv2d, GroupNorm, Linear};

/// `ResnetBlock2D` with `time_embedding_norm = "default"`, output_scale_factor 1.
#[derive(Module, Debug)]
pub struct ResnetBlock2D {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub time_emb_proj: Linear,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    pub fn new(
        cin: usize,
        cout: usize,
        temb: usize,
        groups: usize,
        eps: f64,
        device: &Device,
    ) -> Self {
        Self {
            norm1: GroupNorm::new(groups, cin, eps, device),
            conv1: Conv2d::new(cin, cout, 3, 1, 1, device),
            time_emb_proj: Linear::new(temb, cout, true, device),
            norm2: GroupNorm::new(groups, cout, eps, device),
            conv2: Conv2d::new(cout, cout, 3, 1, 1, device),
            conv_shortcut: (cin != cout).then(|| Conv2d::new(cin, cout, 1, 1, 0, device)),
        }
    }

    /// # Shapes
    /// - `x`: `[b, cin, h, w]`, `temb`: `[b, temb]`; returns `[b, cout, h, w]`
    pub fn forward(&self, x: Tensor<4>, temb: Tensor<2>) -> Tensor<4> {
        let h = self.conv1.forward(silu(self.norm1.forward(x.clone())));
        let t: Tensor<4> = self
            .time_emb_proj
            .forward(silu(temb))
            .unsqueeze_dims(&[2, 3]);
        let h = self.conv2.forward(silu(self.norm2.forward(h + t)));
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x),
            None => x,
        };
        skip + h
    }
}

/// `Downsample2D(use_conv=True, padding=1)`: a stride-2 3x3 conv named `conv`.
#[derive(Module, Debug)]
pub struct Downsample2D {
    pub conv: Conv2d,
}

/// `Upsample2D(use_conv=True)`: nearest-neighbour x2, then a 3x3 conv named `conv`.
#[derive(Module, Debug)]
pub struct Upsample2D {
    pub conv: Conv2d,
}

impl Upsample2D {
    /// # Shapes
    /// - `x`: `[b, c, h, w]`; returns `[b, c, 2h, 2w]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [_, _, h, w] = x.dims();
        let up = interpolate(
            x,
            InterpolateOptions::new(InterpolateMode::Nearest).with_output_size([2 * h, 2 * w]),
        );
        self.conv.forward(up)
    }
}
