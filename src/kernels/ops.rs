//! The op trait [`TrainOps`] (a burn backend extension) and the public functions layers call.
//! The trait's default bodies are burn's own operations (`composed`); the Flex (CPU)
//! implementation is in `flex`, the autodiff one in `autodiff`.

use burn::backend::ops::{ConvOptions, ConvTransposeOptions};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::prelude::*;
use burn::tensor::DType;

use super::composed::{
    composed_attention_grads, composed_attention_lse, composed_conv_transpose2d_grads,
    composed_conv2d_param_grads, composed_geglu, composed_geglu_grad, composed_group_norm,
    composed_group_norm_grads, composed_silu, composed_silu_grad, composed_softmax,
    composed_softmax_grad,
};
use crate::dtype::as_dtype;

/// Convolution (square kernel, one stride and padding, no dilation or groups) and SiLU with
/// their gradients. The default bodies are burn's own operations; Flex overrides them with the
/// kernels of this module and autodiff routes its backward pass through them.
#[backend_extension(Flex, Autodiff, Cube: cfg(feature = "cuda"))]
pub trait TrainOps: Backend {
    /// `conv2d(x, weight)`, `x` `[n, cin, h, w]`, `weight` `[cout, cin, k, k]`.
    fn conv2d_train(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        Self::conv2d(x, weight, None, conv_options(stride, padding))
    }

    /// `conv2d(x, weight) + bias`, `bias` `[cout]`. (A separate method because the extension
    /// macro cannot route an optional tensor.)
    fn conv2d_bias_train(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        Self::conv2d(x, weight, Some(bias), conv_options(stride, padding))
    }

    /// The gradient of [`TrainOps::conv2d_train`] with respect to `x`.
    fn conv2d_input_grad(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        Self::conv2d_x_backward(x, weight, grad, conv_options(stride, padding))
    }

    /// The gradients of [`TrainOps::conv2d_train`] with respect to `weight` and `bias`.
    fn conv2d_param_grads(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        composed_conv2d_param_grads::<Self>(x, weight, grad, stride, padding)
    }

    /// Group normalisation of `x` `[n, c, s]` over `groups` groups of channels, affine `weight`
    /// and `bias` `[c]` (biased variance, `eps` inside the square root, as `torch.nn.GroupNorm`).
    fn group_norm_train(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        groups: usize,
        eps: f64,
    ) -> FloatTensor<Self> {
        composed_group_norm::<Self>(x, weight, bias, groups, eps)
    }

    /// The gradients `(dx, dweight, dbias)` of [`TrainOps::group_norm_train`].
    fn group_norm_grads(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        groups: usize,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        composed_group_norm_grads::<Self>(x, weight, grad, groups, eps)
    }

    /// `conv_transpose2d(x, weight) + bias` without output padding, `x` `[n, cin, h, w]`,
    /// `weight` `[cin, cout, k, k]` (PyTorch's layout), `bias` `[cout]`.
    fn conv_transpose2d_bias_train(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        Self::conv_transpose2d(x, weight, Some(bias), transpose_options(stride, padding))
    }

    /// The gradients `(dx, dweight, dbias)` of [`TrainOps::conv_transpose2d_bias_train`].
    fn conv_transpose2d_grads(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        composed_conv_transpose2d_grads::<Self>(x, weight, grad, stride, padding)
    }

    /// Softmax over the last dimension.
    fn softmax_last_train(x: FloatTensor<Self>) -> FloatTensor<Self> {
        composed_softmax::<Self>(x)
    }

    /// `y·(grad - Σ grad·y)` over the last dimension: the gradient of
    /// [`TrainOps::softmax_last_train`] given its output `y`.
    fn softmax_last_grad(y: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        composed_softmax_grad::<Self>(y, grad)
    }

    /// `x·σ(x)`.
    fn silu_train(x: FloatTensor<Self>) -> FloatTensor<Self> {
        composed_silu::<Self>(x)
    }

    /// `x·Φ(x)`, the exact (erf) GELU.
    fn gelu_train(x: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::gelu(x)
    }

    /// `grad·(Φ(x) + x·φ(x))`, the gradient of [`TrainOps::gelu_train`].
    fn gelu_input_grad(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::gelu_backward(x, grad)
    }

    /// `left·gelu(gate)` for `h = [left | gate]` split in half along the last axis (diffusers'
    /// `GEGLU` after its projection).
    fn geglu_train(h: FloatTensor<Self>) -> FloatTensor<Self> {
        composed_geglu::<Self>(h)
    }

    /// The gradient of [`TrainOps::geglu_train`] with respect to `h`.
    fn geglu_input_grad(h: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        composed_geglu_grad::<Self>(h, grad)
    }

    /// `softmax(q kᵀ · scale) v` for `q` `[h, n, d]`, `k`, `v` `[h, m, d]`.
    fn attention_train(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        Self::attention_lse(q, k, v, scale).0
    }

    /// [`TrainOps::attention_train`] and each row's `log Σ exp(scale · q kᵀ)` `[h, n]`.
    fn attention_lse(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        composed_attention_lse::<Self>(q, k, v, scale)
    }

    /// The gradients `(dq, dk, dv)` of [`TrainOps::attention_train`] given its output `o`, the
    /// rows' log-sum-exp and the output gradient.
    fn attention_grads(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        o: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        composed_attention_grads::<Self>(q, k, v, o, lse, grad, scale)
    }

    /// `grad·σ(x)·(1 + x·(1 - σ(x)))`, the gradient of [`TrainOps::silu_train`].
    fn silu_input_grad(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        composed_silu_grad::<Self>(x, grad)
    }

    /// `x · wᵀ` for `x` `[rows, in]` and `w` `[out, in]` (a linear layer's product).
    fn linear_train(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(x, Self::float_transpose(w))
    }

    /// `grad · w`, the gradient of [`TrainOps::linear_train`] with respect to `x`.
    fn linear_input_grad(w: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(grad, w)
    }

    /// `gradᵀ · x`, the gradient of [`TrainOps::linear_train`] with respect to `w`.
    fn linear_weight_grad(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(Self::float_transpose(grad), x)
    }
}

pub(super) fn conv_options(stride: usize, padding: usize) -> ConvOptions<2> {
    ConvOptions::new([stride, stride], [padding, padding], [1, 1], 1)
}

pub(super) fn transpose_options(stride: usize, padding: usize) -> ConvTransposeOptions<2> {
    ConvTransposeOptions::new([stride, stride], [padding, padding], [0, 0], [1, 1], 1)
}

/// Mixed precision: calls with half-precision tensors (bf16/f16 activations, weights cast to
/// the activation's dtype by `nn`) answer in that dtype, and their gradients come back in each
/// input's dtype.
///
/// - On the CPU the Flex kernels take half tensors as they are, widen them to f32 inside the
///   call and round the result back, so the autodiff graph keeps the half tensors (half the
///   activation memory) while everything is computed in f32.
/// - Elsewhere (CUDA: burn's own ops) convolutions and SiLU run in half, as under torch's
///   autocast, and the statistics ops (group/layer norm, softmax, attention) get f32 inputs
///   through a differentiable cast ([`stats_in_f32`]).
fn stats_in_f32<const D: usize>(t: Tensor<D>) -> Tensor<D> {
    if t.dtype() == DType::F32 || t.device().inner() == Device::flex() {
        t
    } else {
        t.cast(DType::F32)
    }
}

/// `conv_transpose2d(x, weight) + bias` through [`TrainOps`] (no output padding, no groups).
///
/// # Shapes
/// - `x` `[batch, in_channels, h, w]`, `weight` `[in_channels, out_channels, k, k]`, `bias`
///   `[out_channels]`
/// - output `[batch, out_channels, (h - 1)·stride - 2·padding + k, ...]`
pub fn conv_transpose2d(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Tensor<1>,
    stride: usize,
    padding: usize,
) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as TrainOps>::conv_transpose2d_bias_train(
        x.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
        stride,
        padding,
    ))
}

/// `conv2d(x, weight) + bias` through [`TrainOps`].
///
/// # Shapes
/// - `x` `[batch, in_channels, height, width]`, `weight` `[out_channels, in_channels, k, k]`,
///   `bias` `[out_channels]`
/// - output `[batch, out_channels, height', width']`
pub fn conv2d(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    stride: usize,
    padding: usize,
) -> Tensor<4> {
    let (x, weight) = (x.into_dispatch(), weight.into_dispatch());
    Tensor::from_dispatch(match bias {
        Some(b) => {
            <Dispatch as TrainOps>::conv2d_bias_train(x, weight, b.into_dispatch(), stride, padding)
        }
        None => <Dispatch as TrainOps>::conv2d_train(x, weight, stride, padding),
    })
}

/// `torch.nn.GroupNorm(groups, c)` through [`TrainOps`].
///
/// # Shapes
/// - `x` `[batch, channels, ...]` (rank 3 or more), `weight`/`bias` `[channels]`; output as `x`
pub fn group_norm<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<1>,
    bias: Tensor<1>,
    groups: usize,
    eps: f64,
) -> Tensor<D> {
    let (shape, dtype) = (x.dims(), x.dtype());
    let rest = shape[2..].iter().product::<usize>();
    let x: Tensor<3> = stats_in_f32(x).reshape([shape[0], shape[1], rest]);
    let y = <Dispatch as TrainOps>::group_norm_train(
        x.into_dispatch(),
        stats_in_f32(weight).into_dispatch(),
        stats_in_f32(bias).into_dispatch(),
        groups,
        eps,
    );
    as_dtype(Tensor::<3>::from_dispatch(y).reshape(shape), dtype)
}

/// `torch.nn.LayerNorm(normalized_shape)` over the trailing `N` dims through [`TrainOps`]: a group
/// norm with one group whose "channels" are the normalised elements.
///
/// # Shapes
/// - `x` `[...leading, ...normalized_shape]` (rank `D > N`), `weight`/`bias`
///   `normalized_shape`; output as `x`. Every leading index is one normalised row.
pub fn layer_norm<const D: usize, const N: usize>(
    x: Tensor<D>,
    weight: Tensor<N>,
    bias: Tensor<N>,
    eps: f64,
) -> Tensor<D> {
    let (shape, dtype) = (x.dims(), x.dtype());
    let lead = D - N;
    let rows = shape[..lead].iter().product::<usize>();
    let x: Tensor<3> = stats_in_f32(x).reshape([rows, shape[lead..].iter().product::<usize>(), 1]);
    let y = <Dispatch as TrainOps>::group_norm_train(
        x.into_dispatch(),
        stats_in_f32(weight).flatten::<1>(0, N - 1).into_dispatch(),
        stats_in_f32(bias).flatten::<1>(0, N - 1).into_dispatch(),
        1,
        eps,
    );
    as_dtype(Tensor::<3>::from_dispatch(y).reshape(shape), dtype)
}

/// `softmax(q kᵀ / sqrt(d)) v` through [`TrainOps`], per head, without materialising the scores
/// of all heads on the CPU ([`attention`]).
///
/// # Shapes
/// - `q` `[h, n, d]`, `k`, `v` `[h, m, d]`; output `[h, n, d]`
pub fn scaled_dot_product_attention(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>) -> Tensor<3> {
    let (d, dtype) = (q.dims()[2], q.dtype());
    let o = Tensor::from_dispatch(<Dispatch as TrainOps>::attention_train(
        stats_in_f32(q).into_dispatch(),
        stats_in_f32(k).into_dispatch(),
        stats_in_f32(v).into_dispatch(),
        1.0 / (d as f64).sqrt(),
    ));
    as_dtype(o, dtype)
}

/// `x·σ(x)` through [`TrainOps`].
///
/// # Shapes
/// - any; output the same
pub fn silu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as TrainOps>::silu_train(x.into_dispatch()))
}

/// `x·Φ(x)` (`torch.nn.functional.gelu`, exact) through [`TrainOps`].
///
/// # Shapes
/// - any; output the same
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as TrainOps>::gelu_train(x.into_dispatch()))
}

/// diffusers' `GEGLU` after its projection through [`TrainOps`]: `h` split in half along the
/// last axis, `left·gelu(gate)`.
///
/// # Shapes
/// - `h` `[..., 2·inner]`; output `[..., inner]`
pub fn geglu<const D: usize>(h: Tensor<D>) -> Tensor<D> {
    let width = h.dims()[D - 1];
    assert!(
        width.is_multiple_of(2),
        "geglu: the last axis ({width}) must be even"
    );
    Tensor::from_dispatch(<Dispatch as TrainOps>::geglu_train(h.into_dispatch()))
}

/// Softmax over the last dimension through [`TrainOps`] (`burn::tensor::activation::softmax(x,
/// D - 1)`, fused: one pass for the row maxima, one for exp and sum, in parallel over rows).
pub fn softmax_last<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let dtype = x.dtype();
    as_dtype(
        Tensor::from_dispatch(<Dispatch as TrainOps>::softmax_last_train(
            stats_in_f32(x).into_dispatch(),
        )),
        dtype,
    )
}

/// `x · wᵀ` for `x` `[rows, in]` and `w` `[out, in]`: a linear layer's product. Under bf16 mixed
/// precision on the CPU (both bf16) it runs through [`TrainOps::linear_train`] on the bf16 GEMM
/// ([`Product::bf16`]); otherwise it is burn's `x.matmul(w.transpose())`.
pub fn linear(x: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
    let bf16 = x.dtype() == DType::BF16 && w.dtype() == DType::BF16;
    if bf16 && x.device().inner() == Device::flex() {
        Tensor::from_dispatch(<Dispatch as TrainOps>::linear_train(
            x.into_dispatch(),
            w.into_dispatch(),
        ))
    } else {
        x.matmul(w.transpose())
    }
}

#[cfg(feature = "cuda")]
impl TrainOps for burn::backend::Cube {}
