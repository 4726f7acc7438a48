//! The kernels against burn's composed operations: values and gradients, f32 and half
//! precision, odd shapes; and the shared test helpers of the algorithm files.

use burn::backend::ops::ConvOptions;
use burn::prelude::*;
use burn::tensor::{DType, Distribution, bf16};

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;

use super::composed::{composed_geglu, composed_geglu_grad};
use super::convert::{convert_par, flex_tensor, narrow_bf16, widen_bf16};
use super::ops::transpose_options;
use super::*;

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
            let weights =
                Tensor::<1, Int>::arange(0..shape.iter().product::<usize>() as i64, &y.device())
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
    let theirs = burn::tensor::activation::silu(burn::tensor::module::conv2d(x, w, None, options));
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
            let normed: Tensor<4> = (flat - mean).div((var + 1e-5).sqrt()).reshape([5, 4, 3, 6]);
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

/// Deterministic values in `[-1, 1]` for the kernels' tests.
pub(super) fn test_values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 2001) as f32 / 1000.0
                - 1.0
        })
        .collect()
}
