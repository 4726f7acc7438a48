//! The bodies of [`TrainOps`](super::TrainOps) built from burn operations: what a backend
//! without kernels of its own runs (CUDA today), and the reference the kernels are tested
//! against.

use burn::backend::Backend;
use burn::backend::TensorMetadata;
use burn::backend::tensor::FloatTensor;

use super::ops::{conv_options, transpose_options};

/// `(x̂, 1/√(σ² + ε))` of `x` `[n, c, s]` normalised per group: `x̂` `[n, c, s]`, the inverse
/// standard deviation `[n, groups, 1]`.
pub(super) fn normalized<B: Backend>(
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
pub(super) fn composed_conv2d_param_grads<B: Backend>(
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
pub(super) fn composed_conv_transpose2d_grads<B: Backend>(
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
pub(super) fn composed_group_norm<B: Backend>(
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
pub(super) fn composed_group_norm_grads<B: Backend>(
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
pub(super) fn halves<B: Backend>(h: FloatTensor<B>) -> [FloatTensor<B>; 2] {
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
pub(super) fn composed_geglu<B: Backend>(h: FloatTensor<B>) -> FloatTensor<B> {
    let [left, gate] = halves::<B>(h);
    B::float_mul(left, B::gelu(gate))
}

/// burn's operations for [`TrainOps::geglu_input_grad`].
pub(super) fn composed_geglu_grad<B: Backend>(
    h: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> FloatTensor<B> {
    let last = h.shape().num_dims() - 1;
    let [left, gate] = halves::<B>(h);
    let d_left = B::float_mul(grad.clone(), B::gelu(gate.clone()));
    let d_gate = B::gelu_backward(gate, B::float_mul(grad, left));
    B::float_cat(vec![d_left, d_gate], last)
}

/// burn's operations for [`TrainOps::silu_train`].
pub(super) fn composed_silu<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    B::float_mul(x.clone(), B::sigmoid(x))
}

/// `(scale · q kᵀ, its row maxima)` `[h, n, m]`, `[h, n, 1]`.
pub(super) fn scaled_scores<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    scale: f64,
) -> FloatTensor<B> {
    B::float_mul_scalar(
        B::float_matmul(q, B::float_swap_dims(k, 1, 2)),
        scale.into(),
    )
}

/// burn's operations for [`TrainOps::attention_lse`].
pub(super) fn composed_attention_lse<B: Backend>(
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
pub(super) fn composed_attention_grads<B: Backend>(
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
pub(super) fn composed_softmax<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    let d = x.shape().num_dims() - 1;
    let max = B::float_max_dim(x.clone(), d);
    let e = B::float_exp(B::float_sub(x, max));
    let sum = B::float_sum_dim(e.clone(), d);
    B::float_div(e, sum)
}

/// burn's operations for [`TrainOps::softmax_last_grad`].
pub(super) fn composed_softmax_grad<B: Backend>(
    y: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> FloatTensor<B> {
    let d = y.shape().num_dims() - 1;
    let dot = B::float_sum_dim(B::float_mul(grad.clone(), y.clone()), d);
    B::float_mul(y, B::float_sub(grad, dot))
}

/// burn's operations for [`TrainOps::silu_input_grad`].
pub(super) fn composed_silu_grad<B: Backend>(
    x: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> FloatTensor<B> {
    let s = B::sigmoid(x.clone());
    let one_minus_s = B::float_add_scalar(B::float_neg(s.clone()), 1.0.into());
    let inner = B::float_add_scalar(B::float_mul(x, one_minus_s), 1.0.into());
    B::float_mul(grad, B::float_mul(s, inner))
}
