//! Layers stored in PyTorch's layout under PyTorch's parameter names.
//!
//! burn's own `Linear` keeps its weight as `[in, out]` and `GroupNorm` names its affine
//! parameters `gamma`/`beta`. Models here are checkpoint-compatible with diffusers, so their
//! layers store `weight: [out, in]`, `weight`/`bias` for norms, exactly as `torch.nn` does: a
//! module's parameter path *is* the safetensors key and the io module never renames anything.
//! Initialisation follows `torch.nn` defaults (Kaiming-uniform with a = sqrt(5)) and draws from
//! a thread-local host RNG seeded by [`seed_init`], so the same seed gives the same weights on
//! every backend and concurrent runs (tests) cannot disturb each other's draws.

use std::cell::RefCell;

use burn::module::{Module, Param};
use burn::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

thread_local! {
    static INIT_RNG: RefCell<ChaCha8Rng> = RefCell::new(ChaCha8Rng::seed_from_u64(0));
    static SKIP_INIT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Seeds the weight initialisation of layers built afterwards on this thread.
pub fn seed_init(seed: u64) {
    INIT_RNG.with(|r| *r.borrow_mut() = ChaCha8Rng::seed_from_u64(seed));
}

/// Builds layers with zero weights and no random draws: for models about to be loaded from a
/// file (drawing 860M random numbers for a Stable Diffusion U-Net that is then overwritten would
/// take seconds). The init RNG is not advanced.
pub fn without_init<T>(build: impl FnOnce() -> T) -> T {
    let before = SKIP_INIT.with(|s| s.replace(true));
    let out = build();
    SKIP_INIT.with(|s| s.set(before));
    out
}

/// A tensor's values on the host as `f32`, whatever its dtype.
pub fn to_host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 after convert")
}

fn skipping_init() -> bool {
    SKIP_INIT.with(|s| s.get())
}

/// `U(-k, k)` with `k = 1 / sqrt(fan_in)`: what `torch.nn.Linear`/`Conv2d` use for both the
/// weight (Kaiming-uniform, a = sqrt(5)) and the bias.
fn torch_uniform<const D: usize>(shape: [usize; D], fan_in: usize, device: &Device) -> Tensor<D> {
    if skipping_init() {
        return Tensor::zeros(shape, device);
    }
    let k = 1.0 / (fan_in.max(1) as f64).sqrt();
    let n = shape.iter().product::<usize>();
    let values: Vec<f32> = INIT_RNG.with(|r| {
        (0..n)
            .map(|_| r.borrow_mut().random_range(-k..k) as f32)
            .collect()
    });
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// `torch.nn.Linear`: `y = x W^T + b`, weight `[out_features, in_features]`.
#[derive(Module, Debug)]
pub struct Linear {
    pub weight: Param<Tensor<2>>,
    pub bias: Option<Param<Tensor<1>>>,
}

impl Linear {
    pub fn new(in_features: usize, out_features: usize, bias: bool, device: &Device) -> Self {
        Self {
            weight: Param::from_tensor(torch_uniform(
                [out_features, in_features],
                in_features,
                device,
            )),
            bias: bias
                .then(|| Param::from_tensor(torch_uniform([out_features], in_features, device))),
        }
    }

    /// # Shapes
    /// - input `[..., in_features]`
    /// - output `[..., out_features]`
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let y = x.matmul(self.weight.val().transpose().unsqueeze());
        match &self.bias {
            Some(b) => y + b.val().unsqueeze(),
            None => y,
        }
    }
}

/// `torch.nn.Conv2d` with square kernel, symmetric zero padding, no groups.
#[derive(Module, Debug)]
pub struct Conv2d {
    pub weight: Param<Tensor<4>>,
    pub bias: Option<Param<Tensor<1>>>,
    pub stride: usize,
    pub padding: usize,
}

impl Conv2d {
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        device: &Device,
    ) -> Self {
        let fan_in = in_channels * kernel * kernel;
        Self {
            weight: Param::from_tensor(torch_uniform(
                [out_channels, in_channels, kernel, kernel],
                fan_in,
                device,
            )),
            bias: Some(Param::from_tensor(torch_uniform(
                [out_channels],
                fan_in,
                device,
            ))),
            stride,
            padding,
        }
    }

    pub fn without_bias(mut self) -> Self {
        self.bias = None;
        self
    }

    /// # Shapes
    /// - input `[batch, in_channels, height, width]`
    /// - output `[batch, out_channels, height', width']`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        crate::kernels::conv2d(
            x,
            self.weight.val(),
            self.bias.as_ref().map(|b| b.val()),
            self.stride,
            self.padding,
        )
    }
}

/// `torch.nn.ConvTranspose2d` (square kernel, no groups), weight `[in, out, k, k]`.
#[derive(Module, Debug)]
pub struct ConvTranspose2d {
    pub weight: Param<Tensor<4>>,
    pub bias: Option<Param<Tensor<1>>>,
    pub stride: usize,
    pub padding: usize,
}

impl ConvTranspose2d {
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        device: &Device,
    ) -> Self {
        // PyTorch computes fan_in from weight.size(1) * k * k for transposed convs.
        let fan_in = out_channels * kernel * kernel;
        Self {
            weight: Param::from_tensor(torch_uniform(
                [in_channels, out_channels, kernel, kernel],
                fan_in,
                device,
            )),
            bias: Some(Param::from_tensor(torch_uniform(
                [out_channels],
                fan_in,
                device,
            ))),
            stride,
            padding,
        }
    }

    /// # Shapes
    /// - input `[batch, in_channels, h, w]`
    /// - output `[batch, out_channels, (h - 1) * stride - 2 * padding + k, ...]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        match &self.bias {
            Some(b) => crate::kernels::conv_transpose2d(
                x,
                self.weight.val(),
                b.val(),
                self.stride,
                self.padding,
            ),
            None => {
                let options = burn::tensor::ops::ConvTransposeOptions::new(
                    [self.stride, self.stride],
                    [self.padding, self.padding],
                    [0, 0],
                    [1, 1],
                    1,
                );
                burn::tensor::module::conv_transpose2d(x, self.weight.val(), None, options)
            }
        }
    }
}

/// `torch.nn.Embedding`: a lookup table `weight: [num_embeddings, embedding_dim]`.
#[derive(Module, Debug)]
pub struct Embedding {
    pub weight: Param<Tensor<2>>,
}

impl Embedding {
    /// Rows drawn from `U(-bound, bound)` (VQ-VAE codebooks use `bound = 1 / num_embeddings`).
    pub fn uniform(
        num_embeddings: usize,
        embedding_dim: usize,
        bound: f64,
        device: &Device,
    ) -> Self {
        if skipping_init() {
            return Self {
                weight: Param::from_tensor(Tensor::zeros([num_embeddings, embedding_dim], device)),
            };
        }
        let values: Vec<f32> = INIT_RNG.with(|r| {
            (0..num_embeddings * embedding_dim)
                .map(|_| r.borrow_mut().random_range(-bound..bound) as f32)
                .collect()
        });
        let weight = Tensor::from_data(
            TensorData::new(values, [num_embeddings, embedding_dim]),
            device,
        );
        Self {
            weight: Param::from_tensor(weight),
        }
    }

    /// Rows drawn from `N(0, 1)`, `torch.nn.Embedding`'s default.
    pub fn normal(num_embeddings: usize, embedding_dim: usize, device: &Device) -> Self {
        if skipping_init() {
            return Self::uniform(num_embeddings, embedding_dim, 0.0, device);
        }
        let values: Vec<f32> = INIT_RNG.with(|r| {
            (0..num_embeddings * embedding_dim)
                .map(|_| r.borrow_mut().sample::<f32, _>(rand_distr::StandardNormal))
                .collect()
        });
        let weight = Tensor::from_data(
            TensorData::new(values, [num_embeddings, embedding_dim]),
            device,
        );
        Self {
            weight: Param::from_tensor(weight),
        }
    }

    /// # Shapes
    /// - `indices`: `[n]`, values in `0..num_embeddings`; returns `[n, embedding_dim]`
    pub fn forward(&self, indices: Tensor<1, Int>) -> Tensor<2> {
        self.weight.val().select(0, indices)
    }
}

/// `torch.nn.GroupNorm` with affine parameters named `weight`/`bias`.
#[derive(Module, Debug)]
pub struct GroupNorm {
    pub weight: Param<Tensor<1>>,
    pub bias: Param<Tensor<1>>,
    pub num_groups: usize,
    pub eps: f64,
}

impl GroupNorm {
    pub fn new(num_groups: usize, num_channels: usize, eps: f64, device: &Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::ones([num_channels], device)),
            bias: Param::from_tensor(Tensor::zeros([num_channels], device)),
            num_groups,
            eps,
        }
    }

    /// # Shapes
    /// - input `[batch, channels, ...]` (rank 3 or 4), output the same
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        crate::kernels::group_norm(
            x,
            self.weight.val(),
            self.bias.val(),
            self.num_groups,
            self.eps,
        )
    }
}

/// `torch.nn.LayerNorm(normalized_shape)` over the trailing `N` dims, elementwise affine.
#[derive(Module, Debug)]
pub struct LayerNorm<const N: usize> {
    pub weight: Param<Tensor<N>>,
    pub bias: Param<Tensor<N>>,
    pub eps: f64,
}

impl<const N: usize> LayerNorm<N> {
    pub fn new(normalized_shape: [usize; N], device: &Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::ones(normalized_shape, device)),
            bias: Param::from_tensor(Tensor::zeros(normalized_shape, device)),
            eps: 1e-5,
        }
    }

    pub fn with_eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        self
    }

    /// # Shapes
    /// - input `[...leading, ...normalized_shape]` (rank `D > N`), output the same
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        crate::kernels::layer_norm(x, self.weight.val(), self.bias.val(), self.eps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    #[test]
    fn group_norm_normalises_each_group() {
        let device = Device::flex();
        let norm = GroupNorm::new(2, 4, 1e-5, &device);
        let x = Tensor::<4>::random([3, 4, 5, 5], Distribution::Normal(3.0, 2.0), &device);
        let y = norm.forward(x).reshape([3, 2, 50]);
        let mean: Vec<f32> = y
            .clone()
            .mean_dim(2)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let var: Vec<f32> = y.var_bias(2).into_data().try_to_vec::<f32>().unwrap();
        assert!(mean.iter().all(|m| m.abs() < 1e-4), "{mean:?}");
        assert!(var.iter().all(|v| (v - 1.0).abs() < 1e-3), "{var:?}");
    }

    #[test]
    fn linear_uses_torch_weight_layout() {
        let device = Device::flex();
        let mut lin = Linear::new(3, 2, true, &device);
        lin.weight = Param::from_data([[1.0, 0.0, 0.0], [0.0, 2.0, 1.0]], &device);
        lin.bias = Some(Param::from_data([0.5, -1.0], &device));
        let y: Vec<f32> = lin
            .forward(Tensor::<2>::from_floats([[1.0, 2.0, 3.0]], &device))
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        assert_eq!(y, vec![1.5, 6.0]);
    }
}
