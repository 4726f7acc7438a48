//! Group normalisation with a per-channel affine (`torch.nn.GroupNorm`; `torch.nn.LayerNorm` over
//! `[C, H, W]` is the case `groups = 1` with `C·H·W` "channels" of one element each) forward and
//! backward on contiguous `f32` slices, one pass over the data each.
//!
//! burn composes a normalisation from about ten tensor operations (mean, subtract, square, mean,
//! add, sqrt, divide, multiply, add), each a full pass over the activation on one thread, and its
//! backward from about twice as many. Here the statistics are accumulated in `f64` and the
//! backward is the closed form (with `x̂ = (x - μ)·r`, `r = 1/√(σ² + ε)`, `d = dy·w`, per group):
//!
//! `dx = r·(d - mean(d) - x̂·mean(d·x̂))`, `dw[c] = Σ dy·x̂`, `db[c] = Σ dy`.
//!
//! Samples run in parallel. The affine gradients are sums over the batch, formed per fixed chunk
//! of samples and added in order, as in [`super::conv`], so they do not depend on the thread
//! count.

use std::mem::MaybeUninit;

/// The shape of one normalisation: `x` `[batch, channels, spatial]`, `channels` split into
/// `groups` equal groups, affine parameters `[channels]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NormGeom {
    pub batch: usize,
    pub channels: usize,
    pub spatial: usize,
    pub groups: usize,
    pub eps: f64,
}

/// At most this many partial sums of the affine gradients (see [`super::conv`]).
const AFFINE_GRAD_CHUNKS: usize = 16;

impl NormGeom {
    fn sample(&self) -> usize {
        self.channels * self.spatial
    }
    fn group_len(&self) -> usize {
        self.channels / self.groups * self.spatial
    }
    pub fn len(&self) -> usize {
        self.batch * self.sample()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Independent partial sums per reduction. Every sum below is formed in `LANES` interleaved
/// accumulators added at the end: a fixed order (so results do not depend on the machine), and
/// one the compiler can vectorise, which a single running sum is not (it may not reassociate).
const LANES: usize = 8;

/// `Σ f(a[i], b[i], c[i])` over equal-length slices in `LANES` interleaved `f64` accumulators.
#[inline(always)]
fn sum3(a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> f64) -> f64 {
    let mut acc = [0.0f64; LANES];
    let (ca, cb, cc) = (
        a.chunks_exact(LANES),
        b.chunks_exact(LANES),
        c.chunks_exact(LANES),
    );
    let tail: f64 = (ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .zip(cc.remainder()))
    .map(|((a, b), c)| f(*a, *b, *c))
    .sum();
    for ((a, b), c) in ca.zip(cb).zip(cc) {
        for i in 0..LANES {
            acc[i] += f(a[i], b[i], c[i]);
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// Mean and `1/√(var + ε)` (biased variance, two passes) of one group.
#[inline(always)]
fn stats(x: &[f32], eps: f64) -> (f32, f32) {
    let n = x.len().max(1) as f64;
    let mean = sum3(x, x, x, |v, _, _| v as f64) / n;
    let var = sum3(x, x, x, |v, _, _| (v as f64 - mean).powi(2)) / n;
    (mean as f32, (1.0 / (var + eps).sqrt()) as f32)
}

/// One group of the forward: `w`, `b` are the group's `cpg` affine values, or for LayerNorm
/// (`spatial == 1`) one per element.
#[inline(always)]
fn forward_group(
    xg: &[f32],
    yg: &mut [MaybeUninit<f32>],
    w: &[f32],
    b: &[f32],
    spatial: usize,
    eps: f64,
) {
    let (mean, rstd) = stats(xg, eps);
    if spatial == 1 {
        for (((o, v), w), b) in yg.iter_mut().zip(xg).zip(w).zip(b) {
            o.write((*v - mean) * rstd * w + b);
        }
        return;
    }
    for (c, (yc, xc)) in yg.chunks_mut(spatial).zip(xg.chunks(spatial)).enumerate() {
        let (w, b) = (w[c], b[c]);
        for (o, v) in yc.iter_mut().zip(xc) {
            o.write((*v - mean) * rstd * w + b);
        }
    }
}

fn forward_group_dispatch(
    xg: &[f32],
    yg: &mut [MaybeUninit<f32>],
    w: &[f32],
    b: &[f32],
    spatial: usize,
    eps: f64,
) {
    multiversion!((xg: &[f32], yg: &mut [MaybeUninit<f32>], w: &[f32], b: &[f32], spatial: usize,
        eps: f64)
        => forward_group(xg, yg, w, b, spatial, eps))
}

/// `y = (x - μ)/√(σ² + ε)·w + b` per group.
pub fn forward(g: &NormGeom, x: &[f32], weight: &[f32], bias: &[f32]) -> Vec<f32> {
    let cpg = g.channels / g.groups;
    let glen = g.group_len();
    // SAFETY: `forward_group` writes every element of its group (`spatial`-long channel chunks
    // covering the group, or one per element for LayerNorm).
    unsafe {
        super::parallel::par_new_uninit(g.len(), glen, |row, yg| {
            let xg = &x[row * glen..][..yg.len()];
            let c0 = (row % g.groups) * cpg;
            let (w, b) = (&weight[c0..c0 + cpg], &bias[c0..c0 + cpg]);
            forward_group_dispatch(xg, yg, w, b, g.spatial, g.eps);
        })
    }
    .0
}

/// One group of the backward: writes `dxg` and adds into the group's `dw`, `db` (`cpg` values,
/// or one per element for LayerNorm), as [`forward_group`] lays them out.
#[inline(always)]
// The per-group operands of the closed-form backward, inlined into a vectorised loop.
#[allow(clippy::too_many_arguments)]
fn backward_group(
    xg: &[f32],
    gg: &[f32],
    dxg: &mut [f32],
    w: &[f32],
    dw: &mut [f32],
    db: &mut [f32],
    spatial: usize,
    eps: f64,
) {
    let (mean, rstd) = stats(xg, eps);
    let n = xg.len().max(1) as f64;
    if spatial == 1 {
        // LayerNorm: an affine value per element.
        for (((v, d), dw), db) in xg.iter().zip(gg).zip(dw.iter_mut()).zip(db) {
            let xhat = (*v - mean) * rstd;
            *db += *d;
            *dw += *d * xhat;
        }
        // mean(d) and mean(d·x̂) over the group, d = dy·w.
        let sum_d = sum3(gg, w, w, |d, w, _| (d * w) as f64);
        let sum_dx = sum3(xg, gg, w, |v, d, w| (d * w * ((v - mean) * rstd)) as f64);
        let (mean_d, mean_dx) = ((sum_d / n) as f32, (sum_dx / n) as f32);
        for (((o, v), d), w) in dxg.iter_mut().zip(xg).zip(gg).zip(w) {
            let xhat = (*v - mean) * rstd;
            *o = rstd * (*d * w - mean_d - xhat * mean_dx);
        }
        return;
    }
    let (mut sum_d, mut sum_dx) = (0.0f64, 0.0f64);
    for (c, (xc, gc)) in xg.chunks(spatial).zip(gg.chunks(spatial)).enumerate() {
        let s_dy = sum3(gc, gc, gc, |d, _, _| d as f64);
        let s_dyx = sum3(xc, gc, gc, |v, d, _| (d * ((v - mean) * rstd)) as f64);
        db[c] += s_dy as f32;
        dw[c] += s_dyx as f32;
        sum_d += s_dy * w[c] as f64;
        sum_dx += s_dyx * w[c] as f64;
    }
    let (mean_d, mean_dx) = ((sum_d / n) as f32, (sum_dx / n) as f32);
    for (c, ((dc, xc), gc)) in dxg
        .chunks_mut(spatial)
        .zip(xg.chunks(spatial))
        .zip(gg.chunks(spatial))
        .enumerate()
    {
        let w = w[c];
        for ((o, v), d) in dc.iter_mut().zip(xc).zip(gc) {
            let xhat = (*v - mean) * rstd;
            *o = rstd * (*d * w - mean_d - xhat * mean_dx);
        }
    }
}

// The same operands as `backward_group`, dispatched per instruction set.
#[allow(clippy::too_many_arguments)]
fn backward_group_dispatch(
    xg: &[f32],
    gg: &[f32],
    dxg: &mut [f32],
    w: &[f32],
    dw: &mut [f32],
    db: &mut [f32],
    spatial: usize,
    eps: f64,
) {
    multiversion!((xg: &[f32], gg: &[f32], dxg: &mut [f32], w: &[f32], dw: &mut [f32],
        db: &mut [f32], spatial: usize, eps: f64)
        => backward_group(xg, gg, dxg, w, dw, db, spatial, eps))
}

/// `(dx, dw, db)` for [`forward`], given its input and the output gradient.
pub fn backward(
    g: &NormGeom,
    x: &[f32],
    weight: &[f32],
    grad: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (cpg, glen, sample) = (g.channels / g.groups, g.group_len(), g.sample());
    let chunks = g.batch.clamp(1, AFFINE_GRAD_CHUNKS);
    let per_chunk = g.batch.div_ceil(chunks).max(1);
    let (dx, partials) =
        super::parallel::par_new(g.len(), per_chunk * sample, |chunk, dx_chunk| {
            let mut dw = vec![0.0f32; g.channels];
            let mut db = vec![0.0f32; g.channels];
            let first = chunk * per_chunk * sample;
            for (r, dxg) in dx_chunk.chunks_mut(glen.max(1)).enumerate() {
                let off = first + r * glen;
                let (xg, gg) = (&x[off..off + glen], &grad[off..off + glen]);
                let c0 = ((off / glen) % g.groups) * cpg;
                backward_group_dispatch(
                    xg,
                    gg,
                    dxg,
                    &weight[c0..c0 + cpg],
                    &mut dw[c0..c0 + cpg],
                    &mut db[c0..c0 + cpg],
                    g.spatial,
                    g.eps,
                );
            }
            (dw, db)
        });
    let (dw, db) = super::parallel::sum_in_order(partials, (g.channels, g.channels));
    (dx, dw, db)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values in `[-1.5, 2.5]`.
    fn values(n: usize, seed: u32) -> Vec<f32> {
        super::super::tests::test_values(n, seed)
            .iter()
            .map(|v| 2.0 * v + 0.5)
            .collect()
    }

    /// The loss `Σ y·t` for a fixed `t`, in f64.
    fn loss(g: &NormGeom, x: &[f32], w: &[f32], b: &[f32], t: &[f32]) -> f64 {
        forward(g, x, w, b)
            .iter()
            .zip(t)
            .map(|(y, t)| *y as f64 * *t as f64)
            .sum()
    }

    /// Every gradient against central finite differences of the forward pass.
    #[test]
    fn gradients_match_finite_differences() {
        for g in [
            NormGeom {
                batch: 3,
                channels: 4,
                spatial: 5,
                groups: 2,
                eps: 1e-5,
            },
            NormGeom {
                batch: 2,
                channels: 12,
                spatial: 1,
                groups: 1,
                eps: 1e-5,
            },
            NormGeom {
                batch: 19,
                channels: 2,
                spatial: 3,
                groups: 2,
                eps: 1e-6,
            },
        ] {
            let x = values(g.len(), 1);
            let w = values(g.channels, 2);
            let b = values(g.channels, 3);
            let t = values(g.len(), 4);
            let (dx, dw, db) = backward(&g, &x, &w, &t);
            let h = 1e-2f32;
            let fd = |f: &dyn Fn(f32) -> f64| (f(h) - f(-h)) / (2.0 * h as f64);
            for i in (0..g.len()).step_by(7) {
                let num = fd(&|e| {
                    let mut x = x.clone();
                    x[i] += e;
                    loss(&g, &x, &w, &b, &t)
                });
                assert!(
                    (num - dx[i] as f64).abs() < 2e-2 * (1.0 + num.abs()),
                    "{g:?} dx[{i}]: {} vs {num}",
                    dx[i]
                );
            }
            for c in 0..g.channels {
                let num_w = fd(&|e| {
                    let mut w = w.clone();
                    w[c] += e;
                    loss(&g, &x, &w, &b, &t)
                });
                let num_b = fd(&|e| {
                    let mut b = b.clone();
                    b[c] += e;
                    loss(&g, &x, &w, &b, &t)
                });
                assert!(
                    (num_w - dw[c] as f64).abs() < 1e-2 * (1.0 + num_w.abs()),
                    "dw[{c}]: {} vs {num_w}",
                    dw[c]
                );
                assert!(
                    (num_b - db[c] as f64).abs() < 1e-2 * (1.0 + num_b.abs()),
                    "db[{c}]: {} vs {num_b}",
                    db[c]
                );
            }
        }
    }

    #[test]
    fn forward_normalises_each_group() {
        let g = NormGeom {
            batch: 2,
            channels: 4,
            spatial: 6,
            groups: 2,
            eps: 0.0,
        };
        let x = values(g.len(), 9);
        let y = forward(&g, &x, &[1.0; 4], &[0.0; 4]);
        for group in y.chunks(12) {
            let mean = group.iter().map(|v| *v as f64).sum::<f64>() / 12.0;
            let var = group
                .iter()
                .map(|v| (*v as f64 - mean).powi(2))
                .sum::<f64>()
                / 12.0;
            assert!(
                mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-5,
                "mean {mean}, var {var}"
            );
        }
    }
}
