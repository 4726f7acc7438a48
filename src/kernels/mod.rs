//! Training kernels that burn's CPU backend lacks, as a burn backend extension.
//!
//! Profiling a training step of the small U-Nets (docs/benchmarks.md) put most of the CPU time
//! in places that are not model code: the backward pass of every convolution (burn computes the
//! input gradient with a transposed convolution whose scatter loop is single-threaded, and the
//! weight gradient as a convolution whose kernel is the whole output gradient), SiLU and softmax
//! (scalar libm `expf`, several single-threaded element-wise passes each way), and
//! GroupNorm/LayerNorm (about ten single-threaded passes forward, twenty backward); in the
//! latent-diffusion U-Net's feed-forward, GELU (scalar libm `erff`).
//! [`TrainOps`] replaces these operations (convolution, transposed convolution, group norm,
//! SiLU, GELU, softmax over the last dimension), and, under bf16 mixed precision, linear
//! layers' products (whose bf16 operands `bf16_gemm` multiplies at twice the f32 rate):
//!
//! - on burn's Flex (CPU) backend with the kernels in [`conv`], [`norm`] and [`act`];
//! - under autodiff with a backward step that calls those kernels (one node per operation, so the
//!   graph also gets smaller);
//! - on every other backend (CUDA) with the trait's default bodies, which are exactly the burn
//!   operations the layers called before.
//!
//! Layers call [`conv2d`], [`conv_transpose2d`], [`group_norm`], [`layer_norm`], [`silu`],
//! [`gelu`], [`softmax_last`] and [`linear`]; nothing else in the crate knows this module
//! exists.

/// Runs `$body` compiled for the best instruction set this CPU has. The code is the same in each
/// arm; only the vector width differs, and every operation is exactly rounded IEEE arithmetic
/// (no fused multiply-add is requested), so all arms give identical results.
macro_rules! multiversion {
    (($($arg:ident: $ty:ty),*) => $body:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f")]
            unsafe fn avx512($($arg: $ty),*) { $body }
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($arg: $ty),*) { $body }
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the feature was detected on this CPU.
                return unsafe { avx512($($arg),*) };
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: the features were detected on this CPU.
                return unsafe { avx2($($arg),*) };
            }
        }
        $body
    }};
}

pub mod act;
pub mod attention;
mod bf16_gemm;
pub mod conv;
pub mod norm;
mod winograd;

use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ops::{
    ActivationOps, ConvOptions, ConvTransposeOptions, FloatTensorOps, ModuleOps,
};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, TensorMetadata, backend_extension};
use burn::prelude::*;
use burn::tensor::{DType, TensorData, bf16, f16};
use rayon::prelude::*;

use burn::backend::flex::FlexTensor;

use crate::optim::precision::as_dtype;

use conv::Conv2dGeom;
use norm::NormGeom;

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

/// `(x̂, 1/√(σ² + ε))` of `x` `[n, c, s]` normalised per group: `x̂` `[n, c, s]`, the inverse
/// standard deviation `[n, groups, 1]`.
fn normalized<B: Backend>(
    x: FloatTensor<B>,
    groups: usize,
    eps: f64,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let shape = x.shape();
    let (n, c, s) = (shape[0], shape[1], shape[2]);
    let grouped = B::float_reshape(x, [n, groups, c / groups * s].into());
    let mean = B::float_mean_dim(grouped.clone(), 2);
    let centered = B::float_sub(grouped, mean);
    let var = B::float_mean_dim(B::float_mul(centered.clone(), centered.clone()), 2);
    let rstd = B::float_recip(B::float_sqrt(B::float_add_scalar(var, eps.into())));
    let xhat = B::float_reshape(B::float_mul(centered, rstd.clone()), shape);
    (xhat, rstd)
}

/// burn's operations for [`TrainOps::conv2d_param_grads`].
fn composed_conv2d_param_grads<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    grad: FloatTensor<B>,
    stride: usize,
    padding: usize,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let options = conv_options(stride, padding);
    let dw = B::conv2d_weight_backward(x.clone(), weight.clone(), grad.clone(), options);
    let bias = B::float_zeros([weight.shape()[0]].into(), &x.device(), x.dtype().into());
    (dw, B::conv2d_bias_backward(x, bias, grad))
}

/// burn's operations for [`TrainOps::conv_transpose2d_grads`].
fn composed_conv_transpose2d_grads<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    grad: FloatTensor<B>,
    stride: usize,
    padding: usize,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let options = transpose_options(stride, padding);
    let dx = B::conv_transpose2d_x_backward(weight.clone(), grad.clone(), options.clone());
    let dw = B::conv_transpose2d_weight_backward(x.clone(), weight.clone(), grad.clone(), options);
    let bias = B::float_zeros([weight.shape()[1]].into(), &x.device(), x.dtype().into());
    (dx, dw, B::conv_transpose2d_bias_backward(x, bias, grad))
}

/// burn's operations for [`TrainOps::group_norm_train`].
fn composed_group_norm<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    bias: FloatTensor<B>,
    groups: usize,
    eps: f64,
) -> FloatTensor<B> {
    let c = x.shape()[1];
    let (xhat, _) = normalized::<B>(x, groups, eps);
    let w = B::float_reshape(weight, [1, c, 1].into());
    let b = B::float_reshape(bias, [1, c, 1].into());
    B::float_add(B::float_mul(xhat, w), b)
}

/// burn's operations for [`TrainOps::group_norm_grads`] (the closed form in [`norm`]).
fn composed_group_norm_grads<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    grad: FloatTensor<B>,
    groups: usize,
    eps: f64,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let shape = x.shape();
    let (n, c, s) = (shape[0], shape[1], shape[2]);
    let (xhat, rstd) = normalized::<B>(x, groups, eps);
    let sum_ns = |t| B::float_reshape(B::float_sum_dim(B::float_sum_dim(t, 2), 0), [c].into());
    let dw = sum_ns(B::float_mul(grad.clone(), xhat.clone()));
    let db = sum_ns(grad.clone());
    let grouped = |t| B::float_reshape(t, [n, groups, c / groups * s].into());
    let d = grouped(B::float_mul(
        grad,
        B::float_reshape(weight, [1, c, 1].into()),
    ));
    let xhat = grouped(xhat);
    let mean_d = B::float_mean_dim(d.clone(), 2);
    let mean_dx = B::float_mean_dim(B::float_mul(d.clone(), xhat.clone()), 2);
    let inner = B::float_sub(B::float_sub(d, mean_d), B::float_mul(xhat, mean_dx));
    (B::float_reshape(B::float_mul(inner, rstd), shape), dw, db)
}

/// The two halves of `h` along its last axis.
fn halves<B: Backend>(h: FloatTensor<B>) -> [FloatTensor<B>; 2] {
    let shape = h.shape();
    let (last, inner) = (shape.num_dims() - 1, shape[shape.num_dims() - 1] / 2);
    let half = |range: std::ops::Range<usize>| {
        let slices: Vec<burn::tensor::Slice> = (0..=last)
            .map(|d| {
                if d == last {
                    range.clone().into()
                } else {
                    (0..shape[d]).into()
                }
            })
            .collect();
        B::float_slice(h.clone(), &slices)
    };
    [half(0..inner), half(inner..2 * inner)]
}

/// burn's operations for [`TrainOps::geglu_train`].
fn composed_geglu<B: Backend>(h: FloatTensor<B>) -> FloatTensor<B> {
    let [left, gate] = halves::<B>(h);
    B::float_mul(left, B::gelu(gate))
}

/// burn's operations for [`TrainOps::geglu_input_grad`].
fn composed_geglu_grad<B: Backend>(h: FloatTensor<B>, grad: FloatTensor<B>) -> FloatTensor<B> {
    let last = h.shape().num_dims() - 1;
    let [left, gate] = halves::<B>(h);
    let d_left = B::float_mul(grad.clone(), B::gelu(gate.clone()));
    let d_gate = B::gelu_backward(gate, B::float_mul(grad, left));
    B::float_cat(vec![d_left, d_gate], last)
}

/// burn's operations for [`TrainOps::silu_train`].
fn composed_silu<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    B::float_mul(x.clone(), B::sigmoid(x))
}

/// `(scale · q kᵀ, its row maxima)` `[h, n, m]`, `[h, n, 1]`.
fn scaled_scores<B: Backend>(q: FloatTensor<B>, k: FloatTensor<B>, scale: f64) -> FloatTensor<B> {
    B::float_mul_scalar(
        B::float_matmul(q, B::float_swap_dims(k, 1, 2)),
        scale.into(),
    )
}

/// burn's operations for [`TrainOps::attention_lse`].
fn composed_attention_lse<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    scale: f64,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let s = scaled_scores::<B>(q, k, scale);
    let max = B::float_max_dim(s.clone(), 2);
    let e = B::float_exp(B::float_sub(s, max.clone()));
    let sum = B::float_sum_dim(e.clone(), 2);
    let o = B::float_matmul(B::float_div(e, sum.clone()), v);
    let lse = B::float_add(max, B::float_log(sum));
    let shape = lse.shape();
    (o, B::float_reshape(lse, [shape[0], shape[1]].into()))
}

/// burn's operations for [`TrainOps::attention_grads`].
fn composed_attention_grads<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    o: FloatTensor<B>,
    lse: FloatTensor<B>,
    grad: FloatTensor<B>,
    scale: f64,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let s = scaled_scores::<B>(q.clone(), k.clone(), scale);
    let shape = lse.shape();
    let lse = B::float_reshape(lse, [shape[0], shape[1], 1].into());
    let p = B::float_exp(B::float_sub(s, lse));
    let dv = B::float_matmul(B::float_swap_dims(p.clone(), 1, 2), grad.clone());
    let dp = B::float_matmul(grad.clone(), B::float_swap_dims(v, 1, 2));
    let d = B::float_sum_dim(B::float_mul(grad, o), 2);
    let ds = B::float_mul_scalar(B::float_mul(p, B::float_sub(dp, d)), scale.into());
    let dq = B::float_matmul(ds.clone(), k);
    let dk = B::float_matmul(B::float_swap_dims(ds, 1, 2), q);
    (dq, dk, dv)
}

/// burn's operations for [`TrainOps::softmax_last_train`].
fn composed_softmax<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    let d = x.shape().num_dims() - 1;
    let max = B::float_max_dim(x.clone(), d);
    let e = B::float_exp(B::float_sub(x, max));
    let sum = B::float_sum_dim(e.clone(), d);
    B::float_div(e, sum)
}

/// burn's operations for [`TrainOps::softmax_last_grad`].
fn composed_softmax_grad<B: Backend>(y: FloatTensor<B>, grad: FloatTensor<B>) -> FloatTensor<B> {
    let d = y.shape().num_dims() - 1;
    let dot = B::float_sum_dim(B::float_mul(grad.clone(), y.clone()), d);
    B::float_mul(y, B::float_sub(grad, dot))
}

/// burn's operations for [`TrainOps::silu_input_grad`].
fn composed_silu_grad<B: Backend>(x: FloatTensor<B>, grad: FloatTensor<B>) -> FloatTensor<B> {
    let s = B::sigmoid(x.clone());
    let one_minus_s = B::float_add_scalar(B::float_neg(s.clone()), 1.0.into());
    let inner = B::float_add_scalar(B::float_mul(x, one_minus_s), 1.0.into());
    B::float_mul(grad, B::float_mul(s, inner))
}

/// A new `len`-element vector built in parallel, `chunk` elements per task: each task zeroes its
/// own chunk and hands it to `f` with the chunk's index; `f`'s results come back in chunk order.
///
/// `vec![0.0; len]` zeroes on the calling thread before any task starts. Once freed activations
/// are reused from the heap (see [`crate::tune_allocator`]) that serial `memset` was 5% of a
/// training step's samples, all on one core; here it is spread over the tasks, each on memory it
/// is about to write anyway.
pub(crate) fn par_new<R: Send>(
    len: usize,
    chunk: usize,
    f: impl Fn(usize, &mut [f32]) -> R + Sync + Send,
) -> (Vec<f32>, Vec<R>) {
    let zero_then_f = |i, c: &mut [std::mem::MaybeUninit<f32>]| {
        for e in c.iter_mut() {
            e.write(0.0);
        }
        // SAFETY: every element of `c` was initialised just above, and `MaybeUninit<f32>` has
        // the layout of `f32`.
        f(i, unsafe {
            &mut *(c as *mut [std::mem::MaybeUninit<f32>] as *mut [f32])
        })
    };
    // SAFETY: `zero_then_f` writes every element of its chunk before anything else.
    unsafe { par_new_uninit(len, chunk, zero_then_f) }
}

/// [`par_new`] without the zeroing, for kernels that write every output element exactly once
/// (element-wise activations, normalisations): each task gets its chunk uninitialised. Zeroing
/// first would be one more full write pass over an output that is often larger than the caches.
///
/// # Safety
/// `f` must write every element of the chunk it is given (a chunk `f` returns from without
/// writing would be read as uninitialised memory).
pub(crate) unsafe fn par_new_uninit<R: Send>(
    len: usize,
    chunk: usize,
    f: impl Fn(usize, &mut [std::mem::MaybeUninit<f32>]) -> R + Sync + Send,
) -> (Vec<f32>, Vec<R>) {
    let mut v = Vec::<f32>::with_capacity(len);
    let results = v.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .map(|(i, c)| f(i, c))
        .collect();
    // SAFETY: the chunks cover `0..len` and the caller guarantees `f` wrote each one (a panic
    // in `f` propagates before this line).
    unsafe { v.set_len(len) };
    (v, results)
}

/// Adds per-chunk partial gradients `(a, b)` in chunk order (zeros of `lens` when there are none):
/// the fixed summation order that makes the kernels' batch sums independent of threading.
fn sum_in_order(partials: Vec<(Vec<f32>, Vec<f32>)>, lens: (usize, usize)) -> (Vec<f32>, Vec<f32>) {
    let mut parts = partials.into_iter();
    let (mut a, mut b) = parts
        .next()
        .unwrap_or_else(|| (vec![0.0; lens.0], vec![0.0; lens.1]));
    for (pa, pb) in parts {
        a.iter_mut().zip(&pa).for_each(|(x, y)| *x += y);
        b.iter_mut().zip(&pb).for_each(|(x, y)| *x += y);
    }
    (a, b)
}

/// Deterministic values in `[-1, 1]` for the kernels' tests.
#[cfg(test)]
fn test_values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 2001) as f32 / 1000.0
                - 1.0
        })
        .collect()
}

fn conv_options(stride: usize, padding: usize) -> ConvOptions<2> {
    ConvOptions::new([stride, stride], [padding, padding], [1, 1], 1)
}

fn transpose_options(stride: usize, padding: usize) -> ConvTransposeOptions<2> {
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

// ---------------------------------------------------------------------------------------------
// Flex: the CPU kernels.

/// How [`matmul`] runs a product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Product {
    /// Split the product over the thread pool. Callers parallelise over images; with fewer
    /// images than threads this spreads each product over the idle threads (the output is
    /// split, never the k sum, so the result does not depend on the thread count).
    pub parallel: bool,
    /// Both operands hold bf16 values (mixed precision): the product runs on
    /// [`bf16_gemm`]'s kernel where the CPU has one, at twice the f32 multiply rate. The
    /// operands are rounded to bf16 (exact for them) and summed in f32.
    pub bf16: bool,
}

impl Product {
    /// One thread, f32.
    pub(crate) const SERIAL: Product = Product {
        parallel: false,
        bf16: false,
    };
}

/// `dst (+)= lhs · rhs` with `lhs` `[m, k]` and `rhs` `[k, n]` given as (slice, row stride, column
/// stride), `dst` row-major `[m, n]`, run as `how` says.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    dst: &mut [f32],
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    lhs: (&[f32], usize, usize),
    rhs: (&[f32], usize, usize),
    how: Product,
) {
    let (lhs, lhs_rs, lhs_cs) = lhs;
    let (rhs, rhs_rs, rhs_cs) = rhs;
    // The slices must hold every element the strides reach: this is what makes the call sound.
    let reach = |rows: usize, cols: usize, rs: usize, cs: usize| {
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * rs + (cols - 1) * cs + 1
        }
    };
    assert!(dst.len() >= m * n, "matmul: dst too small");
    assert!(
        lhs.len() >= reach(m, k, lhs_rs, lhs_cs),
        "matmul: lhs too small"
    );
    assert!(
        rhs.len() >= reach(k, n, rhs_rs, rhs_cs),
        "matmul: rhs too small"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    if how.bf16 && bf16_gemm::available() {
        let (lhs, rhs) = ((lhs, lhs_rs, lhs_cs), (rhs, rhs_rs, rhs_cs));
        bf16_gemm::matmul(dst, (m, n, k), accumulate, lhs, rhs, how.parallel);
        return;
    }
    let par = if how.parallel {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above bound every index gemm reads or writes.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// Values this many at a time per thread when converting between f32 and half.
const CONVERT_CHUNK: usize = 1 << 14;

/// A Flex tensor's stored values of type `$h` (`f16` or `bf16`), contiguous: a borrowed
/// `Cow` when they already are. (A macro: `as_slice` wants `bytemuck::Pod`, which this crate
/// does not depend on.)
macro_rules! stored {
    ($t:expr, $h:ty) => {{
        let t: &FlexTensor = $t;
        match t.as_slice::<$h>() {
            Some(s) => std::borrow::Cow::Borrowed(s),
            None => std::borrow::Cow::Owned(
                t.to_contiguous()
                    .into_data()
                    .try_into_vec::<$h>()
                    .expect("a contiguous tensor of its own dtype"),
            ),
        }
    }};
}

/// `convert` applied chunk by chunk over `src` into a fresh vector, in parallel. `convert`
/// writes every element of its output chunk, so the vector is not zeroed first (the conversions
/// are memory-bound: a zeroing pass would cost as much).
fn convert_par<S: Sync, D: Send>(
    src: &[S],
    convert: impl Fn(&[S], &mut [std::mem::MaybeUninit<D>]) + Sync,
) -> Vec<D> {
    let mut out: Vec<D> = Vec::with_capacity(src.len());
    out.spare_capacity_mut()[..src.len()]
        .par_chunks_mut(CONVERT_CHUNK)
        .zip(src.par_chunks(CONVERT_CHUNK))
        .for_each(|(o, s)| convert(s, o));
    // SAFETY: the chunks above cover 0..src.len() and `convert` wrote every element of each.
    unsafe { out.set_len(src.len()) };
    out
}

/// A slice conversion of the `half` crate (f16, with F16C where the CPU has it) as a
/// [`convert_par`] chunk conversion: through a small stack buffer into the uninitialised output.
fn staged<S, D: Copy + Default>(
    convert: impl Fn(&[S], &mut [D]) + Sync,
) -> impl Fn(&[S], &mut [std::mem::MaybeUninit<D>]) + Sync {
    const STAGE: usize = 512;
    move |s, o| {
        let mut buf = [D::default(); STAGE];
        for (oc, sc) in o.chunks_mut(STAGE).zip(s.chunks(STAGE)) {
            let b = &mut buf[..sc.len()];
            convert(sc, b);
            for (slot, v) in oc.iter_mut().zip(b.iter()) {
                slot.write(*v);
            }
        }
    }
}

/// bf16 values as f32 (exact: a bf16 is the upper half of an f32; a signalling NaN comes out
/// quiet), `half::bf16::to_f32` bit for bit, vectorised for the CPU (the `half` crate's slice
/// conversion runs 4 values at a time).
fn widen_bf16(src: &[bf16], out: &mut [std::mem::MaybeUninit<f32>]) {
    multiversion!((src: &[bf16], out: &mut [std::mem::MaybeUninit<f32>]) => {
        for (o, s) in out.iter_mut().zip(src) {
            let h = s.to_bits() as u32;
            let quiet = if h & 0x7FFF > 0x7F80 { 0x40 } else { 0 };
            o.write(f32::from_bits((h | quiet) << 16));
        }
    })
}

/// f32 values rounded to bf16 to nearest even, NaN kept quiet: `half::bf16::from_f32` bit for
/// bit, vectorised for the CPU.
fn narrow_bf16(src: &[f32], out: &mut [std::mem::MaybeUninit<bf16>]) {
    multiversion!((src: &[f32], out: &mut [std::mem::MaybeUninit<bf16>]) => {
        for (o, s) in out.iter_mut().zip(src) {
            let x = s.to_bits();
            let bits = if x & 0x7FFF_FFFF > 0x7F80_0000 {
                (x >> 16) | 0x40
            } else {
                (x + 0x7FFF + ((x >> 16) & 1)) >> 16
            };
            o.write(bf16::from_bits(bits as u16));
        }
    })
}

/// The contiguous `f32` values of a Flex tensor: borrowed when it is f32, widened (in parallel)
/// when it is f16 or bf16, so the kernels compute half-precision calls in f32 while the autodiff
/// graph keeps the half tensors; `None` for other dtypes (those keep burn's path).
fn f32_values(t: &FlexTensor) -> Option<std::borrow::Cow<'_, [f32]>> {
    match t.dtype() {
        DType::F32 => match t.as_slice::<f32>() {
            Some(s) => Some(std::borrow::Cow::Borrowed(s)),
            // One copy into a fresh contiguous buffer, then moved out without another.
            None => t
                .to_contiguous()
                .into_data()
                .try_into_vec::<f32>()
                .ok()
                .map(std::borrow::Cow::Owned),
        },
        DType::F16 => {
            use half::slice::HalfFloatSliceExt;
            let convert = staged(|h: &[f16], o: &mut [f32]| h.convert_to_f32_slice(o));
            Some(std::borrow::Cow::Owned(convert_par(
                &stored!(t, f16),
                convert,
            )))
        }
        DType::BF16 => Some(std::borrow::Cow::Owned(convert_par(
            &stored!(t, bf16),
            widen_bf16,
        ))),
        _ => None,
    }
}

/// `lhs · rhs` (`[m, k]·[k, n]`, each given as a tensor with its (row, column) strides) of two
/// bf16 matrices, as a bf16 tensor `[m, n]`; `None` unless both are bf16 and 2-D. The bf16
/// GEMM reads the stored values as they are (no f32 copies); CPUs without AVX512-BF16 widen
/// them and run gemm's f32 kernel.
fn bf16_product(
    (lhs, lhs_rs, lhs_cs): (&FlexTensor, usize, usize),
    (rhs, rhs_rs, rhs_cs): (&FlexTensor, usize, usize),
    (m, n, k): (usize, usize, usize),
) -> Option<FlexTensor> {
    let ok = [lhs, rhs]
        .iter()
        .all(|t| t.dtype() == DType::BF16 && t.shape().num_dims() == 2);
    if !ok {
        return None;
    }
    let mut out = vec![0.0f32; m * n];
    if bf16_gemm::available() {
        let (l, r) = (stored!(lhs, bf16), stored!(rhs, bf16));
        let (l, r) = ((&l[..], lhs_rs, lhs_cs), (&r[..], rhs_rs, rhs_cs));
        bf16_gemm::matmul(&mut out, (m, n, k), false, l, r, true);
    } else {
        let (l, r) = (f32_values(lhs)?, f32_values(rhs)?);
        let how = Product {
            parallel: true,
            bf16: true,
        };
        let (l, r) = ((&l[..], lhs_rs, lhs_cs), (&r[..], rhs_rs, rhs_cs));
        matmul(&mut out, (m, n, k), false, l, r, how);
    }
    Some(flex_tensor_in(out, &[m, n], DType::BF16))
}

/// A convolution weight's values as [`conv::Weights`] wants them: bf16 as stored when the
/// convolution's products run on the bf16 GEMM (no f32 copy), else f32.
enum WeightValues<'a> {
    F32(std::borrow::Cow<'a, [f32]>),
    Bf16(std::borrow::Cow<'a, [bf16]>),
}

impl WeightValues<'_> {
    fn view(&self) -> conv::Weights<'_> {
        match self {
            WeightValues::F32(w) => conv::Weights::F32(w),
            WeightValues::Bf16(w) => conv::Weights::Bf16(w),
        }
    }
}

fn weight_values<'a>(g: &Conv2dGeom, weight: &'a FlexTensor) -> Option<WeightValues<'a>> {
    if g.bf16 && bf16_gemm::available() {
        Some(WeightValues::Bf16(stored!(weight, bf16)))
    } else {
        Some(WeightValues::F32(f32_values(weight)?))
    }
}

fn narrow_f16(values: &[f32]) -> Vec<f16> {
    use half::slice::HalfFloatSliceExt;
    convert_par(
        values,
        staged(|v: &[f32], h: &mut [f16]| h.convert_from_f32_slice(v)),
    )
}

fn flex_tensor(values: Vec<f32>, shape: &[usize]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape.to_vec()))
}

/// A kernel's f32 result as a Flex tensor of `dtype` (the dtype of the input it answers for),
/// rounded in parallel when that is half.
fn flex_tensor_in(values: Vec<f32>, shape: &[usize], dtype: DType) -> FlexTensor {
    let shape = shape.to_vec();
    match dtype {
        DType::F16 => FlexTensor::from_data(TensorData::new(narrow_f16(&values), shape)),
        DType::BF16 => {
            FlexTensor::from_data(TensorData::new(convert_par(&values, narrow_bf16), shape))
        }
        _ => FlexTensor::from_data(TensorData::new(values, shape)),
    }
}

fn geometry(
    x: &FlexTensor,
    weight: &FlexTensor,
    stride: usize,
    padding: usize,
) -> Option<Conv2dGeom> {
    let (xs, ws) = (x.shape(), weight.shape());
    let ok = xs.num_dims() == 4
        && ws.num_dims() == 4
        && ws[1] == xs[1]
        && ws[2] == ws[3]
        && stride > 0
        && xs[2] + 2 * padding >= ws[2]
        && xs[3] + 2 * padding >= ws[2];
    ok.then(|| Conv2dGeom {
        batch: xs[0],
        cin: xs[1],
        h: xs[2],
        w: xs[3],
        cout: ws[0],
        k: ws[2],
        stride,
        pad: padding,
        bf16: both_bf16(x, weight),
    })
}

/// Whether a convolution's input and weight are both bf16 (its products then run on the bf16
/// kernel; see [`Product::bf16`]).
fn both_bf16(x: &FlexTensor, weight: &FlexTensor) -> bool {
    x.dtype() == DType::BF16 && weight.dtype() == DType::BF16
}

/// The convolution whose input gradient a transposed convolution of `x` by `weight` is: its
/// input has the transposed convolution's output shape, its output `x`'s shape.
fn transpose_geometry(
    x: &FlexTensor,
    weight: &FlexTensor,
    stride: usize,
    padding: usize,
) -> Option<Conv2dGeom> {
    let (xs, ws) = (x.shape(), weight.shape());
    if xs.num_dims() != 4 || ws.num_dims() != 4 || ws[0] != xs[1] || ws[2] != ws[3] || stride == 0 {
        return None;
    }
    let k = ws[2];
    let out = |n: usize| ((n.max(1) - 1) * stride + k).checked_sub(2 * padding);
    let g = Conv2dGeom {
        batch: xs[0],
        cin: ws[1],
        h: out(xs[2])?,
        w: out(xs[3])?,
        cout: ws[0],
        k,
        stride,
        pad: padding,
        bf16: both_bf16(x, weight),
    };
    let ok = xs[2] > 0 && xs[3] > 0 && g.h + 2 * padding >= k && g.w + 2 * padding >= k;
    (ok && g.out_h() == xs[2] && g.out_w() == xs[3]).then_some(g)
}

/// `Σ_b Σ_p v[b, c, p]` per channel, images in order.
fn channel_sums(v: &[f32], batch: usize, channels: usize) -> Vec<f32> {
    let spatial = v.len() / (batch * channels).max(1);
    let mut out = vec![0.0f32; channels];
    for image in v.chunks(channels * spatial.max(1)) {
        for (o, plane) in out.iter_mut().zip(image.chunks(spatial.max(1))) {
            *o += plane.iter().sum::<f32>();
        }
    }
    out
}

fn flex_conv2d(
    x: FlexTensor,
    weight: FlexTensor,
    bias: Option<FlexTensor>,
    stride: usize,
    padding: usize,
) -> FlexTensor {
    let fast = geometry(&x, &weight, stride, padding).and_then(|g| {
        let (xv, wv) = (f32_values(&x)?, weight_values(&g, &weight)?);
        let bv = match &bias {
            Some(b) => Some(f32_values(b)?),
            None => None,
        };
        let y = conv::forward_with(&g, &xv, wv.view(), bv.as_deref());
        let shape = [g.batch, g.cout, g.out_h(), g.out_w()];
        Some(flex_tensor_in(y, &shape, x.dtype()))
    });
    fast.unwrap_or_else(|| Flex::conv2d(x, weight, bias, conv_options(stride, padding)))
}

fn norm_geometry(x: &FlexTensor, weight: &FlexTensor, groups: usize, eps: f64) -> Option<NormGeom> {
    let (xs, ws) = (x.shape(), weight.shape());
    let ok = xs.num_dims() == 3 && ws.num_elements() == xs[1] && groups > 0 && xs[1] % groups == 0;
    ok.then(|| NormGeom {
        batch: xs[0],
        channels: xs[1],
        spatial: xs[2],
        groups,
        eps,
    })
}

impl TrainOps for Flex {
    fn conv_transpose2d_bias_train(
        x: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        stride: usize,
        padding: usize,
    ) -> FlexTensor {
        let fast = transpose_geometry(&x, &weight, stride, padding).and_then(|g| {
            let (xv, wv, bv) = (f32_values(&x)?, f32_values(&weight)?, f32_values(&bias)?);
            // A transposed convolution is the input gradient of the convolution `g` (whose
            // weight `[cout_g, cin_g, k, k]` is exactly this weight) applied to `x`.
            let mut y = conv::input_grad(&g, &wv, &xv);
            let plane = g.h * g.w;
            y.par_chunks_mut(plane.max(1))
                .enumerate()
                .for_each(|(i, p)| p.iter_mut().for_each(|v| *v += bv[i % g.cin]));
            Some(flex_tensor_in(y, &[g.batch, g.cin, g.h, g.w], x.dtype()))
        });
        fast.unwrap_or_else(|| {
            Flex::conv_transpose2d(x, weight, Some(bias), transpose_options(stride, padding))
        })
    }

    fn conv_transpose2d_grads(
        x: FlexTensor,
        weight: FlexTensor,
        grad: FlexTensor,
        stride: usize,
        padding: usize,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let fast = transpose_geometry(&x, &weight, stride, padding).and_then(|g| {
            let (xv, wv, gv) = (f32_values(&x)?, f32_values(&weight)?, f32_values(&grad)?);
            // With `g` as above: dx is `g`'s forward of the output gradient, and dweight is
            // `g`'s weight gradient with the output gradient as its input and `x` as its
            // output gradient.
            let dx = conv::forward(&g, &gv, &wv, None);
            let (dw, _) = conv::weight_grad(&g, &gv, &xv, false);
            let db = channel_sums(&gv, g.batch, g.cin);
            Some((
                flex_tensor_in(dx, &[g.batch, g.cout, g.out_h(), g.out_w()], x.dtype()),
                flex_tensor_in(dw, &[g.cout, g.cin, g.k, g.k], weight.dtype()),
                flex_tensor_in(db, &[g.cin], weight.dtype()),
            ))
        });
        fast.unwrap_or_else(|| {
            composed_conv_transpose2d_grads::<Self>(x, weight, grad, stride, padding)
        })
    }

    fn conv2d_train(
        x: FlexTensor,
        weight: FlexTensor,
        stride: usize,
        padding: usize,
    ) -> FlexTensor {
        flex_conv2d(x, weight, None, stride, padding)
    }

    fn conv2d_bias_train(
        x: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        stride: usize,
        padding: usize,
    ) -> FlexTensor {
        flex_conv2d(x, weight, Some(bias), stride, padding)
    }

    fn conv2d_input_grad(
        x: FlexTensor,
        weight: FlexTensor,
        grad: FlexTensor,
        stride: usize,
        padding: usize,
    ) -> FlexTensor {
        let fast = geometry(&x, &weight, stride, padding).and_then(|g| {
            let wv = weight_values(&g, &weight)?;
            let dx = conv::input_grad_with(&g, wv.view(), &f32_values(&grad)?);
            Some(flex_tensor_in(dx, &[g.batch, g.cin, g.h, g.w], x.dtype()))
        });
        fast.unwrap_or_else(|| {
            Self::conv2d_x_backward(x, weight, grad, conv_options(stride, padding))
        })
    }

    fn conv2d_param_grads(
        x: FlexTensor,
        weight: FlexTensor,
        grad: FlexTensor,
        stride: usize,
        padding: usize,
    ) -> (FlexTensor, FlexTensor) {
        let fast = geometry(&x, &weight, stride, padding).and_then(|g| {
            let (dw, db) = conv::weight_grad(&g, &f32_values(&x)?, &f32_values(&grad)?, true);
            Some((
                flex_tensor_in(dw, &[g.cout, g.cin, g.k, g.k], weight.dtype()),
                flex_tensor_in(db, &[g.cout], weight.dtype()),
            ))
        });
        fast.unwrap_or_else(|| {
            composed_conv2d_param_grads::<Self>(x, weight, grad, stride, padding)
        })
    }

    fn group_norm_train(
        x: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        groups: usize,
        eps: f64,
    ) -> FlexTensor {
        let fast = norm_geometry(&x, &weight, groups, eps).and_then(|g| {
            let y = norm::forward(
                &g,
                &f32_values(&x)?,
                &f32_values(&weight)?,
                &f32_values(&bias)?,
            );
            Some(flex_tensor_in(y, x.shape().as_slice(), x.dtype()))
        });
        fast.unwrap_or_else(|| composed_group_norm::<Self>(x, weight, bias, groups, eps))
    }

    fn group_norm_grads(
        x: FlexTensor,
        weight: FlexTensor,
        grad: FlexTensor,
        groups: usize,
        eps: f64,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let g = norm_geometry(&x, &weight, groups, eps);
        let values =
            g.and_then(|g| Some((g, f32_values(&x)?, f32_values(&weight)?, f32_values(&grad)?)));
        match values {
            Some((g, xv, wv, gv)) => {
                let (dx, dw, db) = norm::backward(&g, &xv, &wv, &gv);
                let c = [g.channels];
                (
                    flex_tensor_in(dx, x.shape().as_slice(), x.dtype()),
                    flex_tensor_in(dw, &c, weight.dtype()),
                    flex_tensor_in(db, &c, weight.dtype()),
                )
            }
            None => panic!(
                "group_norm_grads: unsupported input {:?} / {:?}",
                x.shape(),
                weight.shape()
            ),
        }
    }

    fn softmax_last_train(x: FlexTensor) -> FlexTensor {
        let shape = x.shape();
        let len = shape[shape.num_dims() - 1];
        match f32_values(&x) {
            Some(v) if len > 0 => {
                flex_tensor_in(act::softmax(&v, len), shape.as_slice(), x.dtype())
            }
            _ => composed_softmax::<Self>(x),
        }
    }

    fn softmax_last_grad(y: FlexTensor, grad: FlexTensor) -> FlexTensor {
        let shape = y.shape();
        let len = shape[shape.num_dims() - 1];
        match (f32_values(&y), f32_values(&grad)) {
            (Some(yv), Some(gv)) if len > 0 => flex_tensor_in(
                act::softmax_grad(&yv, &gv, len),
                shape.as_slice(),
                y.dtype(),
            ),
            _ => composed_softmax_grad::<Self>(y, grad),
        }
    }

    fn silu_train(x: FlexTensor) -> FlexTensor {
        match f32_values(&x) {
            Some(v) => flex_tensor_in(act::silu(&v), x.shape().as_slice(), x.dtype()),
            None => composed_silu::<Self>(x),
        }
    }

    fn silu_input_grad(x: FlexTensor, grad: FlexTensor) -> FlexTensor {
        match (f32_values(&x), f32_values(&grad)) {
            (Some(xv), Some(gv)) => {
                flex_tensor_in(act::silu_grad(&xv, &gv), x.shape().as_slice(), x.dtype())
            }
            _ => composed_silu_grad::<Self>(x, grad),
        }
    }

    fn gelu_train(x: FlexTensor) -> FlexTensor {
        match f32_values(&x) {
            Some(v) => flex_tensor_in(act::gelu(&v), x.shape().as_slice(), x.dtype()),
            None => Self::gelu(x),
        }
    }

    fn gelu_input_grad(x: FlexTensor, grad: FlexTensor) -> FlexTensor {
        match (f32_values(&x), f32_values(&grad)) {
            (Some(xv), Some(gv)) => {
                flex_tensor_in(act::gelu_grad(&xv, &gv), x.shape().as_slice(), x.dtype())
            }
            _ => Self::gelu_backward(x, grad),
        }
    }

    fn geglu_train(h: FlexTensor) -> FlexTensor {
        let mut shape = h.shape().as_slice().to_vec();
        let inner = shape[shape.len() - 1] / 2;
        match f32_values(&h) {
            Some(v) if inner > 0 => {
                *shape.last_mut().expect("a last axis") = inner;
                flex_tensor_in(act::geglu(&v, inner), &shape, h.dtype())
            }
            _ => composed_geglu::<Self>(h),
        }
    }

    fn geglu_input_grad(h: FlexTensor, grad: FlexTensor) -> FlexTensor {
        let shape = h.shape();
        let inner = shape[shape.num_dims() - 1] / 2;
        match (f32_values(&h), f32_values(&grad)) {
            (Some(hv), Some(gv)) if inner > 0 => flex_tensor_in(
                act::geglu_grad(&hv, &gv, inner),
                shape.as_slice(),
                h.dtype(),
            ),
            _ => composed_geglu_grad::<Self>(h, grad),
        }
    }

    fn linear_train(x: FlexTensor, w: FlexTensor) -> FlexTensor {
        let (xs, ws) = (x.shape(), w.shape());
        let (rows, inner, out) = (xs[0], xs[1], ws[0]);
        // y = x wᵀ
        bf16_product((&x, inner, 1), (&w, 1, inner), (rows, out, inner))
            .unwrap_or_else(|| Flex::float_matmul(x, Flex::float_transpose(w)))
    }

    fn linear_input_grad(w: FlexTensor, grad: FlexTensor) -> FlexTensor {
        let (ws, gs) = (w.shape(), grad.shape());
        let (rows, inner, out) = (gs[0], ws[1], ws[0]);
        // dx = dy w
        bf16_product((&grad, out, 1), (&w, inner, 1), (rows, inner, out))
            .unwrap_or_else(|| Flex::float_matmul(grad, w))
    }

    fn linear_weight_grad(x: FlexTensor, grad: FlexTensor) -> FlexTensor {
        let (xs, gs) = (x.shape(), grad.shape());
        let (rows, inner, out) = (xs[0], xs[1], gs[1]);
        // dw = dyᵀ x
        bf16_product((&grad, 1, out), (&x, inner, 1), (out, inner, rows))
            .unwrap_or_else(|| Flex::float_matmul(Flex::float_transpose(grad), x))
    }

    fn attention_lse(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        scale: f64,
    ) -> (FlexTensor, FlexTensor) {
        let g = attention_geometry(&q, &k, &v);
        let fast = g.and_then(|g| {
            let (qv, kv, vv) = (f32_values(&q)?, f32_values(&k)?, f32_values(&v)?);
            let (o, lse) = attention::forward(&g, &qv, &kv, &vv, scale as f32);
            // The log-sum-exp is kept in f32 for the backward pass whatever the inputs are.
            Some((
                flex_tensor_in(o, &[g.heads, g.n, g.d], q.dtype()),
                flex_tensor(lse, &[g.heads, g.n]),
            ))
        });
        fast.unwrap_or_else(|| composed_attention_lse::<Self>(q, k, v, scale))
    }

    fn attention_grads(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        o: FlexTensor,
        lse: FlexTensor,
        grad: FlexTensor,
        scale: f64,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let g = attention_geometry(&q, &k, &v);
        let fast = g.and_then(|g| {
            let (qv, kv, vv) = (f32_values(&q)?, f32_values(&k)?, f32_values(&v)?);
            let (ov, lv, gv) = (f32_values(&o)?, f32_values(&lse)?, f32_values(&grad)?);
            let (dq, dk, dv) = attention::backward(&g, &qv, &kv, &vv, &ov, &lv, &gv, scale as f32);
            Some((
                flex_tensor_in(dq, &[g.heads, g.n, g.d], q.dtype()),
                flex_tensor_in(dk, &[g.heads, g.m, g.d], k.dtype()),
                flex_tensor_in(dv, &[g.heads, g.m, g.d], v.dtype()),
            ))
        });
        fast.unwrap_or_else(|| composed_attention_grads::<Self>(q, k, v, o, lse, grad, scale))
    }
}

fn attention_geometry(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
) -> Option<attention::AttnGeom> {
    let (qs, ks, vs) = (q.shape(), k.shape(), v.shape());
    let ok = qs.num_dims() == 3
        && ks.num_dims() == 3
        && ks.as_slice() == vs.as_slice()
        && qs[0] == ks[0]
        && qs[2] == ks[2]
        && ks[1] > 0;
    ok.then(|| attention::AttnGeom {
        heads: qs[0],
        n: qs[1],
        m: ks[1],
        d: qs[2],
        bf16: [q, k, v].iter().all(|t| t.dtype() == DType::BF16),
    })
}

#[cfg(feature = "cuda")]
impl TrainOps for burn::backend::Cube {}

// ---------------------------------------------------------------------------------------------
// Autodiff: one graph node per operation, its backward through the inner backend's kernels.

/// Backward step of a convolution with `N` parents: `x`, `weight` and, when `N == 3`, `bias`.
#[derive(Debug)]
struct Conv2dBackward<const N: usize>;

impl<B: Backend + TrainOps, const N: usize> Backward<B, N> for Conv2dBackward<N> {
    /// Checkpointed `x` and `weight`, (stride, padding).
    type State = (NodeId, NodeId, (usize, usize));

    fn backward(
        self,
        ops: Ops<Self::State, N>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let (x_id, w_id, (stride, padding)) = ops.state;
        let x = checkpointer.retrieve_node_output::<FloatTensor<B>>(x_id);
        let weight = checkpointer.retrieve_node_output::<FloatTensor<B>>(w_id);
        let node_bias = if N == 3 { ops.parents[2].clone() } else { None };
        if let Some(node) = &ops.parents[0] {
            let dx = B::conv2d_input_grad(x.clone(), weight.clone(), grad.clone(), stride, padding);
            grads.register::<B>(node.id, dx);
        }
        if ops.parents[1].is_some() || node_bias.is_some() {
            let (dw, db) = B::conv2d_param_grads(x, weight, grad, stride, padding);
            if let Some(node) = &ops.parents[1] {
                grads.register::<B>(node.id, dw);
            }
            if let Some(node) = node_bias {
                grads.register::<B>(node.id, db);
            }
        }
    }
}

/// The three gradients of an operation on `(x, weight, bias)` from the checkpointed `x` and
/// `weight`, the output gradient and the operation's parameters.
type XwbGrads<B, P> = fn(FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, P) -> [FloatTensor<B>; 3];

/// Backward step of such an operation (group norm, transposed convolution): all three gradients
/// from one [`XwbGrads`] call.
struct XwbBackward<B: Backend, P>(XwbGrads<B, P>);

impl<B: Backend, P> std::fmt::Debug for XwbBackward<B, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("XwbBackward")
    }
}

impl<B, P> Backward<B, 3> for XwbBackward<B, P>
where
    B: Backend + TrainOps,
    P: Clone + Send + std::fmt::Debug + 'static,
{
    type State = (NodeId, NodeId, P);

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let (x_id, w_id, params) = ops.state;
        let x = checkpointer.retrieve_node_output::<FloatTensor<B>>(x_id);
        let weight = checkpointer.retrieve_node_output::<FloatTensor<B>>(w_id);
        for (parent, g) in ops.parents.iter().zip((self.0)(x, weight, grad, params)) {
            if let Some(node) = parent {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

/// `(x, weight, bias)` of one operation.
type Xwb<B> = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

/// Records `forward(x, weight, bias)` on the autodiff graph with `op` as its backward step, `x`
/// and `weight` checkpointed and `params` kept.
fn record_xwb<B, C, O, P>(
    op: O,
    (x, weight, bias): Xwb<Autodiff<B, C>>,
    params: P,
    forward: impl FnOnce(FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) -> FloatTensor<B>,
) -> FloatTensor<Autodiff<B, C>>
where
    B: Backend + TrainOps,
    C: CheckpointStrategy,
    O: Backward<B, 3, State = (NodeId, NodeId, P)>,
    P: Clone + Send + std::fmt::Debug + 'static,
{
    match op
        .prepare::<C>([x.node(), weight.node(), bias.node()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let state = (prep.checkpoint(&x), prep.checkpoint(&weight), params);
            prep.finish(
                state,
                forward(
                    x.into_primitive(),
                    weight.into_primitive(),
                    bias.into_primitive(),
                ),
            )
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(
            x.into_primitive(),
            weight.into_primitive(),
            bias.into_primitive(),
        )),
    }
}

/// Backward step of a softmax: its output, kept as state (the gradient needs `y`, not `x`).
#[derive(Debug)]
struct SoftmaxBackward;

impl<B: Backend + TrainOps> Backward<B, 1> for SoftmaxBackward {
    type State = FloatTensor<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        if let Some(node) = &ops.parents[0] {
            grads.register::<B>(node.id, B::softmax_last_grad(ops.state, grad));
        }
    }
}

/// Backward step of a linear layer's product: the checkpointed `x` and `w`; each gradient is
/// computed only when its input is tracked (a frozen weight's never is).
#[derive(Debug)]
struct LinearBackward;

impl<B: Backend + TrainOps> Backward<B, 2> for LinearBackward {
    type State = (NodeId, NodeId);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let (x_id, w_id) = ops.state;
        let x = checkpointer.retrieve_node_output::<FloatTensor<B>>(x_id);
        let w = checkpointer.retrieve_node_output::<FloatTensor<B>>(w_id);
        if let Some(node) = &ops.parents[0] {
            grads.register::<B>(node.id, B::linear_input_grad(w, grad.clone()));
        }
        if let Some(node) = &ops.parents[1] {
            grads.register::<B>(node.id, B::linear_weight_grad(x, grad));
        }
    }
}

/// Backward step of attention: the inputs, the output and the rows' log-sum-exp (not the
/// probabilities, which the backward recomputes block by block).
#[derive(Debug)]
struct AttentionBackward;

impl<B: Backend + TrainOps> Backward<B, 3> for AttentionBackward {
    #[allow(clippy::type_complexity)]
    type State = (
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        f64,
    );

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let (q, k, v, o, lse, scale) = ops.state;
        let (dq, dk, dv) = B::attention_grads(q, k, v, o, lse, grad, scale);
        for (parent, g) in ops.parents.iter().zip([dq, dk, dv]) {
            if let Some(node) = parent {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

/// An element-wise operation's input gradient from its input and the output gradient.
type PointwiseGrad<B> = fn(FloatTensor<B>, FloatTensor<B>) -> FloatTensor<B>;

/// Backward step of an operation on one input (SiLU, GELU, GEGLU): the checkpointed input and
/// the output gradient through its [`PointwiseGrad`].
struct PointwiseBackward<B: Backend>(PointwiseGrad<B>);

impl<B: Backend> std::fmt::Debug for PointwiseBackward<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PointwiseBackward")
    }
}

impl<B: Backend + TrainOps> Backward<B, 1> for PointwiseBackward<B> {
    type State = NodeId;

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let x = checkpointer.retrieve_node_output::<FloatTensor<B>>(ops.state);
        if let Some(node) = &ops.parents[0] {
            grads.register::<B>(node.id, (self.0)(x, grad));
        }
    }
}

/// Records `forward(x)` on the autodiff graph with `x` checkpointed and `grad` as its backward.
fn record_pointwise<B: Backend + TrainOps, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    forward: fn(FloatTensor<B>) -> FloatTensor<B>,
    grad: PointwiseGrad<B>,
) -> FloatTensor<Autodiff<B, C>> {
    match PointwiseBackward(grad)
        .prepare::<C>([x.node()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let state = prep.checkpoint(&x);
            prep.finish(state, forward(x.into_primitive()))
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(x.into_primitive())),
    }
}

impl<B: Backend + TrainOps, C: CheckpointStrategy> TrainOps for Autodiff<B, C> {
    fn conv_transpose2d_bias_train(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        let grads: XwbGrads<B, (usize, usize)> = |x, w, g, (stride, padding)| {
            let (dx, dw, db) = B::conv_transpose2d_grads(x, w, g, stride, padding);
            [dx, dw, db]
        };
        record_xwb::<B, C, _, _>(
            XwbBackward(grads),
            (x, weight, bias),
            (stride, padding),
            |x, w, b| B::conv_transpose2d_bias_train(x, w, b, stride, padding),
        )
    }

    fn conv2d_train(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        let forward = |x, w| B::conv2d_train(x, w, stride, padding);
        match Conv2dBackward::<2>
            .prepare::<C>([x.node(), weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let state = (
                    prep.checkpoint(&x),
                    prep.checkpoint(&weight),
                    (stride, padding),
                );
                prep.finish(state, forward(x.into_primitive(), weight.into_primitive()))
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(forward(x.into_primitive(), weight.into_primitive()))
            }
        }
    }

    fn conv2d_bias_train(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        record_xwb::<B, C, _, _>(
            Conv2dBackward::<3>,
            (x, weight, bias),
            (stride, padding),
            |x, w, b| B::conv2d_bias_train(x, w, b, stride, padding),
        )
    }

    fn group_norm_train(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        groups: usize,
        eps: f64,
    ) -> FloatTensor<Self> {
        let grads: XwbGrads<B, (usize, f64)> = |x, w, g, (groups, eps)| {
            let (dx, dw, db) = B::group_norm_grads(x, w, g, groups, eps);
            [dx, dw, db]
        };
        record_xwb::<B, C, _, _>(
            XwbBackward(grads),
            (x, weight, bias),
            (groups, eps),
            |x, w, b| B::group_norm_train(x, w, b, groups, eps),
        )
    }

    fn softmax_last_train(x: FloatTensor<Self>) -> FloatTensor<Self> {
        match SoftmaxBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = B::softmax_last_train(x.into_primitive());
                prep.finish(y.clone(), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::softmax_last_train(x.into_primitive())),
        }
    }

    fn attention_train(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        match AttentionBackward
            .prepare::<C>([q.node(), k.node(), v.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (q, k, v) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
                let (o, lse) = B::attention_lse(q.clone(), k.clone(), v.clone(), scale);
                prep.finish((q, k, v, o.clone(), lse, scale), o)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::attention_train(
                q.into_primitive(),
                k.into_primitive(),
                v.into_primitive(),
                scale,
            )),
        }
    }

    fn linear_train(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        match LinearBackward
            .prepare::<C>([x.node(), w.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let state = (prep.checkpoint(&x), prep.checkpoint(&w));
                prep.finish(
                    state,
                    B::linear_train(x.into_primitive(), w.into_primitive()),
                )
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::linear_train(x.into_primitive(), w.into_primitive()))
            }
        }
    }

    fn silu_train(x: FloatTensor<Self>) -> FloatTensor<Self> {
        record_pointwise::<B, C>(x, B::silu_train, B::silu_input_grad)
    }

    fn gelu_train(x: FloatTensor<Self>) -> FloatTensor<Self> {
        record_pointwise::<B, C>(x, B::gelu_train, B::gelu_input_grad)
    }

    fn geglu_train(h: FloatTensor<Self>) -> FloatTensor<Self> {
        record_pointwise::<B, C>(h, B::geglu_train, B::geglu_input_grad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    fn device() -> Device {
        Device::flex().autodiff()
    }

    /// Every public kernel called with bf16 or f16 tensors (mixed precision's activations, here
    /// with half weights too): no panic, results and gradients in the caller's dtype, close to
    /// the f32 call's.
    #[test]
    fn half_precision_calls_compute_in_f32_and_answer_in_their_dtype() {
        let d = device();
        let dist = Distribution::Normal(0.0, 1.0);
        let x4 = Tensor::<4>::random([2, 8, 6, 6], dist, &d);
        let w4 = Tensor::<4>::random([8, 8, 3, 3], dist, &d).mul_scalar(0.2);
        let b1 = Tensor::<1>::random([8], dist, &d);
        let x3 = Tensor::<3>::random([2, 9, 8], dist, &d);
        // Each case: the output of `f` on the inputs, and the gradient of its weighted sum.
        type Case = fn(Vec<Tensor<4>>) -> Tensor<4>;
        let cases: Vec<(&str, Vec<Tensor<4>>, Case)> = vec![
            (
                "conv2d",
                vec![x4.clone(), w4.clone(), b1.clone().reshape([1, 1, 1, 8])],
                |t| {
                    conv2d(
                        t[0].clone(),
                        t[1].clone(),
                        Some(t[2].clone().reshape([8])),
                        1,
                        1,
                    )
                },
            ),
            (
                "conv_transpose2d",
                vec![x4.clone(), w4.clone(), b1.clone().reshape([1, 1, 1, 8])],
                |t| conv_transpose2d(t[0].clone(), t[1].clone(), t[2].clone().reshape([8]), 2, 1),
            ),
            (
                "group_norm",
                vec![
                    x4.clone(),
                    b1.clone().reshape([1, 1, 1, 8]),
                    b1.clone().reshape([1, 1, 1, 8]),
                ],
                |t| {
                    group_norm(
                        t[0].clone(),
                        t[1].clone().reshape([8]),
                        t[2].clone().reshape([8]),
                        4,
                        1e-5,
                    )
                },
            ),
            (
                "layer_norm",
                vec![
                    x3.clone().unsqueeze(),
                    b1.clone().reshape([1, 1, 1, 8]),
                    b1.clone().reshape([1, 1, 1, 8]),
                ],
                |t| {
                    let x: Tensor<3> = t[0].clone().squeeze_dim(0);
                    layer_norm::<3, 1>(
                        x,
                        t[1].clone().reshape([8]),
                        t[2].clone().reshape([8]),
                        1e-5,
                    )
                    .unsqueeze()
                },
            ),
            (
                "attention",
                vec![
                    x3.clone().unsqueeze(),
                    x3.clone().unsqueeze().mul_scalar(0.5),
                    x3.clone().unsqueeze(),
                ],
                |t| {
                    let [q, k, v] = [0, 1, 2].map(|i| t[i].clone().squeeze_dim::<3>(0));
                    scaled_dot_product_attention(q, k, v).unsqueeze()
                },
            ),
            ("silu", vec![x4.clone()], |t| silu(t[0].clone())),
            ("gelu", vec![x4.clone()], |t| gelu(t[0].clone())),
            ("geglu", vec![x4.clone()], |t| geglu(t[0].clone())),
            ("softmax_last", vec![x4.clone()], |t| {
                softmax_last(t[0].clone())
            }),
        ];
        for (name, inputs, f) in cases {
            let run = |dtype: DType| {
                let leaves: Vec<Tensor<4>> = inputs
                    .iter()
                    .map(|t| t.clone().cast(dtype).detach().require_grad())
                    .collect();
                let y = f(leaves.clone());
                assert_eq!(y.dtype(), dtype, "{name}: output dtype");
                let weights = y.clone().cast(DType::F32).sin().detach().cast(dtype);
                let grads = (y.clone() * weights).sum().backward();
                let mut out = vec![y.cast(DType::F32).into_data()];
                for leaf in &leaves {
                    let g = leaf
                        .grad(&grads)
                        .unwrap_or_else(|| panic!("{name}: no gradient"));
                    assert_eq!(g.dtype(), dtype, "{name}: gradient dtype");
                    out.push(g.cast(DType::F32).into_data());
                }
                out
            };
            let reference = run(DType::F32);
            for (dtype, tol) in [(DType::BF16, 0.1), (DType::F16, 0.02)] {
                for (k, (a, b)) in run(dtype).iter().zip(&reference).enumerate() {
                    let (a, b) = (
                        a.try_to_vec::<f32>().unwrap(),
                        b.try_to_vec::<f32>().unwrap(),
                    );
                    let scale = b.iter().fold(1.0f32, |m, v| m.max(v.abs()));
                    let err = a
                        .iter()
                        .zip(&b)
                        .map(|(x, y)| (x - y).abs())
                        .fold(0.0, f32::max)
                        / scale;
                    assert!(
                        err < tol,
                        "{name} {dtype:?} output/gradient {k}: relative error {err}"
                    );
                }
            }
        }
    }

    /// The vectorised bf16 conversions give the `half` crate's results bit for bit: every bf16
    /// widened, and f32 values rounded (ties, carries into the exponent, infinities, NaNs with
    /// and without payload, denormals, and a sweep of the bit patterns).
    #[test]
    fn bf16_conversions_match_the_half_crate() {
        let all: Vec<bf16> = (0..=u16::MAX).map(bf16::from_bits).collect();
        let wide = convert_par(&all, widen_bf16);
        for (h, w) in all.iter().zip(&wide) {
            assert_eq!(w.to_bits(), h.to_f32().to_bits(), "{:#06x}", h.to_bits());
        }
        let mut bits: Vec<u32> = vec![
            0x3F80_8000, // 1 + 2^-8: a tie, to even (down)
            0x3F81_8000, // a tie, to even (up)
            0x3F80_8001,
            0x7F7F_FFFF, // f32::MAX: rounds to infinity
            0x7F80_0000,
            0xFF80_0000,
            0x7FC0_0000,
            0x7F80_0001, // signalling NaN: kept a NaN
            0xFFFF_FFFF,
            0x0000_0001, // denormals
            0x807F_FFFF,
        ];
        bits.extend((0..1u64 << 32).step_by(65_521).map(|b| b as u32));
        let values: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
        let narrow = convert_par(&values, narrow_bf16);
        for (v, n) in values.iter().zip(&narrow) {
            assert_eq!(
                n.to_bits(),
                bf16::from_f32(*v).to_bits(),
                "{:#010x}",
                v.to_bits()
            );
        }
    }

    /// The products that run on the bf16 GEMM under bf16 mixed precision (convolutions on the
    /// Winograd, column and pointwise paths, forward and both gradients; linear layers) against
    /// f32 on the same bf16 values: within a few bf16 roundings of the result (the output and
    /// gradients are rounded to bf16 once, 2^-9 relative; Winograd's transformed tiles once
    /// more). Measured: 0.2-0.3% of the largest value, Winograd 0.4-0.6%.
    #[test]
    fn bf16_products_match_f32_on_the_same_values() {
        let d = device();
        let dist = Distribution::Normal(0.0, 1.0);
        let bf16_values = |t: Tensor<4>| t.cast(DType::BF16).cast(DType::F32);
        // (x, weight, stride, padding): Winograd (64 channels, 8x8, 1024 output pixels, bf16's
        // least; then 68 output channels, a partial block of the packed transformed weight), the
        // same 3x3 convolution on fewer pixels (columns), a strided convolution (columns), a
        // pointwise one, and a linear layer as a 1x1 map.
        let cases = [
            ([16, 64, 8, 8], [64, 64, 3, 3], 1, 1),
            ([16, 72, 8, 8], [68, 72, 3, 3], 1, 1),
            ([4, 64, 8, 8], [64, 64, 3, 3], 1, 1),
            ([1, 16, 9, 9], [24, 16, 3, 3], 2, 1),
            ([2, 32, 6, 6], [48, 32, 1, 1], 1, 0),
            ([1, 1, 70, 96], [40, 96, 1, 1], 0, 0),
        ];
        for (xs, ws, stride, padding) in cases {
            let fan_in = (ws[1] * ws[2] * ws[3]) as f64;
            let x = bf16_values(Tensor::<4>::random(xs, dist, &d));
            let w = bf16_values(Tensor::<4>::random(ws, dist, &d).div_scalar(fan_in.sqrt()));
            let run = |dtype: DType| {
                let (x, w) = (
                    x.clone().cast(dtype).require_grad(),
                    w.clone().cast(dtype).require_grad(),
                );
                let y: Tensor<4> = if stride == 0 {
                    let [_, _, rows, inner] = xs;
                    let w2 = w.clone().reshape([ws[0], inner]);
                    linear(x.clone().reshape([rows, inner]), w2).reshape([1, 1, rows, ws[0]])
                } else {
                    conv2d(x.clone(), w.clone(), None, stride, padding)
                };
                assert_eq!(y.dtype(), dtype);
                let weights = y.clone().cast(DType::F32).sin().detach().cast(dtype);
                let grads = (y.clone() * weights).sum().backward();
                [y, x.grad(&grads).unwrap(), w.grad(&grads).unwrap()]
                    .map(|t| t.cast(DType::F32).into_data().try_to_vec::<f32>().unwrap())
            };
            let what = format!("{xs:?} {ws:?}");
            within_a_percent(&run(DType::BF16), &run(DType::F32), &what);
        }
        // Attention: every product of the forward and backward, over two blocks of queries.
        let [q, k, v] = [[2, 70, 40], [2, 90, 40], [2, 90, 40]]
            .map(|s| bf16_values(Tensor::<4>::random([1, s[0], s[1], s[2]], dist, &d)));
        let run = |dtype: DType| {
            let leaves = [&q, &k, &v].map(|t| t.clone().cast(dtype).require_grad());
            let [q, k, v] = leaves.clone().map(|t| t.squeeze_dim::<3>(0));
            let y = scaled_dot_product_attention(q, k, v);
            let weights = y.clone().cast(DType::F32).sin().detach().cast(dtype);
            let grads = (y.clone() * weights).sum().backward();
            let mut out = vec![y.cast(DType::F32).into_data()];
            out.extend(leaves.map(|t| t.grad(&grads).unwrap().cast(DType::F32).into_data()));
            out.into_iter()
                .map(|t| t.try_to_vec::<f32>().unwrap())
                .collect::<Vec<_>>()
        };
        within_a_percent(&run(DType::BF16), &run(DType::F32), "attention");
    }

    /// Each of `got` within 1% of the largest magnitude of the same result in `want`.
    fn within_a_percent(got: &[Vec<f32>], want: &[Vec<f32>], what: &str) {
        for (k, (a, b)) in got.iter().zip(want).enumerate() {
            let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let err = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max);
            assert!(err <= 1e-2 * scale, "{what} result {k}: {err} of {scale}");
        }
    }

    /// Softmax over the last dimension through [`TrainOps`] and its gradient equal burn's
    /// `softmax(x, D - 1)`.
    #[test]
    fn attention_matches_burn_with_gradients() {
        let d = device();
        let dist = Distribution::Normal(0.0, 1.0);
        let (q, k, v) = (
            Tensor::<3>::random([4, 70, 8], dist, &d),
            Tensor::<3>::random([4, 13, 8], dist, &d),
            Tensor::<3>::random([4, 13, 8], dist, &d),
        );
        let run = |ours: bool| {
            let (q, k, v) = (
                q.clone().require_grad(),
                k.clone().require_grad(),
                v.clone().require_grad(),
            );
            let y = if ours {
                scaled_dot_product_attention(q.clone(), k.clone(), v.clone())
            } else {
                let s = q
                    .clone()
                    .matmul(k.clone().swap_dims(1, 2))
                    .div_scalar(8f32.sqrt());
                burn::tensor::activation::softmax(s, 2).matmul(v.clone())
            };
            let shape = y.dims();
            let t = Tensor::<1, Int>::arange(0..shape.iter().product::<usize>() as i64, &d)
                .float()
                .reshape(shape)
                .sin();
            let grads = (y.clone() * t).sum().backward();
            [
                y.into_data(),
                q.grad(&grads).expect("q grad").into_data(),
                k.grad(&grads).expect("k grad").into_data(),
                v.grad(&grads).expect("v grad").into_data(),
            ]
        };
        let (ours, theirs) = (run(true), run(false));
        for (a, b) in ours.iter().zip(&theirs) {
            a.assert_approx_eq::<f32>(b, burn::tensor::Tolerance::absolute(2e-5));
        }
    }

    /// `ours` and `theirs` on the same input give the same values and the same input gradient
    /// (of `Σ y·sin(index)`) within `tol` (absolute below 1, relative above); returns the
    /// output's shape.
    fn same_with_gradient<const D: usize, const E: usize>(
        x: Tensor<D>,
        ours: fn(Tensor<D>) -> Tensor<E>,
        theirs: fn(Tensor<D>) -> Tensor<E>,
        tol: f32,
    ) -> [usize; E] {
        let d = x.device();
        let run = |f: fn(Tensor<D>) -> Tensor<E>| {
            let x = x.clone().require_grad();
            let y = f(x.clone());
            let shape = y.dims();
            let t = Tensor::<1, Int>::arange(0..shape.iter().product::<usize>() as i64, &d)
                .float()
                .reshape(shape)
                .sin();
            let grads = (y.clone() * t).sum().backward();
            (
                shape,
                [y.into_data(), x.grad(&grads).expect("x grad").into_data()],
            )
        };
        let ((shape, a), (_, b)) = (run(ours), run(theirs));
        for (a, b) in a.iter().zip(&b) {
            // `tol` absolute below 1 and relative above: GEGLU's values reach ~50, where f32's
            // last bits alone are a few 1e-6 (an absolute bound failed by chance in CI).
            a.assert_approx_eq::<f32>(b, burn::tensor::Tolerance::rel_abs(tol, tol));
        }
        shape
    }

    /// Softmax over the last dimension through [`TrainOps`] and its gradient equal burn's.
    #[test]
    fn softmax_matches_burn_with_gradient() {
        let x = Tensor::<4>::random([2, 3, 5, 37], Distribution::Normal(0.0, 2.0), &device());
        same_with_gradient(
            x,
            softmax_last,
            |x| burn::tensor::activation::softmax(x, 3),
            1e-6,
        );
    }

    /// GELU through [`TrainOps`] and its gradient equal burn's (libm `erff`) within the A&S
    /// erf's 1.5e-7 times |x| (inputs up to about ±12).
    #[test]
    fn gelu_matches_burn_with_gradient() {
        let x = Tensor::<4>::random([2, 3, 5, 37], Distribution::Normal(0.0, 3.0), &device());
        same_with_gradient(x, gelu, burn::tensor::activation::gelu, 2e-6);
    }

    /// GEGLU through [`TrainOps`] and its gradient equal burn's `left * gelu(gate)` on the two
    /// halves (strided views), as the layer computed it before.
    #[test]
    fn geglu_matches_burn_with_gradient() {
        let h = Tensor::<3>::random([2, 5, 2 * 37], Distribution::Normal(0.0, 2.0), &device());
        let burns = |h: Tensor<3>| {
            h.clone().narrow(2, 0, 37) * burn::tensor::activation::gelu(h.narrow(2, 37, 37))
        };
        assert_eq!(same_with_gradient(h, geglu, burns, 2e-6), [2, 5, 37]);
    }

    /// The trait's default GEGLU (burn's operations: what CUDA runs) is the function the CPU
    /// kernel computes, forward and gradient.
    #[test]
    fn default_geglu_is_the_kernels_function() {
        let (hv, gv) = (test_values(3 * 4 * 38, 1), test_values(3 * 4 * 19, 2));
        let hv: Vec<f32> = hv.iter().map(|v| v * 4.0).collect();
        let host = |t: FlexTensor| t.into_data().try_into_vec::<f32>().expect("f32");
        let (h, g) = (
            flex_tensor(hv.clone(), &[3, 4, 38]),
            flex_tensor(gv.clone(), &[3, 4, 19]),
        );
        let y = host(composed_geglu::<Flex>(h.clone()));
        let dh = host(composed_geglu_grad::<Flex>(h, g));
        for (ours, default) in [
            (act::geglu(&hv, 19), y),
            (act::geglu_grad(&hv, &gv, 19), dh),
        ] {
            assert_eq!(ours.len(), default.len());
            for (a, b) in ours.iter().zip(&default) {
                assert!((a - b).abs() < 2e-6 * (1.0 + b.abs()), "{a} vs {b}");
            }
        }
    }

    /// Forward values and all three gradients of a transposed convolution through [`TrainOps`]
    /// equal burn's own `conv_transpose2d`, for the up-sampling shapes the models use (k4 s2 p1,
    /// k3 s2 p0) and a stride-1 case that takes the flipped-convolution input gradient.
    #[test]
    fn conv_transpose_matches_burn_with_gradients() {
        for (cin, cout, k, stride, padding, h) in
            [(4, 5, 4, 2, 1, 7), (6, 3, 3, 2, 0, 3), (9, 8, 3, 1, 1, 5)]
        {
            let d = device();
            let x = Tensor::<4>::random([3, cin, h, h + 1], Distribution::Normal(0.0, 1.0), &d);
            let w = Tensor::<4>::random([cin, cout, k, k], Distribution::Normal(0.0, 0.3), &d);
            let b = Tensor::<1>::random([cout], Distribution::Normal(0.0, 0.3), &d);
            let run = |ours: bool| {
                let (x, w, b) = (
                    x.clone().require_grad(),
                    w.clone().require_grad(),
                    b.clone().require_grad(),
                );
                let y = if ours {
                    conv_transpose2d(x.clone(), w.clone(), b.clone(), stride, padding)
                } else {
                    burn::tensor::module::conv_transpose2d(
                        x.clone(),
                        w.clone(),
                        Some(b.clone()),
                        transpose_options(stride, padding),
                    )
                };
                let shape = y.dims();
                let t = Tensor::<1, Int>::arange(0..shape.iter().product::<usize>() as i64, &d)
                    .float()
                    .reshape(shape)
                    .sin();
                let grads = (y.clone() * t).sum().backward();
                [
                    y.into_data(),
                    x.grad(&grads).expect("x grad").into_data(),
                    w.grad(&grads).expect("w grad").into_data(),
                    b.grad(&grads).expect("b grad").into_data(),
                ]
            };
            let (ours, theirs) = (run(true), run(false));
            assert_eq!(ours[0].shape(), theirs[0].shape());
            for (a, b) in ours.iter().zip(&theirs) {
                a.assert_approx_eq::<f32>(b, burn::tensor::Tolerance::absolute(2e-4));
            }
        }
    }

    /// Forward values and all gradients of a conv + SiLU chain through [`TrainOps`] equal burn's
    /// own `conv2d` and `silu` on the same inputs.
    #[test]
    fn conv_and_silu_match_burn_with_gradients() {
        // The last case is Winograd's (64 channels on an even map, src/kernels/winograd.rs).
        for (k, stride, padding, bias, [n, cin, h, w], cout) in [
            (3, 1, 1, true, [3, 4, 9, 8], 5),
            (4, 2, 1, false, [3, 4, 9, 8], 5),
            (3, 2, 0, true, [3, 4, 9, 8], 5),
            (1, 1, 0, true, [3, 4, 9, 8], 5),
            (3, 1, 1, true, [4, 64, 8, 8], 64),
        ] {
            let d = device();
            let x = Tensor::<4>::random([n, cin, h, w], Distribution::Normal(0.0, 1.0), &d);
            let w = Tensor::<4>::random([cout, cin, k, k], Distribution::Normal(0.0, 0.3), &d);
            let b = Tensor::<1>::random([cout], Distribution::Normal(0.0, 0.3), &d);
            let target = |y: Tensor<4>| {
                let shape = y.dims();
                let weights = Tensor::<1, Int>::arange(
                    0..shape.iter().product::<usize>() as i64,
                    &y.device(),
                )
                .float()
                .reshape(shape)
                .sin();
                (y * weights).sum()
            };
            let run = |ours: bool| {
                let (x, w, b) = (
                    x.clone().require_grad(),
                    w.clone().require_grad(),
                    b.clone().require_grad(),
                );
                let bias_t = bias.then(|| b.clone());
                let y = if ours {
                    silu(conv2d(x.clone(), w.clone(), bias_t, stride, padding))
                } else {
                    let options = ConvOptions::new([stride, stride], [padding, padding], [1, 1], 1);
                    burn::tensor::activation::silu(burn::tensor::module::conv2d(
                        x.clone(),
                        w.clone(),
                        bias_t,
                        options,
                    ))
                };
                let grads = target(y.clone()).backward();
                let grad_b = bias.then(|| b.grad(&grads).map(|g| g.into_data()));
                (
                    y.into_data(),
                    x.grad(&grads).map(|g| g.into_data()),
                    w.grad(&grads).map(|g| g.into_data()),
                    grad_b,
                )
            };
            let (ours, theirs) = (run(true), run(false));
            let tol = burn::tensor::Tolerance::absolute(2e-4);
            ours.0.assert_approx_eq::<f32>(&theirs.0, tol);
            ours.1
                .expect("x grad")
                .assert_approx_eq::<f32>(&theirs.1.expect("x grad"), tol);
            ours.2
                .expect("w grad")
                .assert_approx_eq::<f32>(&theirs.2.expect("w grad"), tol);
            if let (Some(a), Some(b)) = (ours.3, theirs.3) {
                a.expect("b grad")
                    .assert_approx_eq::<f32>(&b.expect("b grad"), tol);
            }
        }
    }

    #[test]
    fn without_autodiff_the_forward_is_the_same() {
        let d = Device::flex();
        let x = Tensor::<4>::random([2, 3, 7, 7], Distribution::Normal(0.0, 1.0), &d);
        let w = Tensor::<4>::random([4, 3, 3, 3], Distribution::Normal(0.0, 0.3), &d);
        let options = ConvOptions::new([2, 2], [1, 1], [1, 1], 1);
        let ours = silu(conv2d(x.clone(), w.clone(), None, 2, 1));
        let theirs =
            burn::tensor::activation::silu(burn::tensor::module::conv2d(x, w, None, options));
        ours.into_data()
            .assert_approx_eq::<f32>(&theirs.into_data(), burn::tensor::Tolerance::absolute(1e-5));
    }

    /// GroupNorm as the layers computed it before this module, from burn tensor operations.
    fn reference_group_norm(
        x: Tensor<4>,
        w: Tensor<1>,
        b: Tensor<1>,
        groups: usize,
        eps: f64,
    ) -> Tensor<4> {
        let shape = x.dims();
        let grouped: Tensor<3> = x.reshape([shape[0] as i64, groups as i64, -1]);
        let (var, mean) = grouped.clone().var_mean_bias(2);
        let normed: Tensor<4> = (grouped - mean).div((var + eps).sqrt()).reshape(shape);
        let affine = [1, shape[1], 1, 1];
        normed * w.reshape(affine) + b.reshape(affine)
    }

    /// Forward values and every gradient of GroupNorm (2 groups) and LayerNorm over `[C, H, W]`
    /// through [`TrainOps`] equal burn's composition of the same formula.
    #[test]
    fn norms_match_burn_with_gradients() {
        let d = device();
        let x = Tensor::<4>::random([5, 4, 3, 6], Distribution::Normal(0.5, 2.0), &d);
        let weights = Tensor::<4>::random([5, 4, 3, 6], Distribution::Normal(0.0, 1.0), &d);
        let tol = burn::tensor::Tolerance::absolute(1e-4);
        // GroupNorm: affine per channel.
        let w = Tensor::<1>::random([4], Distribution::Normal(1.0, 0.5), &d);
        let b = Tensor::<1>::random([4], Distribution::Normal(0.0, 0.5), &d);
        let run = |ours: bool| {
            let (x, w, b) = (
                x.clone().require_grad(),
                w.clone().require_grad(),
                b.clone().require_grad(),
            );
            let y = if ours {
                group_norm(x.clone(), w.clone(), b.clone(), 2, 1e-5)
            } else {
                reference_group_norm(x.clone(), w.clone(), b.clone(), 2, 1e-5)
            };
            let grads = (y.clone() * weights.clone()).sum().backward();
            let g = |t: &Tensor<1>| t.grad(&grads).expect("grad").into_data();
            (
                y.into_data(),
                x.grad(&grads).expect("x grad").into_data(),
                g(&w),
                g(&b),
            )
        };
        let (ours, theirs) = (run(true), run(false));
        ours.0.assert_approx_eq::<f32>(&theirs.0, tol);
        ours.1.assert_approx_eq::<f32>(&theirs.1, tol);
        ours.2.assert_approx_eq::<f32>(&theirs.2, tol);
        ours.3.assert_approx_eq::<f32>(&theirs.3, tol);
        // LayerNorm over [C, H, W]: affine per element.
        let w = Tensor::<3>::random([4, 3, 6], Distribution::Normal(1.0, 0.5), &d);
        let b = Tensor::<3>::random([4, 3, 6], Distribution::Normal(0.0, 0.5), &d);
        let run = |ours: bool| {
            let (x, w, b) = (
                x.clone().require_grad(),
                w.clone().require_grad(),
                b.clone().require_grad(),
            );
            let y = if ours {
                layer_norm(x.clone(), w.clone(), b.clone(), 1e-5)
            } else {
                let flat: Tensor<2> = x.clone().reshape([5, -1]);
                let (var, mean) = flat.clone().var_mean_bias(1);
                let normed: Tensor<4> =
                    (flat - mean).div((var + 1e-5).sqrt()).reshape([5, 4, 3, 6]);
                normed * w.clone().unsqueeze() + b.clone().unsqueeze()
            };
            let grads = (y.clone() * weights.clone()).sum().backward();
            let g = |t: &Tensor<3>| t.grad(&grads).expect("grad").into_data();
            (
                y.into_data(),
                x.grad(&grads).expect("x grad").into_data(),
                g(&w),
                g(&b),
            )
        };
        let (ours, theirs) = (run(true), run(false));
        ours.0.assert_approx_eq::<f32>(&theirs.0, tol);
        ours.1.assert_approx_eq::<f32>(&theirs.1, tol);
        ours.2.assert_approx_eq::<f32>(&theirs.2, tol);
        ours.3.assert_approx_eq::<f32>(&theirs.3, tol);
    }
}
