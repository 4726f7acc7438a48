//! Gated PixelCNN (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN
//! Decoders") as a prior over VQ-VAE code maps, following the structure of the widely used
//! PyTorch VQ-VAE tutorial's `GatedPixelCNN`: an embedding of the K codes, a first 7x7 block with
//! type-A masks, 3x3 type-B blocks with vertical and horizontal stacks and gated activations
//! `tanh(a) * sigmoid(b)`, and a 1x1 output head to K logits.
//!
//! The stacks are square k x k convolutions whose kernels are multiplied by a mask in every
//! forward pass (so masked weights never act and get no gradient):
//! - vertical: rows strictly above the centre, plus the centre row for type B. Its output at row
//!   i only ever depends on rows < i, because the first block excludes the centre row;
//! - horizontal: the centre row only, columns left of the centre, plus the centre for type B.
//!
//! The horizontal stack receives the vertical one at the same position (`vert_to_horiz`), which
//! is what removes the blind spot of the original PixelCNN.

use burn::module::Module;
use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::activation::{relu, sigmoid};
use serde::{Deserialize, Serialize};

use crate::dtype::{as_dtype, to_f32};
use crate::nn::{Conv2d, Embedding};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatedPixelCNNConfig {
    /// Gated blocks (the first is the 7x7 type-A block).
    pub n_blocks: usize,
    /// Channels of both stacks.
    pub dim: usize,
    /// Hidden channels of the 1x1 output head.
    pub linear_dim: usize,
    pub first_kernel: usize,
    pub kernel: usize,
    /// The stage-1 run this prior models: a run's output_dir, its `export/`, or a
    /// `checkpoint-<N>` directory.
    pub vqvae: std::path::PathBuf,
    /// Optional: the stage-1 config. When set and `vqvae` holds no weights yet, `train` runs
    /// stage 1 from it first (the two stages chained in one command).
    pub vqvae_config: Option<std::path::PathBuf>,
}

impl Default for GatedPixelCNNConfig {
    fn default() -> Self {
        Self {
            n_blocks: 15,
            dim: 128,
            linear_dim: 32,
            first_kernel: 7,
            kernel: 3,
            vqvae: "checkpoints/vqvae".into(),
            vqvae_config: None,
        }
    }
}

impl GatedPixelCNNConfig {
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.n_blocks == 0 || self.dim == 0 || self.linear_dim == 0 {
            p.push("model.pixelcnn: n_blocks, dim and linear_dim must be positive".into());
        }
        for (name, k) in [("first_kernel", self.first_kernel), ("kernel", self.kernel)] {
            if k < 3 || k % 2 == 0 {
                p.push(format!("model.pixelcnn.{name} = {k} must be odd and >= 3"));
            }
        }
        p
    }

    /// `num_codes` is the VQ-VAE's K.
    pub fn init(&self, num_codes: usize, device: &Device) -> GatedPixelCNN {
        GatedPixelCNN {
            embedding: Embedding::uniform(num_codes, self.dim, 1.0, device),
            layers: (0..self.n_blocks)
                .map(|i| {
                    let (kind, k) = if i == 0 {
                        (MaskType::A, self.first_kernel)
                    } else {
                        (MaskType::B, self.kernel)
                    };
                    GatedMaskedConv2d::new(kind, self.dim, k, device)
                })
                .collect(),
            output_1: Conv2d::new(self.dim, self.linear_dim, 1, 1, 0, device),
            output_2: Conv2d::new(self.linear_dim, num_codes, 1, 1, 0, device),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskType {
    /// Hides the current position (first layer).
    A,
    /// Lets the current position of the previous layer through.
    B,
}

/// The `[k, k]` 0/1 mask of a vertical or horizontal stack kernel.
pub fn stack_mask(k: usize, vertical: bool, kind: MaskType) -> Vec<f32> {
    let c = k / 2;
    let centre = kind == MaskType::B;
    let mut m = vec![0.0; k * k];
    for r in 0..k {
        for col in 0..k {
            let keep = if vertical {
                r < c || (r == c && centre)
            } else {
                r == c && (col < c || (col == c && centre))
            };
            if keep {
                m[r * k + col] = 1.0;
            }
        }
    }
    m
}

/// A square convolution whose kernel is multiplied by a causal mask.
#[derive(Module, Debug)]
pub struct MaskedConv2d {
    pub conv: Conv2d,
    pub vertical: bool,
    /// Type B (true) or A (false).
    pub include_centre: bool,
}

impl MaskedConv2d {
    fn new(
        c_in: usize,
        c_out: usize,
        k: usize,
        vertical: bool,
        kind: MaskType,
        device: &Device,
    ) -> Self {
        Self {
            conv: Conv2d::new(c_in, c_out, k, 1, k / 2, device),
            vertical,
            include_centre: kind == MaskType::B,
        }
    }

    /// # Shapes
    /// - `x`: `[b, c_in, h, w]`; returns `[b, c_out, h, w]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let w = self.conv.weight.val();
        let [.., k, _] = w.dims();
        let kind = if self.include_centre {
            MaskType::B
        } else {
            MaskType::A
        };
        let mask = Tensor::<4>::from_data(
            TensorData::new(stack_mask(k, self.vertical, kind), [1, 1, k, k]),
            &w.device(),
        );
        let dtype = x.dtype();
        crate::kernels::conv2d(
            x,
            as_dtype(w * mask, dtype),
            self.conv.bias.as_ref().map(|b| as_dtype(b.val(), dtype)),
            1,
            k / 2,
        )
    }
}

/// `tanh(a) * sigmoid(b)` over the two halves of the channels.
fn gate(x: Tensor<4>) -> Tensor<4> {
    let [a, b] = x.chunk(2, 1).try_into().expect("an even channel count");
    a.tanh() * sigmoid(b)
}

#[derive(Module, Debug)]
pub struct GatedMaskedConv2d {
    pub vert_stack: MaskedConv2d,
    pub vert_to_horiz: Conv2d,
    pub horiz_stack: MaskedConv2d,
    pub horiz_resid: Conv2d,
    /// The first (type-A) block has no residual connection.
    pub residual: bool,
}

impl GatedMaskedConv2d {
    fn new(kind: MaskType, dim: usize, k: usize, device: &Device) -> Self {
        Self {
            vert_stack: MaskedConv2d::new(dim, 2 * dim, k, true, kind, device),
            vert_to_horiz: Conv2d::new(2 * dim, 2 * dim, 1, 1, 0, device),
            horiz_stack: MaskedConv2d::new(dim, 2 * dim, k, false, kind, device),
            horiz_resid: Conv2d::new(dim, dim, 1, 1, 0, device),
            residual: kind == MaskType::B,
        }
    }

    /// # Shapes
    /// - `x_v`, `x_h`: `[b, dim, h, w]`; returns both stacks, same shapes
    pub fn forward(&self, x_v: Tensor<4>, x_h: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let h_vert = self.vert_stack.forward(x_v);
        let out_v = gate(h_vert.clone());
        let h_horiz = self.horiz_stack.forward(x_h.clone());
        let out = gate(self.vert_to_horiz.forward(h_vert) + h_horiz);
        let mut out_h = self.horiz_resid.forward(out);
        if self.residual {
            out_h = out_h + x_h;
        }
        (out_v, out_h)
    }
}

#[derive(Module, Debug)]
pub struct GatedPixelCNN {
    pub embedding: Embedding,
    pub layers: Vec<GatedMaskedConv2d>,
    pub output_1: Conv2d,
    pub output_2: Conv2d,
}

impl GatedPixelCNN {
    /// # Shapes
    /// - `codes`: `[b, h, w]` in `0..K`; returns logits `[b, K, h, w]`
    pub fn forward(&self, codes: Tensor<3, Int>) -> Tensor<4> {
        self.forward_embedded(self.embed(codes))
    }

    /// The codes' embeddings as channels: `[b, h, w]` -> `[b, dim, h, w]`.
    fn embed(&self, codes: Tensor<3, Int>) -> Tensor<4> {
        let [b, h, w] = codes.dims();
        let x = self.embedding.forward(codes.reshape([b * h * w]));
        let d = x.dims()[1];
        x.reshape([b, h, w, d]).permute([0, 3, 1, 2])
    }

    /// The network after the embedding (tests take gradients with respect to its input).
    ///
    /// # Shapes
    /// - `x`: `[b, dim, h, w]`; returns logits `[b, K, h, w]`
    pub fn forward_embedded(&self, x: Tensor<4>) -> Tensor<4> {
        let (mut x_v, mut x_h) = (x.clone(), x);
        for layer in &self.layers {
            (x_v, x_h) = layer.forward(x_v, x_h);
        }
        self.output_2
            .forward(relu(self.output_1.forward(relu(x_h))))
    }

    /// Mean cross-entropy of `codes` under the model.
    ///
    /// # Shapes
    /// - `codes`: `[b, h, w]`; returns `[1]`
    ///
    /// The network computes in `dtype` (mixed precision); the log-softmax and the mean in f32.
    pub fn loss(&self, codes: Tensor<3, Int>, dtype: DType) -> Tensor<1> {
        let x = as_dtype(self.embed(codes.clone()), dtype);
        let logits = to_f32(self.forward_embedded(x));
        let logp = burn::tensor::activation::log_softmax(logits, 1);
        let picked = logp.gather(1, codes.unsqueeze_dim(1));
        picked.mean().neg()
    }
}

impl GatedPixelCNN {
    /// Samples `n` code maps of `h` x `w` in raster order, all `n` at once: one forward pass per
    /// position, each code drawn from `softmax(logits / temperature)` with `rng`.
    pub fn sample(
        &self,
        n: usize,
        h: usize,
        w: usize,
        temperature: f64,
        rngs: &mut crate::seeds::ImageRngs,
        device: &Device,
    ) -> Tensor<3, Int> {
        let mut codes = vec![0i64; n * h * w];
        for i in 0..h {
            for j in 0..w {
                let current =
                    Tensor::<3, Int>::from_data(TensorData::new(codes.clone(), [n, h, w]), device);
                let logits = self.forward(current);
                let k = logits.dims()[1];
                let at: Vec<f32> = logits
                    .slice([0..n, 0..k, i..i + 1, j..j + 1])
                    .reshape([n, k])
                    .into_data()
                    .convert::<f32>()
                    .try_to_vec()
                    .expect("f32");
                for b in 0..n {
                    let row = &at[b * k..(b + 1) * k];
                    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let weights: Vec<f64> = row
                        .iter()
                        .map(|&l| (((l - max) as f64) / temperature).exp())
                        .collect();
                    let total: f64 = weights.iter().sum();
                    let mut u = rand::Rng::random::<f64>(rngs.image(b)) * total;
                    let mut pick = k - 1;
                    for (c, wgt) in weights.iter().enumerate() {
                        if u < *wgt {
                            pick = c;
                            break;
                        }
                        u -= wgt;
                    }
                    codes[(b * h + i) * w + j] = pick as i64;
                }
            }
        }
        Tensor::<3, Int>::from_data(TensorData::new(codes, [n, h, w]), device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    /// Which input positions output (i, j) depends on, found by backpropagation.
    fn dependencies(
        model: &GatedPixelCNN,
        dim: usize,
        h: usize,
        w: usize,
        i: usize,
        j: usize,
    ) -> Vec<bool> {
        let device = Device::flex().autodiff();
        let x = Tensor::<4>::random([1, dim, h, w], Distribution::Normal(0.0, 1.0), &device)
            .require_grad();
        let out = model.forward_embedded(x.clone());
        let k = out.dims()[1];
        let at = out.slice([0..1, 0..k, i..i + 1, j..j + 1]).sum();
        let grads = at.backward();
        let g: Vec<f32> = x
            .grad(&grads)
            .expect("input gradient")
            .abs()
            .sum_dim(1)
            .into_data()
            .try_to_vec()
            .unwrap();
        g.iter().map(|v| *v > 0.0).collect()
    }

    #[test]
    fn outputs_see_exactly_the_earlier_positions() {
        // 4 blocks: the 7x7 type-A block reaches 3 rows up and 3 columns each way, each 3x3
        // block one more, so on 6x6 every earlier position is in reach: any position missing
        // below is a blind spot, any later one (or the position itself) a leak.
        let (dim, h, w) = (4, 6, 6);
        crate::nn::seed_init(3);
        let model = GatedPixelCNNConfig {
            n_blocks: 4,
            dim,
            linear_dim: 4,
            ..GatedPixelCNNConfig::default()
        }
        .init(5, &Device::flex().autodiff());
        for i in 0..h {
            for j in 0..w {
                let seen = dependencies(&model, dim, h, w, i, j);
                for (p, &s) in seen.iter().enumerate() {
                    let earlier = p < i * w + j;
                    assert_eq!(
                        s,
                        earlier,
                        "output ({i},{j}) {} input ({},{})",
                        if s { "sees" } else { "misses" },
                        p / w,
                        p % w
                    );
                }
            }
        }
    }

    #[test]
    fn masks_of_each_type() {
        // 3x3, centre at (1, 1): (vertical, type, mask).
        let cases = [
            (true, MaskType::A, [1., 1., 1., 0., 0., 0., 0., 0., 0.]),
            (true, MaskType::B, [1., 1., 1., 1., 1., 1., 0., 0., 0.]),
            (false, MaskType::A, [0., 0., 0., 1., 0., 0., 0., 0., 0.]),
            (false, MaskType::B, [0., 0., 0., 1., 1., 0., 0., 0., 0.]),
        ];
        for (vertical, kind, want) in cases {
            assert_eq!(stack_mask(3, vertical, kind), want, "{vertical} {kind:?}");
        }
    }

    #[test]
    fn type_a_block_hides_the_position_itself() {
        let device = Device::flex().autodiff();
        crate::nn::seed_init(4);
        let block = GatedMaskedConv2d::new(MaskType::A, 2, 3, &device);
        let x = Tensor::<4>::random([1, 2, 3, 3], Distribution::Normal(0.0, 1.0), &device)
            .require_grad();
        let (_, out_h) = block.forward(x.clone(), x.clone());
        let grads = out_h.slice([0..1, 0..2, 1..2, 1..2]).sum().backward();
        let g: Vec<f32> = x
            .grad(&grads)
            .unwrap()
            .abs()
            .sum_dim(1)
            .into_data()
            .try_to_vec()
            .unwrap();
        // Sees (0, *) through the vertical stack and (1, 0) through the horizontal one.
        let seen: Vec<bool> = g.iter().map(|v| *v > 0.0).collect();
        assert_eq!(
            seen,
            vec![true, true, true, true, false, false, false, false, false]
        );
    }
}
