//! Layers stored in PyTorch's layout under PyTorch's parameter names.
//!
//! burn's own `Linear` keeps its weight as `[in, out]` and `GroupNorm` names its affine
//! parameters `gamma`/`beta`. Models here are checkpoint-compatible with diffusers, so their
//! layers store `weight: [out, in]`, `weight`/`bias` for norms, exactly as `torch.nn` does: a
//! module's parameter path *is* the safetensors key and the io module never renames anything.
//! Initialisation follows `torch.nn` defaults ([`init`]). A [`Linear`] may carry a LoRA adapter
//! ([`crate::lora::adapter`]).

pub mod init;

use burn::module::{Module, Param};
use burn::prelude::*;

use crate::dtype::as_dtype;
use crate::lora::adapter::LoraAdapter;
use init::{load_zeros, skipping_init, torch_uniform};
pub use init::{loading_in, seed_init, to_host, without_init};

/// `torch.nn.Linear`: `y = x W^T + b`, weight `[out_features, in_features]`, with an optional
/// low-rank adapter (LoRA): `y = x W^T + b + scale · dropout(x) D^T U^T`.
#[derive(Module, Debug)]
pub struct Linear {
    pub weight: Param<Tensor<2>>,
    pub bias: Option<Param<Tensor<1>>>,
    /// Parameter paths `<layer>.lora.down.weight` / `<layer>.lora.up.weight`: the keys
    /// diffusers' LoRA scripts write.
    pub lora: Option<LoraAdapter>,
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
            lora: None,
        }
    }

    /// # Shapes
    /// - input `[..., in_features]`
    /// - output `[..., out_features]`
    ///
    /// Computes in `x`'s dtype: f32 weights are cast to it under mixed precision (the cast is
    /// differentiable, so their gradients stay f32).
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dtype = x.dtype();
        let w = |p: &Param<Tensor<2>>| as_dtype(p.val(), dtype);
        let y = times_transposed(x.clone(), w(&self.weight));
        let y = match &self.bias {
            Some(b) => y + as_dtype(b.val(), dtype).unsqueeze(),
            None => y,
        };
        match &self.lora {
            Some(l) => y + l.forward(x),
            None => y,
        }
    }
}

/// `x · wᵀ` for `x` `[..., in]` and `w` `[out, in]`, with the leading axes flattened into one so
/// the product is a single `[rows, in] · [in, out]` GEMM: burn multiplies a `[b, n, in]` input by
/// a broadcast weight as `b` separate small GEMMs, and its backward then forms `b` weight
/// gradients `[in, out]` and sums them, where one GEMM with inner dimension `b·n` does.
pub(crate) fn times_transposed<const D: usize>(x: Tensor<D>, w: Tensor<2>) -> Tensor<D> {
    let dims = x.dims();
    let rows = dims[..D - 1].iter().product::<usize>();
    let mut out_dims = dims;
    out_dims[D - 1] = w.dims()[0];
    crate::kernels::linear(x.reshape([rows, dims[D - 1]]), w).reshape(out_dims)
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
    /// - computes in `x`'s dtype (the weights are cast to it)
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let dtype = x.dtype();
        crate::kernels::conv2d(
            x,
            as_dtype(self.weight.val(), dtype),
            self.bias.as_ref().map(|b| as_dtype(b.val(), dtype)),
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
    /// - computes in `x`'s dtype (the weights are cast to it)
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let dtype = x.dtype();
        let weight = as_dtype(self.weight.val(), dtype);
        match &self.bias {
            Some(b) => crate::kernels::conv_transpose2d(
                x,
                weight,
                as_dtype(b.val(), dtype),
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
                burn::tensor::module::conv_transpose2d(x, weight, None, options)
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
                weight: Param::from_tensor(load_zeros([num_embeddings, embedding_dim], device)),
            };
        }
        let values = init::uniform_values(num_embeddings * embedding_dim, bound);
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
        let values = init::standard_normal_f32(num_embeddings * embedding_dim);
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

    /// Mixed precision at the layer level: a half input makes conv, group norm and linear
    /// compute in half and answer in half, while the f32 weights get f32 gradients close to
    /// those of the f32 computation.
    #[test]
    fn half_inputs_compute_in_half_with_f32_weights_and_gradients() {
        use burn::tensor::DType;
        let device = Device::flex().autodiff();
        seed_init(3);
        let conv = Conv2d::new(3, 8, 3, 1, 1, &device);
        let norm = GroupNorm::new(2, 8, 1e-5, &device);
        let lin = Linear::new(4, 3, true, &device);
        let x = Tensor::<4>::random([2, 3, 4, 4], Distribution::Normal(0.0, 1.0), &device);
        let run = |dtype: DType| {
            let y = lin.forward(norm.forward(conv.forward(x.clone().cast(dtype))));
            assert_eq!(y.dtype(), dtype);
            let loss = crate::dtype::to_f32(y).sin().sum();
            let grads = loss.backward();
            let (gc, gl) = (
                conv.weight.grad(&grads).unwrap(),
                lin.weight.grad(&grads).unwrap(),
            );
            assert_eq!((gc.dtype(), gl.dtype()), (DType::F32, DType::F32));
            (to_host(gc), to_host(gl))
        };
        let (c32, l32) = run(DType::F32);
        for (dtype, tol) in [(DType::F16, 1e-2), (DType::BF16, 5e-2)] {
            let (c, l) = run(dtype);
            for (got, want) in [(c, &c32), (l, &l32)] {
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                let err = got
                    .iter()
                    .zip(want)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(err <= tol * scale, "{dtype:?}: error {err} of {scale}");
            }
        }
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
