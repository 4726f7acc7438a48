//! Scaled dot-product attention `softmax(q kᵀ · scale) v` over `[heads, n, d]` slices, computed
//! a block of queries at a time so the `n x m` matrix of scores never exists for more than one
//! block per thread: what PyTorch's `scaled_dot_product_attention` does on CPU (its flash
//! attention kernel), and the backward of FlashAttention (Dao et al. 2022, alg. 2): the forward
//! keeps only the output and each row's log-sum-exp, the backward recomputes the probabilities
//! block by block.
//!
//! At 64x64 latents Stable Diffusion's self-attention has 4096 queries and keys: materialised,
//! the scores of 8 heads are 537 MB per image (written, soft-maxed and read again, and kept for
//! the backward), where one block here is 1 MB.
//!
//! Each head is one task; blocks run in order inside it and the key/value gradients are
//! accumulated block by block, so results do not depend on the thread count.

use rayon::prelude::*;

use super::act;
use super::bf16_gemm::{self, PackedRhs};
use super::gemm::Product;
use super::gemm::matmul as gemm;

/// Query rows per block.
const BLOCK: usize = 64;

/// The shape of one attention: `heads` independent problems of `n` queries, `m` keys, width `d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnGeom {
    pub heads: usize,
    pub n: usize,
    pub m: usize,
    pub d: usize,
    /// `q`, `k` and `v` are bf16 (mixed precision): every product runs on the bf16 kernel. Those
    /// whose right operand is the same for every block (`q kᵀ`, `p v`, `dO vᵀ`, `dS k`) have
    /// it packed once per head. The key and value gradients are accumulated transposed,
    /// `dVᵀ += dOᵀ p` and `dKᵀ += qᵀ dS`, so the block's probabilities and their gradients
    /// are the right operand, packed by rows while they are in cache (as `pᵀ` on the left they
    /// were packed by columns, which cost more than the bf16 kernel saved), and transposed
    /// once per head. The probabilities and their gradients are rounded to bf16 as they enter
    /// the products (as a bf16 flash attention does); the softmax and every sum stay f32.
    pub bf16: bool,
}

impl AttnGeom {
    fn q_len(&self) -> usize {
        self.n * self.d
    }
    fn kv_len(&self) -> usize {
        self.m * self.d
    }
}

/// A right-hand operand that every block of a head multiplies (`k x n`): for bf16 heads packed
/// once per head for the bf16 kernel, not once per block.
enum Reused<'a> {
    F32((&'a [f32], usize, usize)),
    Bf16(PackedRhs),
}

impl<'a> Reused<'a> {
    fn new(g: &AttnGeom, rhs: (&'a [f32], usize, usize), (k, n): (usize, usize)) -> Self {
        if g.bf16 && bf16_gemm::available() {
            Reused::Bf16(PackedRhs::new(rhs, (k, n)))
        } else {
            Reused::F32(rhs)
        }
    }
}

/// `dst = lhs · rhs` with `lhs` `[m, k]` (the `rhs` knows `k` and `n`).
fn times(dst: &mut [f32], (m, n, k): (usize, usize, usize), lhs: &[f32], rhs: &Reused) {
    match rhs {
        Reused::F32(rhs) => gemm(dst, (m, n, k), false, (lhs, k, 1), *rhs, Product::SERIAL),
        Reused::Bf16(rhs) => bf16_gemm::matmul_packed(dst, m, false, (lhs, k, 1), rhs),
    }
}

/// Output `[heads, n, d]` and the log-sum-exp of each row's scaled scores `[heads, n]`.
pub fn forward(g: &AttnGeom, q: &[f32], k: &[f32], v: &[f32], scale: f32) -> (Vec<f32>, Vec<f32>) {
    let mut o = vec![0.0f32; g.heads * g.q_len()];
    let mut lse = vec![0.0f32; g.heads * g.n];
    o.par_chunks_mut(g.q_len().max(1))
        .zip(lse.par_chunks_mut(g.n.max(1)))
        .enumerate()
        .for_each(|(h, (oh, lh))| {
            let (qh, kh, vh) = (
                &q[h * g.q_len()..][..g.q_len()],
                &k[h * g.kv_len()..][..g.kv_len()],
                &v[h * g.kv_len()..][..g.kv_len()],
            );
            let kt = Reused::new(g, (kh, 1, g.d), (g.d, g.m));
            let vs = Reused::new(g, (vh, g.d, 1), (g.m, g.d));
            let mut s = vec![0.0f32; BLOCK * g.m];
            for r0 in (0..g.n).step_by(BLOCK) {
                let rows = BLOCK.min(g.n - r0);
                let s = &mut s[..rows * g.m];
                // S = Q Kᵀ, softmax, O = P V.
                times(s, (rows, g.m, g.d), &qh[r0 * g.d..][..rows * g.d], &kt);
                softmax_rows_scaled(s, g.m, scale, &mut lh[r0..r0 + rows]);
                let ob = &mut oh[r0 * g.d..][..rows * g.d];
                times(ob, (rows, g.d, g.m), s, &vs);
            }
        });
    (o, lse)
}

/// Gradients `(dq, dk, dv)` of [`forward`] given its output `o`, `lse` and the output
/// gradient `grad`.
// The operands of attention's backward (q, k, v, o, lse, dO) as the algorithm names them.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    g: &AttnGeom,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    lse: &[f32],
    grad: &[f32],
    scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut dq = vec![0.0f32; g.heads * g.q_len()];
    let mut dk = vec![0.0f32; g.heads * g.kv_len()];
    let mut dv = vec![0.0f32; g.heads * g.kv_len()];
    dq.par_chunks_mut(g.q_len().max(1))
        .zip(dk.par_chunks_mut(g.kv_len().max(1)))
        .zip(dv.par_chunks_mut(g.kv_len().max(1)))
        .enumerate()
        .for_each(|(h, ((dqh, dkh), dvh))| {
            let (ql, kvl) = (g.q_len(), g.kv_len());
            let (qh, oh, gh) = (
                &q[h * ql..][..ql],
                &o[h * ql..][..ql],
                &grad[h * ql..][..ql],
            );
            let (kh, vh) = (&k[h * kvl..][..kvl], &v[h * kvl..][..kvl]);
            let lh = &lse[h * g.n..(h + 1) * g.n];
            let kt = Reused::new(g, (kh, 1, g.d), (g.d, g.m));
            let ks = Reused::new(g, (kh, g.d, 1), (g.m, g.d));
            let vt = Reused::new(g, (vh, 1, g.d), (g.d, g.m));
            let mut p = vec![0.0f32; BLOCK * g.m];
            let mut dp = vec![0.0f32; BLOCK * g.m];
            // bf16: `dVᵀ` and `dKᵀ` (`[d, m]`), transposed into `dvh`, `dkh` at the end.
            let bf16 = g.bf16 && bf16_gemm::available();
            let mut transposed = vec![0.0f32; if bf16 { 2 * g.kv_len() } else { 0 }];
            let (dvt, dkt) = transposed.split_at_mut(if bf16 { g.kv_len() } else { 0 });
            let (dv_sum, dk_sum) = match bf16 {
                true => (&mut *dvt, &mut *dkt),
                false => (&mut *dvh, &mut *dkh),
            };
            // `dst (+)= lhsᵀ · rhs` over the block's rows: `(lhs, rhs)` are `(p, dO)` or
            // `(dS, q)`, `dst` `dV` or `dK` (`dVᵀ` or `dKᵀ` in bf16).
            let gradient = |dst: &mut [f32], (lhs, rhs): (&[f32], &[f32]), rows| {
                if bf16 {
                    let (l, r) = ((rhs, 1, g.d), (lhs, g.m, 1));
                    bf16_gemm::matmul(dst, (g.d, g.m, rows), true, l, r, false);
                } else {
                    let (l, r) = ((lhs, 1, g.m), (rhs, g.d, 1));
                    gemm(dst, (g.m, g.d, rows), true, l, r, Product::SERIAL);
                }
            };
            for r0 in (0..g.n).step_by(BLOCK) {
                let rows = BLOCK.min(g.n - r0);
                let (p, dp) = (&mut p[..rows * g.m], &mut dp[..rows * g.m]);
                let (qb, ob, gb) = (
                    &qh[r0 * g.d..][..rows * g.d],
                    &oh[r0 * g.d..][..rows * g.d],
                    &gh[r0 * g.d..][..rows * g.d],
                );
                times(p, (rows, g.m, g.d), qb, &kt);
                probabilities_from_lse(p, g.m, scale, &lh[r0..r0 + rows]);
                // dV += Pᵀ dO
                gradient(dv_sum, (p, gb), rows);
                // dP = dO Vᵀ
                times(dp, (rows, g.m, g.d), gb, &vt);
                // dS = P ∘ (dP - rowsum(dO ∘ O)), times the scale.
                softmax_backward_rows(p, dp, gb, ob, g.m, g.d, scale);
                // dQ = dS K
                times(
                    &mut dqh[r0 * g.d..][..rows * g.d],
                    (rows, g.d, g.m),
                    dp,
                    &ks,
                );
                // dK += dSᵀ Q
                gradient(dk_sum, (dp, qb), rows);
            }
            if bf16 {
                for (dst, t) in [(dvh, &*dvt), (dkh, &*dkt)] {
                    for (j, row) in dst.chunks_mut(g.d).enumerate() {
                        row.iter_mut()
                            .enumerate()
                            .for_each(|(c, x)| *x = t[c * g.m + j]);
                    }
                }
            }
        });
    (dq, dk, dv)
}

// ------------------------------------------------------------------------- softmax rows

#[inline(always)]
fn softmax_rows_scaled_block(s: &mut [f32], len: usize, scale: f32, lse: &mut [f32]) {
    for (row, l) in s.chunks_mut(len).zip(lse.iter_mut()) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v)) * scale;
        for v in row.iter_mut() {
            *v = act::exp(*v * scale - max);
        }
        let sum = act::lane_sum(row);
        let inv = 1.0 / sum;
        for v in row.iter_mut() {
            *v *= inv;
        }
        *l = max + sum.ln();
    }
}

/// Rows of `len` raw scores become `softmax(scale · s)` in place; `lse` receives each row's
/// `log Σ exp(scale · s)` (the attention kernel's state for its backward). `scale > 0`.
fn softmax_rows_scaled(s: &mut [f32], len: usize, scale: f32, lse: &mut [f32]) {
    multiversion!((s: &mut [f32], len: usize, scale: f32, lse: &mut [f32])
        => softmax_rows_scaled_block(s, len, scale, lse))
}

#[inline(always)]
fn probabilities_block(s: &mut [f32], len: usize, scale: f32, lse: &[f32]) {
    for (row, l) in s.chunks_mut(len).zip(lse) {
        for v in row.iter_mut() {
            *v = act::exp(*v * scale - *l);
        }
    }
}

/// Rows of raw scores become the probabilities `exp(scale · s - lse)` the forward computed.
fn probabilities_from_lse(s: &mut [f32], len: usize, scale: f32, lse: &[f32]) {
    multiversion!((s: &mut [f32], len: usize, scale: f32, lse: &[f32])
        => probabilities_block(s, len, scale, lse))
}

#[inline(always)]
fn softmax_backward_block(
    p: &[f32],
    dp: &mut [f32],
    grad: &[f32],
    out: &[f32],
    len: usize,
    width: usize,
    scale: f32,
) {
    let rows = dp.chunks_mut(len).zip(p.chunks(len));
    for ((dpr, pr), (gr, or)) in rows.zip(grad.chunks(width).zip(out.chunks(width))) {
        let mut dot = [0.0f32; 1];
        for (g, o) in gr.iter().zip(or) {
            dot[0] += g * o;
        }
        let d = dot[0];
        for (x, p) in dpr.iter_mut().zip(pr) {
            *x = p * (*x - d) * scale;
        }
    }
}

/// The scores' gradient of softmax attention, in place of `dp` (rows of `len`):
/// `scale · P ∘ (dP - rowsum(dO ∘ O))`, with `dO` and `O` rows of `width`.
fn softmax_backward_rows(
    p: &[f32],
    dp: &mut [f32],
    grad: &[f32],
    out: &[f32],
    len: usize,
    width: usize,
    scale: f32,
) {
    multiversion!((p: &[f32], dp: &mut [f32], grad: &[f32], out: &[f32], len: usize,
        width: usize, scale: f32) => softmax_backward_block(p, dp, grad, out, len, width, scale))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let x = (i as u32)
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(seed * 97);
                ((x >> 8) % 1000) as f32 / 500.0 - 1.0
            })
            .collect()
    }

    /// softmax(q kᵀ s) v in f64, row by row.
    fn naive(g: &AttnGeom, q: &[f32], k: &[f32], v: &[f32], s: f32) -> Vec<f64> {
        let mut out = vec![0.0f64; g.heads * g.n * g.d];
        for h in 0..g.heads {
            for i in 0..g.n {
                let dots: Vec<f64> = (0..g.m)
                    .map(|j| {
                        (0..g.d)
                            .map(|c| {
                                q[(h * g.n + i) * g.d + c] as f64
                                    * k[(h * g.m + j) * g.d + c] as f64
                            })
                            .sum::<f64>()
                            * s as f64
                    })
                    .collect();
                let max = dots.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = dots.iter().map(|x| (x - max).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..g.d {
                    out[(h * g.n + i) * g.d + c] = (0..g.m)
                        .map(|j| e[j] / z * v[(h * g.m + j) * g.d + c] as f64)
                        .sum();
                }
            }
        }
        out
    }

    #[test]
    fn forward_matches_the_definition_and_gradients_match_finite_differences() {
        // n spans two blocks plus a partial one; m != n (cross-attention).
        let g = AttnGeom {
            heads: 3,
            n: 2 * BLOCK + 5,
            m: 9,
            d: 4,
            bf16: false,
        };
        let s = 0.5f32;
        let (q, k, v) = (
            values(g.heads * g.q_len(), 1),
            values(g.heads * g.kv_len(), 2),
            values(g.heads * g.kv_len(), 3),
        );
        let (o, lse) = forward(&g, &q, &k, &v, s);
        let want = naive(&g, &q, &k, &v, s);
        let err = o
            .iter()
            .zip(&want)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0.0, f64::max);
        assert!(err < 1e-5, "forward error {err:e}");
        // d/dθ of L = <o, w> against central differences in f64.
        let w = values(o.len(), 4);
        let (dq, dk, dv) = backward(&g, &q, &k, &v, &o, &lse, &w, s);
        let loss = |q: &[f32], k: &[f32], v: &[f32]| -> f64 {
            naive(&g, q, k, v, s)
                .iter()
                .zip(&w)
                .map(|(a, b)| a * *b as f64)
                .sum()
        };
        let eps = 1e-2f32;
        for (which, grad) in [(0, &dq), (1, &dk), (2, &dv)] {
            for idx in [0, 7, grad.len() - 1] {
                let mut args = [q.clone(), k.clone(), v.clone()];
                args[which][idx] += eps;
                let up = loss(&args[0], &args[1], &args[2]);
                args[which][idx] -= 2.0 * eps;
                let down = loss(&args[0], &args[1], &args[2]);
                let fd = (up - down) / (2.0 * eps as f64);
                let got = grad[idx] as f64;
                assert!(
                    (fd - got).abs() < 1e-3 * (1.0 + fd.abs()),
                    "input {which} element {idx}: finite difference {fd}, kernel {got}"
                );
            }
        }
    }
}
