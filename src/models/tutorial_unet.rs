//! The small residual U-Net of the well-known DDPM-on-MNIST tutorial, as a preset.
//!
//! Shape of Brian Pulfer's "Generating images with DDPM" `MyUNet` (LayerNorm over the whole
//! `[C, H, W]` activation, two 3x3 convs per block, a per-level time MLP added to the block input)
//! widened to channels `[10, 20, 40, 80]` with residual blocks and a fixed sinusoidal time
//! embedding of width 128, as `../shared/reference/FORMATS.md` describes it. Its PyTorch twin is
//! `scripts/torch_models.py::TutorialUNet`; both must report the same parameter count.
//! Odd sizes (7 -> 3) downsample with a 3x3 stride-2 conv, even ones with 4x4 stride 2 pad 1.

use crate::kernels::silu;
use burn::module::Module;
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::embeddings::timestep_embedding;
use crate::nn::{Conv2d, ConvTranspose2d, LayerNorm, Linear};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TutorialUNetConfig {
    pub image_size: usize,
    pub in_channels: usize,
    /// Channels of each down level; the last entry is the bottleneck width.
    pub channels: Vec<usize>,
    pub time_embed_dim: usize,
}

impl Default for TutorialUNetConfig {
    fn default() -> Self {
        Self {
            image_size: 28,
            in_channels: 1,
            channels: vec![10, 20, 40, 80],
            time_embed_dim: 128,
        }
    }
}

impl TutorialUNetConfig {
    /// Spatial size at each level, top to bottom.
    fn sizes(&self) -> Vec<usize> {
        let mut sizes = vec![self.image_size];
        for _ in 1..self.channels.len() {
            let s = *sizes.last().unwrap_or(&0);
            sizes.push(if s % 2 == 0 { s / 2 } else { (s - 1) / 2 });
        }
        sizes
    }

    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.channels.len() < 2 {
            out.push(
                "model.tutorial.channels needs at least two entries (levels + bottleneck)".into(),
            );
            return out;
        }
        if let Some(&s) = self.sizes().last()
            && s < 2
        {
            out.push(format!(
                "model.tutorial.image_size = {} is too small for {} levels (bottleneck would be {s}x{s})",
                self.image_size,
                self.channels.len()
            ));
        }
        if self.time_embed_dim < 2 {
            out.push("model.tutorial.time_embed_dim must be at least 2".into());
        }
        out
    }

    pub fn init(&self, device: &Device) -> TutorialUNet {
        TutorialUNet::new(self, device)
    }
}

/// `x + conv2(silu(conv1(silu(ln(x)))))`, with a 1x1 conv on the skip when channels change.
#[derive(Module, Debug)]
pub struct LnResBlock {
    pub ln: LayerNorm<3>,
    pub conv1: Conv2d,
    pub conv2: Conv2d,
    pub skip: Option<Conv2d>,
}

impl LnResBlock {
    fn new(cin: usize, cout: usize, size: usize, device: &Device) -> Self {
        Self {
            ln: LayerNorm::new([cin, size, size], device),
            conv1: Conv2d::new(cin, cout, 3, 1, 1, device),
            conv2: Conv2d::new(cout, cout, 3, 1, 1, device),
            skip: (cin != cout).then(|| Conv2d::new(cin, cout, 1, 1, 0, device)),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let h = self
            .conv2
            .forward(silu(self.conv1.forward(silu(self.ln.forward(x.clone())))));
        match &self.skip {
            Some(s) => s.forward(x) + h,
            None => x + h,
        }
    }
}

/// Time MLP of one level: `Linear(E, c) -> SiLU -> Linear(c, c)`.
#[derive(Module, Debug)]
pub struct TimeMlp {
    pub linear_1: Linear,
    pub linear_2: Linear,
}

impl TimeMlp {
    fn new(dim: usize, c: usize, device: &Device) -> Self {
        Self {
            linear_1: Linear::new(dim, c, true, device),
            linear_2: Linear::new(c, c, true, device),
        }
    }

    fn forward(&self, t: Tensor<2>) -> Tensor<4> {
        self.linear_2
            .forward(silu(self.linear_1.forward(t)))
            .unsqueeze_dims(&[2, 3])
    }
}

#[derive(Module, Debug)]
pub struct DownLevel {
    pub te: TimeMlp,
    pub block1: LnResBlock,
    pub block2: LnResBlock,
    pub down: Conv2d,
}

#[derive(Module, Debug)]
pub struct MidLevel {
    pub te: TimeMlp,
    pub block1: LnResBlock,
    pub block2: LnResBlock,
}

#[derive(Module, Debug)]
pub struct UpLevel {
    pub up: ConvTranspose2d,
    pub te: TimeMlp,
    pub block1: LnResBlock,
    pub block2: LnResBlock,
}

#[derive(Module, Debug)]
pub struct TutorialUNet {
    pub down: Vec<DownLevel>,
    pub mid: MidLevel,
    pub up: Vec<UpLevel>,
    pub conv_out: Conv2d,
    pub time_embed_dim: usize,
}

impl TutorialUNet {
    pub fn new(cfg: &TutorialUNetConfig, device: &Device) -> Self {
        let c = &cfg.channels;
        let sizes = cfg.sizes();
        let levels = c.len() - 1;
        let e = cfg.time_embed_dim;
        // (kernel, padding) of the stride-2 resampling between a size and the next.
        let resample = |s: usize| if s.is_multiple_of(2) { (4, 1) } else { (3, 0) };

        let down = (0..levels)
            .map(|i| {
                let cin = if i == 0 { cfg.in_channels } else { c[i - 1] };
                let (k, p) = resample(sizes[i]);
                DownLevel {
                    te: TimeMlp::new(e, cin, device),
                    block1: LnResBlock::new(cin, c[i], sizes[i], device),
                    block2: LnResBlock::new(c[i], c[i], sizes[i], device),
                    down: Conv2d::new(c[i], c[i], k, 2, p, device),
                }
            })
            .collect();
        let (cb, sb) = (c[levels], sizes[levels]);
        let mid = MidLevel {
            te: TimeMlp::new(e, c[levels - 1], device),
            block1: LnResBlock::new(c[levels - 1], cb, sb, device),
            block2: LnResBlock::new(cb, c[levels - 1], sb, device),
        };
        let up = (0..levels)
            .rev()
            .map(|i| {
                let (k, p) = resample(sizes[i]);
                let cout = if i == 0 { c[0] } else { c[i - 1] };
                UpLevel {
                    up: ConvTranspose2d::new(c[i], c[i], k, 2, p, device),
                    te: TimeMlp::new(e, 2 * c[i], device),
                    block1: LnResBlock::new(2 * c[i], c[i], sizes[i], device),
                    block2: LnResBlock::new(c[i], cout, sizes[i], device),
                }
            })
            .collect();
        Self {
            down,
            mid,
            up,
            conv_out: Conv2d::new(c[0], cfg.in_channels, 3, 1, 1, device),
            time_embed_dim: e,
        }
    }

    /// # Shapes
    /// - `x`: `[b, in_channels, s, s]`, `timesteps`: `[b]`; returns `[b, in_channels, s, s]`
    pub fn forward(&self, x: Tensor<4>, timesteps: Tensor<1>) -> Tensor<4> {
        // The embedding is computed in f32 and used in the input's dtype (diffusers casts it to
        // the sample's dtype the same way).
        let t = timestep_embedding(timesteps, self.time_embed_dim, true, 0.0).cast(x.dtype());
        let mut x = x;
        let mut skips = Vec::with_capacity(self.down.len());
        for level in &self.down {
            let h = level
                .block2
                .forward(level.block1.forward(x + level.te.forward(t.clone())));
            x = level.down.forward(h.clone());
            skips.push(h);
        }
        x = self
            .mid
            .block2
            .forward(self.mid.block1.forward(x + self.mid.te.forward(t.clone())));
        for level in &self.up {
            let skip = skips
                .pop()
                .expect("tutorial U-Net skip stack underflow: model built inconsistently");
            let h = Tensor::cat(vec![skip, level.up.forward(x)], 1);
            x = level
                .block2
                .forward(level.block1.forward(h + level.te.forward(t.clone())));
        }
        self.conv_out.forward(x)
    }
}
