//! diffusers `models/unets/unet_2d_blocks.py`: the down, up and mid blocks of the U-Nets and the
//! VAE.
//!
//! One struct per role serves every diffusers block of that role, because they differ only in
//! what follows each resnet and whether there is a time embedding:
//! - [`DownBlock`]: `DownBlock2D`, `AttnDownBlock2D`, `CrossAttnDownBlock2D`, and the VAE's
//!   `DownEncoderBlock2D` (no time embedding, no skip connections used);
//! - [`UpBlock`]: `UpBlock2D`, `AttnUpBlock2D`, `CrossAttnUpBlock2D`, and `UpDecoderBlock2D`
//!   (which concatenates no skips);
//! - [`MidBlock`]: `UNetMidBlock2D` and `UNetMidBlock2DCrossAttn`.

use burn::module::Module;
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::attention::Attention;
use super::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};
use super::transformer_2d::Transformer2DModel;

/// `UNet2DModel`'s down block types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DownBlockType {
    DownBlock2D,
    AttnDownBlock2D,
}

/// `UNet2DModel`'s up block types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpBlockType {
    UpBlock2D,
    AttnUpBlock2D,
}

/// What follows each resnet of a block: spatial self-attention or a `Transformer2DModel`.
// burn's Module derive holds each variant's layers by value (it has no `Box` impl); one such
// value exists per model, so the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum AttentionLayer {
    Spatial(Attention),
    Transformer(Transformer2DModel),
}

impl AttentionLayer {
    /// # Shapes
    /// - `x`: `[b, c, h, w]`, `context`: `[b, m, d]`; returns `[b, c, h, w]`
    pub fn forward(&self, x: Tensor<4>, context: Option<&Tensor<3>>) -> Tensor<4> {
        match self {
            Self::Spatial(a) => a.forward_spatial(x),
            Self::Transformer(t) => t.forward(x, context),
        }
    }
}

/// A down block: resnets, each optionally followed by an attention layer, then an optional
/// downsampler.
#[derive(Module, Debug)]
pub struct DownBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<AttentionLayer>,
    pub downsamplers: Vec<Downsample2D>,
}

impl DownBlock {
    /// Pushes each layer's output onto `skips` (the U-Nets' skip connections).
    ///
    /// # Shapes
    /// - `x`: `[b, cin, h, w]`, `temb`: `[b, t]`; returns `[b, cout, h', w']`
    pub fn forward(
        &self,
        mut x: Tensor<4>,
        temb: Option<&Tensor<2>>,
        context: Option<&Tensor<3>>,
        skips: &mut Vec<Tensor<4>>,
    ) -> Tensor<4> {
        for (i, resnet) in self.resnets.iter().enumerate() {
            x = resnet.forward(x, temb);
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(x, context);
            }
            skips.push(x.clone());
        }
        for down in &self.downsamplers {
            x = down.forward(x);
            skips.push(x.clone());
        }
        x
    }
}

/// An up block: resnets (each on the input concatenated with a skip connection, when there are
/// skips), each optionally followed by an attention layer, then an optional upsampler.
#[derive(Module, Debug)]
pub struct UpBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<AttentionLayer>,
    pub upsamplers: Vec<Upsample2D>,
}

impl UpBlock {
    /// With `skips` (the U-Nets), each resnet takes `cat([x, skips.pop()])` and the upsampler
    /// goes to the size of the next skip; without (the VAE decoder), plain resnets and x2.
    ///
    /// # Shapes
    /// - `x`: `[b, cin, h, w]`; returns `[b, cout, h', w']`
    pub fn forward(
        &self,
        mut x: Tensor<4>,
        temb: Option<&Tensor<2>>,
        context: Option<&Tensor<3>>,
        mut skips: Option<&mut Vec<Tensor<4>>>,
    ) -> Tensor<4> {
        for (i, resnet) in self.resnets.iter().enumerate() {
            if let Some(skip) = skips.as_mut().and_then(|s| s.pop()) {
                x = Tensor::cat(vec![x, skip], 1);
            }
            x = resnet.forward(x, temb);
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(x, context);
            }
        }
        let size = skips
            .as_ref()
            .and_then(|s| s.last())
            .map(|s| [s.dims()[2], s.dims()[3]]);
        for up in &self.upsamplers {
            x = up.forward(x, size);
        }
        x
    }
}

/// `UNetMidBlock2D` / `UNetMidBlock2DCrossAttn`: resnet, then (attention, resnet) pairs.
#[derive(Module, Debug)]
pub struct MidBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<AttentionLayer>,
}

impl MidBlock {
    /// # Shapes
    /// - `x`: `[b, c, h, w]`; returns the same
    pub fn forward(
        &self,
        x: Tensor<4>,
        temb: Option<&Tensor<2>>,
        context: Option<&Tensor<3>>,
    ) -> Tensor<4> {
        let mut x = self.resnets[0].forward(x, temb);
        for (i, resnet) in self.resnets[1..].iter().enumerate() {
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(x, context);
            }
            x = resnet.forward(x, temb);
        }
        x
    }
}

/// How a block's resnets are built: time-embedding width (none in the VAE), GroupNorm groups
/// and epsilon.
#[derive(Debug, Clone, Copy)]
pub struct ResnetSpec {
    pub temb: Option<usize>,
    pub groups: usize,
    pub eps: f64,
}

impl ResnetSpec {
    fn resnet(&self, cin: usize, cout: usize, device: &Device) -> ResnetBlock2D {
        ResnetBlock2D::new(cin, cout, self.temb, self.groups, self.eps, device)
    }
}

/// A down block of `layers` resnets `cin -> cout`, each followed by `attention(cout)` when
/// given, then a downsampler with `downsample` padding (1 in the U-Nets, 0 in the VAE).
pub fn down_block(
    cin: usize,
    cout: usize,
    layers: usize,
    resnet: ResnetSpec,
    attention: Option<&dyn Fn(usize) -> AttentionLayer>,
    downsample: Option<usize>,
    device: &Device,
) -> DownBlock {
    let resnets = (0..layers)
        .map(|j| resnet.resnet(if j == 0 { cin } else { cout }, cout, device))
        .collect();
    let attentions = match attention {
        Some(make) => (0..layers).map(|_| make(cout)).collect(),
        None => Vec::new(),
    };
    DownBlock {
        resnets,
        attentions,
        downsamplers: downsample
            .map(|padding| Downsample2D::new(cout, padding, device))
            .into_iter()
            .collect(),
    }
}

/// An up block of `layers` resnets ending at `out_c`, starting from `prev_out` channels. With
/// `skip_in` (the U-Nets) each resnet also takes a skip connection: `out_c` channels, except the
/// last, which takes the level's input width `skip_in`. Then an optional x2 upsampler.
// diffusers' `get_up_block` takes the same arguments one by one.
#[allow(clippy::too_many_arguments)]
pub fn up_block(
    prev_out: usize,
    out_c: usize,
    skip_in: Option<usize>,
    layers: usize,
    resnet: ResnetSpec,
    attention: Option<&dyn Fn(usize) -> AttentionLayer>,
    upsample: bool,
    device: &Device,
) -> UpBlock {
    let resnets = (0..layers)
        .map(|j| {
            let res_in = if j == 0 { prev_out } else { out_c };
            let skip = match skip_in {
                Some(s) if j == layers - 1 => s,
                Some(_) => out_c,
                None => 0,
            };
            resnet.resnet(res_in + skip, out_c, device)
        })
        .collect();
    let attentions = match attention {
        Some(make) => (0..layers).map(|_| make(out_c)).collect(),
        None => Vec::new(),
    };
    UpBlock {
        resnets,
        attentions,
        upsamplers: if upsample {
            vec![Upsample2D::new(out_c, device)]
        } else {
            Vec::new()
        },
    }
}

/// A mid block on `c` channels: resnet, then (`attention(c)`, resnet) when given, else a
/// second resnet.
pub fn mid_block(
    c: usize,
    resnet: ResnetSpec,
    attention: Option<&dyn Fn(usize) -> AttentionLayer>,
    device: &Device,
) -> MidBlock {
    let first = resnet.resnet(c, c, device);
    let second = resnet.resnet(c, c, device);
    MidBlock {
        resnets: vec![first, second],
        attentions: attention.map(|make| make(c)).into_iter().collect(),
    }
}

/// What a U-Net's blocks are built from (`UNet2DModel` and `UNet2DConditionModel` alike).
pub struct UNetBlocksSpec<'a> {
    /// diffusers' `block_out_channels`.
    pub channels: &'a [usize],
    pub layers_per_block: usize,
    pub downsample_padding: usize,
    pub resnet: ResnetSpec,
    /// Whether each down level, the mid block, and each up block (diffusers' order) has
    /// attention after its resnets.
    pub down_attention: &'a [bool],
    pub mid_attention: bool,
    pub up_attention: &'a [bool],
}

/// The down, mid and up blocks of a U-Net, built in diffusers' order (the init RNG is drawn in
/// that order). `attention(level, channels)` makes an attention layer for a block at
/// `level` (up block `i` mirrors level `levels - 1 - i`).
pub fn unet_blocks(
    spec: &UNetBlocksSpec,
    attention: &dyn Fn(usize, usize) -> AttentionLayer,
    device: &Device,
) -> (Vec<DownBlock>, MidBlock, Vec<UpBlock>) {
    let ch = spec.channels;
    let levels = ch.len();
    let at = |level: usize| move |c: usize| attention(level, c);
    let mut down_blocks = Vec::with_capacity(levels);
    let mut cout = ch[0];
    for (i, &has) in spec.down_attention.iter().enumerate() {
        let cin = cout;
        cout = ch[i];
        let make = at(i);
        let make: Option<&dyn Fn(usize) -> AttentionLayer> = has.then_some(&make);
        let downsample = (i + 1 < levels).then_some(spec.downsample_padding);
        down_blocks.push(down_block(
            cin,
            cout,
            spec.layers_per_block,
            spec.resnet,
            make,
            downsample,
            device,
        ));
    }
    let make = at(levels - 1);
    let make: Option<&dyn Fn(usize) -> AttentionLayer> = spec.mid_attention.then_some(&make);
    let mid = mid_block(ch[levels - 1], spec.resnet, make, device);
    let rev: Vec<usize> = ch.iter().rev().copied().collect();
    let mut up_blocks = Vec::with_capacity(levels);
    let mut out_c = rev[0];
    for (i, &has) in spec.up_attention.iter().enumerate() {
        let prev_out = out_c;
        out_c = rev[i];
        let in_c = rev[(i + 1).min(levels - 1)];
        let make = at(levels - 1 - i);
        let make: Option<&dyn Fn(usize) -> AttentionLayer> = has.then_some(&make);
        up_blocks.push(up_block(
            prev_out,
            out_c,
            Some(in_c),
            spec.layers_per_block + 1,
            spec.resnet,
            make,
            i + 1 < levels,
            device,
        ));
    }
    (down_blocks, mid, up_blocks)
}
