//! diffusers `models/unets/unet_2d_blocks.py`: the down, up and mid blocks `UNet2DModel`
//! builds (`DownBlock2D`/`AttnDownBlock2D`, `UpBlock2D`/`AttnUpBlock2D`, `UNetMidBlock2D`).

use burn::module::Module;
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::attention::SpatialAttention;
use super::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DownBlockType {
    DownBlock2D,
    AttnDownBlock2D,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpBlockType {
    UpBlock2D,
    AttnUpBlock2D,
}

/// `DownBlock2D` or `AttnDownBlock2D` (an empty `attentions` is the former).
#[derive(Module, Debug)]
pub struct DownBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<SpatialAttention>,
    pub downsamplers: Vec<Downsample2D>,
}

impl DownBlock {
    /// Returns the output and the skip connections it contributes.
    pub fn forward(
        &self,
        mut x: Tensor<4>,
        temb: Tensor<2>,
        skips: &mut Vec<Tensor<4>>,
    ) -> Tensor<4> {
        for (i, resnet) in self.resnets.iter().enumerate() {
            x = resnet.forward(x, temb.clone());
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(x);
            }
            skips.push(x.clone());
        }
        for down in &self.downsamplers {
            x = down.conv.forward(x);
            skips.push(x.clone());
        }
        x
    }
}

/// `UpBlock2D` or `AttnUpBlock2D`.
#[derive(Module, Debug)]
pub struct UpBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<SpatialAttention>,
    pub upsamplers: Vec<Upsample2D>,
}

impl UpBlock {
    pub fn forward(
        &self,
        mut x: Tensor<4>,
        temb: Tensor<2>,
        skips: &mut Vec<Tensor<4>>,
    ) -> Tensor<4> {
        for (i, resnet) in self.resnets.iter().enumerate() {
            // Built with exactly as many skips as resnets, so pop cannot fail on a valid model.
            let skip = skips
                .pop()
                .expect("UNet skip stack underflow: model built inconsistently");
            x = resnet.forward(Tensor::cat(vec![x, skip], 1), temb.clone());
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(x);
            }
        }
        for up in &self.upsamplers {
            x = up.forward(x);
        }
        x
    }
}

/// `UNetMidBlock2D`: resnet, (attention, resnet).
#[derive(Module, Debug)]
pub struct UNetMidBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<SpatialAttention>,
}
