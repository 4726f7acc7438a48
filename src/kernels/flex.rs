//! The CPU implementation of [`TrainOps`] on burn's Flex backend: each op checks that its
//! geometry is one the kernels handle, runs the algorithm file's kernel on f32 values (half
//! inputs widened, results rounded back to the input's dtype), and otherwise falls back to
//! burn's path.

use burn::backend::flex::FlexTensor;
use burn::backend::ops::{ActivationOps, FloatTensorOps, ModuleOps};
use burn::backend::{Flex, TensorMetadata};
use burn::tensor::{DType, bf16};
use rayon::prelude::*;

use super::composed::{
    composed_attention_grads, composed_attention_lse, composed_conv_transpose2d_grads,
    composed_conv2d_param_grads, composed_geglu, composed_geglu_grad, composed_group_norm,
    composed_silu, composed_silu_grad, composed_softmax, composed_softmax_grad,
};
use super::conv::{self, Conv2dGeom};
use super::convert::{f32_values, flex_tensor, flex_tensor_in};
use super::gemm::{Product, matmul};
use super::norm::{self, NormGeom};
use super::ops::{TrainOps, conv_options, transpose_options};
use super::{act, attention, bf16_gemm};

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
