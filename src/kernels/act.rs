//! SiLU (`x·σ(x)`, PyTorch's `torch.nn.functional.silu`) and GELU (`x·Φ(x)`, its exact `gelu`)
//! forward and backward on `f32` slices in one pass each, GEGLU, and softmax over rows (the
//! attention kernel's own softmax rows are in `attention`).
//!
//! burn's `silu` is `x * sigmoid(x)`: a sigmoid (scalar libm `expf` behind a branch, one thread)
//! then a multiply, and its backward runs four more element-wise ops. Here the exponential is the
//! Cephes `expf` polynomial (relative error ~1e-7 over the clamped range), written branch-free so
//! the compiler vectorises the loop; it is compiled once more with AVX2+FMA and AVX-512 enabled
//! and chosen at run time. The work is split over rayon in fixed-size blocks (element-wise, so the
//! result does not depend on the split).

use std::mem::MaybeUninit;

/// Elements per rayon task: large enough that scheduling costs nothing, small enough that a
/// 2-core machine gets both cores on a 64x64x32 activation.
const BLOCK: usize = 1 << 14;

/// `e^x` for `x` in `[-87.3, 88.7]`; below that range (including `-inf`) 0, above it (including
/// `+inf`) `e^88.7`; NaN stays NaN.
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    let (underflow, nan) = (x < -87.3, x.is_nan());
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that `n·C1` is exact (Cody-Waite reduction).
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    // `max`/`min` (IEEE maxNum/minNum) replace NaN by the bound; `clamp` would keep it.
    #[allow(clippy::manual_clamp)]
    let x = x.max(-87.3).min(88.7);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * C1 - n * C2;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5e-1;
    let y = p * (r * r) + r + 1.0;
    // 2^n through the exponent bits. A plain `as i32` saturates and maps NaN to 0, which LLVM
    // cannot vectorise (it became 16 scalar conversions per vector).
    // SAFETY: `x` is finite and in [-87.3, 88.7], so `n` is an integer in [-126, 128].
    let n = unsafe { n.to_int_unchecked::<i32>() };
    let (half, rest) = (n / 2, n - n / 2);
    let e = y
        * f32::from_bits(((half + 127) as u32) << 23)
        * f32::from_bits(((rest + 127) as u32) << 23);
    if nan {
        f32::NAN
    } else if underflow {
        0.0
    } else {
        e
    }
}

#[inline(always)]
fn silu_one(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// d silu / dx = σ(x)·(1 + x·(1 - σ(x))).
#[inline(always)]
fn silu_grad_one(x: f32, g: f32) -> f32 {
    let s = 1.0 / (1.0 + exp(-x));
    g * (s * (1.0 + x * (1.0 - s)))
}

#[inline(always)]
fn silu_block(x: &[f32], y: &mut [MaybeUninit<f32>]) {
    for (o, v) in y.iter_mut().zip(x) {
        o.write(silu_one(*v));
    }
}

#[inline(always)]
fn silu_grad_block(x: &[f32], g: &[f32], out: &mut [MaybeUninit<f32>]) {
    for ((o, v), d) in out.iter_mut().zip(x).zip(g) {
        o.write(silu_grad_one(*v, *d));
    }
}

fn silu_dispatch(x: &[f32], y: &mut [MaybeUninit<f32>]) {
    multiversion!((x: &[f32], y: &mut [MaybeUninit<f32>]) => silu_block(x, y))
}

fn silu_grad_dispatch(x: &[f32], g: &[f32], out: &mut [MaybeUninit<f32>]) {
    multiversion!((x: &[f32], g: &[f32], out: &mut [MaybeUninit<f32>])
        => silu_grad_block(x, g, out))
}

/// `block` over `x` in parallel blocks of [`BLOCK`]. `block` must write every element of the
/// output it is given, whose length is that of the input slice (the `*_block` functions here
/// zip the two).
fn elementwise(x: &[f32], block: fn(&[f32], &mut [MaybeUninit<f32>])) -> Vec<f32> {
    // SAFETY: `block` writes every element of its output chunk (the contract above).
    unsafe {
        super::parallel::par_new_uninit(x.len(), BLOCK, |i, y| block(&x[i * BLOCK..][..y.len()], y))
    }
    .0
}

/// [`elementwise`] for an input gradient from `x` and the output gradient `grad`.
fn elementwise_grad(
    x: &[f32],
    grad: &[f32],
    block: fn(&[f32], &[f32], &mut [MaybeUninit<f32>]),
) -> Vec<f32> {
    assert_eq!(x.len(), grad.len(), "x and grad differ in length");
    // SAFETY: as in `elementwise`.
    unsafe {
        super::parallel::par_new_uninit(x.len(), BLOCK, |i, o| {
            let at = i * BLOCK..i * BLOCK + o.len();
            block(&x[at.clone()], &grad[at], o)
        })
    }
    .0
}

/// `y = x·σ(x)`.
pub fn silu(x: &[f32]) -> Vec<f32> {
    elementwise(x, silu_dispatch)
}

/// `dx = g·σ(x)·(1 + x·(1 - σ(x)))`.
pub fn silu_grad(x: &[f32], grad: &[f32]) -> Vec<f32> {
    elementwise_grad(x, grad, silu_grad_dispatch)
}

/// `(Φ(x), φ(x))`, the standard normal's distribution function and density, for GELU.
///
/// `Φ(x) = ½·erfc(-x/√2)`, with `erfc(z) = t·P(t)·e^{-z²}`, `t = 1/(1 + p·z)` for `z ≥ 0`: Abramowitz
/// and Stegun 7.1.26 (absolute error at most 1.5e-7), the form PyTorch's vectorised CPU `erf`
/// uses. burn's GELU calls libm's scalar `erff` per element, which was most of the time the LDM
/// U-Net's GEGLU feed-forward spent outside its matrix products. `e^{-x²/2}` serves both halves.
#[inline(always)]
fn normal_parts(x: f32) -> (f32, f32) {
    const P: f32 = 0.327_591_1;
    const A1: f32 = 0.254_829_6;
    const A2: f32 = -0.284_496_74;
    const A3: f32 = 1.421_413_8;
    const A4: f32 = -1.453_152_1;
    const A5: f32 = 1.061_405_4;
    // 1/√(2π)
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + P * z);
    let poly = ((((A5 * t + A4) * t + A3) * t + A2) * t + A1) * t;
    let e = exp(-z * z);
    // ½·erfc(|z|): Φ(x) for x < 0, 1 - Φ(x) for x ≥ 0 (computed this way round, the left tail
    // keeps its relative accuracy).
    let tail = 0.5 * poly * e;
    let cdf = if x >= 0.0 { 1.0 - tail } else { tail };
    (cdf, e * INV_SQRT_2PI)
}

/// `gelu(x) = x·Φ(x)` and its slope `Φ(x) + x·φ(x)`.
#[inline(always)]
fn gelu_and_slope(x: f32) -> (f32, f32) {
    let (cdf, pdf) = normal_parts(x);
    (x * cdf, cdf + x * pdf)
}

#[inline(always)]
fn gelu_block(x: &[f32], y: &mut [MaybeUninit<f32>]) {
    for (o, v) in y.iter_mut().zip(x) {
        o.write(gelu_and_slope(*v).0);
    }
}

#[inline(always)]
fn gelu_grad_block(x: &[f32], g: &[f32], out: &mut [MaybeUninit<f32>]) {
    for ((o, v), d) in out.iter_mut().zip(x).zip(g) {
        o.write(*d * gelu_and_slope(*v).1);
    }
}

fn gelu_dispatch(x: &[f32], y: &mut [MaybeUninit<f32>]) {
    multiversion!((x: &[f32], y: &mut [MaybeUninit<f32>]) => gelu_block(x, y))
}

fn gelu_grad_dispatch(x: &[f32], g: &[f32], out: &mut [MaybeUninit<f32>]) {
    multiversion!((x: &[f32], g: &[f32], out: &mut [MaybeUninit<f32>])
        => gelu_grad_block(x, g, out))
}

/// `y = x·Φ(x)`, the exact (erf) GELU of `torch.nn.functional.gelu`.
pub fn gelu(x: &[f32]) -> Vec<f32> {
    elementwise(x, gelu_dispatch)
}

/// `dx = g·(Φ(x) + x·φ(x))`.
pub fn gelu_grad(x: &[f32], grad: &[f32]) -> Vec<f32> {
    elementwise_grad(x, grad, gelu_grad_dispatch)
}

#[inline(always)]
fn geglu_block(h: &[f32], y: &mut [MaybeUninit<f32>], inner: usize) {
    for (hr, yr) in h.chunks_exact(2 * inner).zip(y.chunks_exact_mut(inner)) {
        let (left, gate) = hr.split_at(inner);
        for ((o, a), v) in yr.iter_mut().zip(left).zip(gate) {
            o.write(*a * gelu_and_slope(*v).0);
        }
    }
}

/// `dh = [g·gelu(gate), g·left·gelu'(gate)]` per row.
#[inline(always)]
fn geglu_grad_block(h: &[f32], g: &[f32], out: &mut [MaybeUninit<f32>], inner: usize) {
    let rows = h.chunks_exact(2 * inner).zip(g.chunks_exact(inner));
    for ((hr, gr), or) in rows.zip(out.chunks_exact_mut(2 * inner)) {
        let (left, gate) = hr.split_at(inner);
        let (d_left, d_gate) = or.split_at_mut(inner);
        let pairs = d_left.iter_mut().zip(d_gate.iter_mut());
        for ((((dl, dg), a), v), d) in pairs.zip(left).zip(gate).zip(gr) {
            let (gelu, slope) = gelu_and_slope(*v);
            dl.write(*d * gelu);
            dg.write(*d * *a * slope);
        }
    }
}

fn geglu_dispatch(h: &[f32], y: &mut [MaybeUninit<f32>], inner: usize) {
    multiversion!((h: &[f32], y: &mut [MaybeUninit<f32>], inner: usize)
        => geglu_block(h, y, inner))
}

fn geglu_grad_dispatch(h: &[f32], g: &[f32], out: &mut [MaybeUninit<f32>], inner: usize) {
    multiversion!((h: &[f32], g: &[f32], out: &mut [MaybeUninit<f32>], inner: usize)
        => geglu_grad_block(h, g, out, inner))
}

/// diffusers' `GEGLU` after its projection: rows of `h` `[left | gate]`, each `inner` wide,
/// become `left·gelu(gate)` (rows of `inner`). One pass, where burn's ops made the two halves
/// (strided views), copied the gate for GELU, then multiplied, and the backward of each half
/// allocated and zero-filled a full-width gradient.
pub fn geglu(h: &[f32], inner: usize) -> Vec<f32> {
    assert!(
        inner > 0 && h.len().is_multiple_of(2 * inner),
        "geglu: rows of 2·{inner}"
    );
    let rows = rows_per_task(inner);
    // SAFETY: `geglu_block` writes every element of its output chunk (whole rows).
    unsafe {
        super::parallel::par_new_uninit(h.len() / 2, rows * inner, |i, y| {
            let start = i * rows * 2 * inner;
            geglu_dispatch(&h[start..start + 2 * y.len()], y, inner)
        })
    }
    .0
}

/// The gradient of [`geglu`] with respect to `h`, given the output gradient `grad`.
pub fn geglu_grad(h: &[f32], grad: &[f32], inner: usize) -> Vec<f32> {
    assert_eq!(h.len(), 2 * grad.len(), "geglu_grad: h is not twice grad");
    assert!(
        inner > 0 && grad.len().is_multiple_of(inner),
        "geglu_grad: rows of {inner}"
    );
    let rows = rows_per_task(2 * inner);
    // SAFETY: `geglu_grad_block` writes every element of its output chunk (whole rows).
    unsafe {
        super::parallel::par_new_uninit(h.len(), rows * 2 * inner, |i, o| {
            let start = i * rows * 2 * inner;
            let g = &grad[start / 2..start / 2 + o.len() / 2];
            geglu_grad_dispatch(&h[start..start + o.len()], g, o, inner)
        })
    }
    .0
}

/// Rows of a softmax per rayon task: about [`BLOCK`] elements.
fn rows_per_task(len: usize) -> usize {
    (BLOCK / len.max(1)).max(1)
}

/// `Σ v` in 16 interleaved lanes (a fixed order the compiler can vectorise).
#[inline(always)]
pub(super) fn lane_sum(v: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let chunks = v.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..16 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn softmax_block(x: &[f32], y: &mut [f32], len: usize) {
    for (xr, yr) in x.chunks(len).zip(y.chunks_mut(len)) {
        let max = xr.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
        for (o, v) in yr.iter_mut().zip(xr) {
            *o = exp(*v - max);
        }
        let inv = 1.0 / lane_sum(yr);
        for o in yr.iter_mut() {
            *o *= inv;
        }
    }
}

#[inline(always)]
fn softmax_grad_block(y: &[f32], g: &[f32], out: &mut [f32], len: usize) {
    for ((yr, gr), or) in y.chunks(len).zip(g.chunks(len)).zip(out.chunks_mut(len)) {
        for ((o, y), g) in or.iter_mut().zip(yr).zip(gr) {
            *o = *y * *g;
        }
        let dot = lane_sum(or);
        for ((o, y), g) in or.iter_mut().zip(yr).zip(gr) {
            *o = *y * (*g - dot);
        }
    }
}

fn softmax_dispatch(x: &[f32], y: &mut [f32], len: usize) {
    multiversion!((x: &[f32], y: &mut [f32], len: usize) => softmax_block(x, y, len))
}

fn softmax_grad_dispatch(y: &[f32], g: &[f32], out: &mut [f32], len: usize) {
    multiversion!((y: &[f32], g: &[f32], out: &mut [f32], len: usize)
        => softmax_grad_block(y, g, out, len))
}

/// Softmax over consecutive rows of `len` elements: `y = exp(x - max) / Σ exp(x - max)`, in one
/// pass for the maximum and one for exp-and-sum per row (burn's `softmax` is five full-tensor
/// passes on one thread with libm `expf`).
pub fn softmax(x: &[f32], len: usize) -> Vec<f32> {
    let rows = rows_per_task(len);
    super::parallel::par_new(x.len(), rows * len.max(1), |i, y| {
        softmax_dispatch(&x[i * rows * len..][..y.len()], y, len.max(1))
    })
    .0
}

/// The gradient of [`softmax`] from its output `y`: `dx = y·(g - Σ g·y)` per row.
pub fn softmax_grad(y: &[f32], grad: &[f32], len: usize) -> Vec<f32> {
    assert_eq!(
        y.len(),
        grad.len(),
        "softmax_grad: y and grad differ in length"
    );
    let rows = rows_per_task(len);
    super::parallel::par_new(y.len(), rows * len.max(1), |i, o| {
        let at = i * rows * len..i * rows * len + o.len();
        softmax_grad_dispatch(&y[at.clone()], &grad[at], o, len.max(1))
    })
    .0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid() -> Vec<f32> {
        (-2000..=2000)
            .map(|i| i as f32 * 0.01)
            .chain([-100.0, -88.0, 88.0, 100.0, 0.0])
            .collect()
    }

    #[test]
    fn exp_matches_libm() {
        for x in (-870..=886).map(|i| i as f32 * 0.1) {
            let (got, want) = (exp(x), (x as f64).exp());
            assert!(
                ((got as f64 - want) / want).abs() < 3e-7,
                "exp({x}) = {got}, libm {want}"
            );
        }
    }

    #[test]
    fn silu_and_its_gradient_match_the_definition() {
        let x = grid();
        let g: Vec<f32> = x.iter().map(|v| 0.5 - v * 0.01).collect();
        let y = silu(&x);
        let dx = silu_grad(&x, &g);
        for (i, &v) in x.iter().enumerate() {
            let s = 1.0 / (1.0 + (-(v as f64)).exp());
            let want_y = v as f64 * s;
            let want_dx = g[i] as f64 * s * (1.0 + v as f64 * (1.0 - s));
            assert!(
                (y[i] as f64 - want_y).abs() <= 1e-6 * (1.0 + want_y.abs()),
                "silu({v}) = {}, want {want_y}",
                y[i]
            );
            assert!(
                (dx[i] as f64 - want_dx).abs() <= 1e-6 * (1.0 + want_dx.abs()),
                "silu'({v}) = {}, want {want_dx}",
                dx[i]
            );
        }
    }

    /// erf in f64 from its everywhere-positive series `2x/√π·e^{-x²}·Σ (2x²)ⁿ/(1·3···(2n+1))`
    /// (±1 past |x| = 6, where erfc is below 2e-17).
    fn erf(x: f64) -> f64 {
        if x.abs() > 6.0 {
            return x.signum();
        }
        let (mut term, mut sum, mut n) = (1.0, 1.0, 0.0);
        while term > 1e-17 * sum {
            n += 1.0;
            term *= 2.0 * x * x / (2.0 * n + 1.0);
            sum += term;
        }
        2.0 * x / std::f64::consts::PI.sqrt() * (-x * x).exp() * sum
    }

    #[test]
    fn gelu_and_its_gradient_match_the_definition() {
        assert!((erf(1.0) - 0.842_700_792_949_715).abs() < 1e-15);
        let x = grid();
        let g: Vec<f32> = x.iter().map(|v| 0.5 - v * 0.01).collect();
        let (y, dx) = (gelu(&x), gelu_grad(&x, &g));
        for (i, &v) in x.iter().enumerate() {
            let v64 = v as f64;
            let cdf = 0.5 * (1.0 + erf(v64 / std::f64::consts::SQRT_2));
            let pdf = (-v64 * v64 / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt();
            let (want_y, want_dx) = (v64 * cdf, g[i] as f64 * (cdf + v64 * pdf));
            // A&S 7.1.26's 1.5e-7 absolute error in erf, times |x|/2.
            let tol = 1e-7 * (1.0 + v64.abs()) + 1e-6 * want_y.abs();
            assert!(
                (y[i] as f64 - want_y).abs() <= tol,
                "gelu({v}) = {}, want {want_y}",
                y[i]
            );
            assert!(
                (dx[i] as f64 - want_dx).abs() <= tol + 1e-6 * want_dx.abs(),
                "gelu'({v}) = {}, want {want_dx}",
                dx[i]
            );
        }
    }

    #[test]
    fn geglu_and_its_gradient_are_left_times_gelu_of_gate() {
        let inner = 37;
        let h: Vec<f32> = grid().iter().take(2 * inner * 9).map(|v| v * 0.4).collect();
        let g: Vec<f32> = (0..h.len() / 2)
            .map(|i| ((i * 7) % 11) as f32 * 0.1 - 0.5)
            .collect();
        let (y, dh) = (geglu(&h, inner), geglu_grad(&h, &g, inner));
        for (r, (hr, gr)) in h.chunks(2 * inner).zip(g.chunks(inner)).enumerate() {
            let (left, gate) = hr.split_at(inner);
            let (gelu_gate, d_gate) = (gelu(gate), gelu_grad(gate, gr));
            for i in 0..inner {
                assert_eq!(y[r * inner + i], left[i] * gelu_gate[i], "y[{r}, {i}]");
                let want_left = gr[i] * gelu_gate[i];
                let want_gate = d_gate[i] * left[i];
                for (got, want) in [
                    (dh[r * 2 * inner + i], want_left),
                    (dh[(2 * r + 1) * inner + i], want_gate),
                ] {
                    assert!(
                        (got - want).abs() <= 1e-6 * (1.0 + want.abs()),
                        "dh[{r}]: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn non_finite_inputs_stay_non_finite() {
        assert!(gelu(&[f32::NAN])[0].is_nan());
        assert_eq!(gelu(&[f32::INFINITY])[0], f32::INFINITY);
        assert!(gelu_grad(&[f32::NAN], &[1.0])[0].is_nan());
        let y = silu(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY]);
        assert!(y[0].is_nan());
        assert!(!y[1].is_finite() && !y[2].is_finite());
        assert!(silu_grad(&[f32::NAN], &[1.0])[0].is_nan());
        assert!(silu_grad(&[1.0], &[f32::NAN])[0].is_nan());
    }

    #[test]
    fn softmax_and_its_gradient_match_the_definition() {
        let len = 37;
        let x: Vec<f32> = grid().iter().take(len * 5).map(|v| v * 0.3).collect();
        let g: Vec<f32> = (0..x.len())
            .map(|i| ((i * 7) % 11) as f32 * 0.1 - 0.5)
            .collect();
        let y = softmax(&x, len);
        let dx = softmax_grad(&y, &g, len);
        for r in 0..x.len() / len {
            let row = &x[r * len..(r + 1) * len];
            let max = row.iter().fold(f64::NEG_INFINITY, |m, v| m.max(*v as f64));
            let e: Vec<f64> = row.iter().map(|v| (*v as f64 - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            let want: Vec<f64> = e.iter().map(|v| v / sum).collect();
            let dot: f64 = (0..len).map(|i| want[i] * g[r * len + i] as f64).sum();
            for i in 0..len {
                let (got_y, got_dx) = (y[r * len + i] as f64, dx[r * len + i] as f64);
                let want_dx = want[i] * (g[r * len + i] as f64 - dot);
                assert!(
                    (got_y - want[i]).abs() < 1e-6,
                    "y[{r},{i}] = {got_y}, want {}",
                    want[i]
                );
                assert!(
                    (got_dx - want_dx).abs() < 1e-6,
                    "dx[{r},{i}] = {got_dx}, want {want_dx}"
                );
            }
        }
        // A row of -inf except one finite value is one-hot; a NaN makes its row NaN only.
        let y = softmax(&[f32::NEG_INFINITY, 3.0, f32::NEG_INFINITY], 3);
        assert_eq!(y, vec![0.0, 1.0, 0.0]);
        let y = softmax(&[1.0, f32::NAN, 2.0, 1.0, 2.0, 3.0], 3);
        assert!(y[..3].iter().all(|v| v.is_nan()) && y[3..].iter().all(|v| v.is_finite()));
    }

    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        let x = grid();
        let mut generic = vec![MaybeUninit::new(0.0f32); x.len()];
        silu_block(&x, &mut generic);
        let generic: Vec<f32> = generic.iter().map(|v| unsafe { v.assume_init() }).collect();
        assert_eq!(silu(&x), generic);
        let mut generic = vec![MaybeUninit::new(0.0f32); x.len()];
        gelu_block(&x, &mut generic);
        let generic: Vec<f32> = generic.iter().map(|v| unsafe { v.assume_init() }).collect();
        assert_eq!(gelu(&x), generic);
    }
}
