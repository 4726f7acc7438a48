//! 3x3 stride-1 convolutions with one pixel of zero padding by Winograd's minimal filtering
//! algorithm F(2x2, 3x3) (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks",
//! 2015), the way oneDNN's and cuDNN's Winograd convolutions compute them.
//!
//! Each 2x2 block of outputs is `Aᵀ [(G w Gᵀ) ⊙ (Bᵀ d B)] A` for the 4x4 input tile `d` that
//! covers it: 16 multiplications per channel pair instead of 36. Over a whole layer that is 16
//! GEMMs, one per position `ξ` of the 4x4 transformed tile:
//! `M[ξ] (cout x tiles) = U[ξ] (cout x cin) · V[ξ] (cin x tiles)`, with `U = G w Gᵀ` the
//! transformed weight and `V = Bᵀ d B` the transformed input tiles; then `Aᵀ M A` gives the
//! outputs. 2.25 times fewer multiply-adds than the direct convolution, for a transform of the
//! input and the output that is linear in their size.
//!
//! The transforms are written as loops over the tiles of one row (vectorised by the compiler):
//! splitting each padded input row into its even and odd columns turns the 4-wide, stride-2
//! tile windows into whole shifted vectors.
//!
//! Rounding differs from the direct sum (the transforms add and subtract inputs before the
//! products); the error stays at the level of `f32` rounding for F(2x2, 3x3), whose transforms
//! use only 0, ±1 and ±1/2. Every result depends on the geometry only, never on the thread count.

use std::cell::RefCell;

use rayon::prelude::*;

use super::bf16_gemm;
use super::conv::Conv2dGeom;
use super::gemm::{Product, matmul};

/// Transformed-tile positions: 4x4.
const TILE: usize = 16;

/// Below this many input or output channels (twice as many on maps under 8x8) the 16 GEMMs,
/// whose inner dimension is `cin`, do not pay for the transforms, which cost per channel and
/// pixel and run on rows of only `w/2` tiles. Such layers keep the column-matrix path (measured:
/// docs/benchmarks.md, "Kernel thresholds").
const MIN_CHANNELS: usize = 64;

/// Below this many output pixels in the batch the weight transform (`16·cout·cin` values, done
/// every call) costs about what the 2.25x fewer multiply-adds save: SD's 1280-channel 4x4 and
/// 8x8 levels at batch 1 keep the column-matrix path (measured on the SD 1.5 LoRA step:
/// docs/benchmarks.md, "Kernel thresholds").
const MIN_PIXELS: usize = 256;

/// [`MIN_PIXELS`] for products on the bf16 GEMM, whose column-matrix path reads the bf16 weight
/// in place where Winograd transforms and packs `16/9` as many values every call. Measured on
/// the same step in bf16 (s, two interleaved runs each): from 64 pixels 1.99 / 2.17, from 256
/// 1.66 / 1.65, from 1024 1.60 / 1.56, from 4096 1.75 / 1.70; at 512 px from 256 6.92 / 7.16,
/// from 1024 6.55 / 6.89, from 4096 7.00.
const MIN_PIXELS_BF16: usize = 1024;

/// The forward's tile GEMMs take about this many columns: the tiles of several small images side
/// by side, or a band of tile rows of a large one. Small enough that the transformed tiles
/// (`16·(cin + cout)` values per tile) stay in the core's cache. Measured on 2 threads (ms for
/// the forward with 64 / 128 / 256 tiles): 64 -> 64 channels at 32x32, batch 32: 8.7 / 9.1 /
/// 8.7; 128 -> 128 at 16x16: 7.5 / 7.7 / 10.0; 256 -> 128 at 8x8: 4.4 / 4.7 / 5.8; 192 -> 64 at
/// 32x32: 22.9 / 26.3 / 25.0; 128 -> 64 at 64x64, batch 8: 15.9 / 15.8 / 15.9.
const GROUP_TILES: usize = 64;

/// The same for the weight gradient, where the tiles are the GEMMs' inner dimension (ms with 64 /
/// 128 / 256 tiles, shapes as above): 12.3 / 12.6 / 14.4; 10.7 / 10.6 / 11.3; 6.2 / 6.5 / 6.9;
/// 30.3 / 30.5 / 38.1; 19.8 / 19.4 / 23.5; and 256 -> 256 at 8x8, batch 8: 2.8 / 4.1 / 4.2.
const WEIGHT_GROUP_TILES: usize = 64;

/// [`MIN_PIXELS_BF16`] when `g`'s products run on the bf16 kernel, else [`MIN_PIXELS`].
fn min_pixels(g: &Conv2dGeom) -> usize {
    if g.bf16 && bf16_gemm::available() {
        MIN_PIXELS_BF16
    } else {
        MIN_PIXELS
    }
}

/// Whether [`forward`] computes `g`: a 3x3 kernel, stride 1, padding 1, even output sizes,
/// enough channels on both sides ([`MIN_CHANNELS`]) and enough pixels ([`MIN_PIXELS`],
/// [`MIN_PIXELS_BF16`]; which also rules out empty maps).
pub(super) fn applies(g: &Conv2dGeom) -> bool {
    g.k == 3
        && g.stride == 1
        && g.pad == 1
        && g.h.is_multiple_of(2)
        && g.w.is_multiple_of(2)
        && g.cin >= MIN_CHANNELS
        && g.cout >= MIN_CHANNELS
        && g.batch * g.h * g.w >= min_pixels(g)
        && (g.h * g.w >= 64 || g.cin.min(g.cout) >= 2 * MIN_CHANNELS)
}

/// How a convolution's tiles are cut into GEMMs of about `target` columns: whole images side
/// by side (`group` of them) when an image has at most `target` tiles, else one image at a time
/// in bands of `band` tile rows.
#[derive(Debug, Clone, Copy)]
struct Blocking {
    group: usize,
    band: usize,
}

impl Blocking {
    /// `max_group` bounds the images per group (the batch, or fewer to keep threads busy).
    fn new(g: &Conv2dGeom, target: usize, max_group: usize) -> Self {
        let (th, tw) = (g.h / 2, g.w / 2);
        let band = (target / tw).clamp(1, th);
        let group = if band < th {
            1
        } else {
            target.div_ceil(th * tw).min(max_group).max(1)
        };
        Blocking { group, band }
    }
}

/// The forward's blocking: up to [`GROUP_TILES`] tiles per GEMM, with at least as many groups as
/// threads when the batch allows. (Each output is the same sum whatever the blocking, so it may
/// depend on the thread count.)
fn forward_blocking(g: &Conv2dGeom) -> Blocking {
    let threads = rayon::current_num_threads().max(1);
    Blocking::new(g, GROUP_TILES, g.batch.div_ceil(threads))
}

/// The weight gradient's blocking: up to [`WEIGHT_GROUP_TILES`] tiles per GEMM, the GEMMs' inner
/// dimension. A function of the geometry only, as it fixes the summation order.
fn weight_blocking(g: &Conv2dGeom) -> Blocking {
    Blocking::new(g, WEIGHT_GROUP_TILES, g.batch)
}

/// Parallel GEMMs when fewer tasks than threads run them (a small batch); the split is over the
/// output, so the results are the same either way.
fn gemm_par(g: &Conv2dGeom, tasks: usize) -> Product {
    Product {
        parallel: tasks < rayon::current_num_threads(),
        bf16: g.bf16,
    }
}

/// Kernels transformed at a time: one vector of lanes.
const LANES: usize = 16;

/// `U[ξ][j] = (G w_j Gᵀ)[ξ]` for the consecutive 3x3 kernels `w_j` of `weights` (`[j][3][3]`),
/// into `u` at row stride `ld`, with
/// `G = [[1, 0, 0], [½, ½, ½], [½, -½, ½], [0, 0, 1]]`.
///
/// [`LANES`] kernels at a time, each tap a vector over the kernels: one at a time, with 16
/// scattered stores each, was a visible share of an SD LoRA step (docs/benchmarks.md).
fn transform_kernels(weights: &[f32], u: &mut [f32], ld: usize) {
    multiversion!((weights: &[f32], u: &mut [f32], ld: usize) =>
        transform_kernels_body(weights, u, ld))
}

/// `G` applied to a column `(a, b, c)`, lane by lane.
#[inline(always)]
fn g_column(a: &[f32; LANES], b: &[f32; LANES], c: &[f32; LANES]) -> [[f32; LANES]; 4] {
    let mut out = [*a, [0.0; LANES], [0.0; LANES], *c];
    for l in 0..LANES {
        out[1][l] = 0.5 * (a[l] + b[l] + c[l]);
        out[2][l] = 0.5 * (a[l] - b[l] + c[l]);
    }
    out
}

#[inline(always)]
fn transform_kernels_body(weights: &[f32], u: &mut [f32], ld: usize) {
    let n = weights.len() / 9;
    for j0 in (0..n).step_by(LANES) {
        let len = LANES.min(n - j0);
        // The taps of these kernels, tap-major.
        let mut w = [[0.0f32; LANES]; 9];
        for (l, kernel) in weights[j0 * 9..][..len * 9].chunks_exact(9).enumerate() {
            for (t, &v) in kernel.iter().enumerate() {
                w[t][l] = v;
            }
        }
        // G w, a column (of 3 taps) at a time: gw[b][n].
        let gw: [[[f32; LANES]; 4]; 3] =
            std::array::from_fn(|b| g_column(&w[b], &w[3 + b], &w[6 + b]));
        // (G w) Gᵀ, a row of G w at a time.
        for nrow in 0..4 {
            let row = g_column(&gw[0][nrow], &gw[1][nrow], &gw[2][nrow]);
            for (m, values) in row.iter().enumerate() {
                u[(nrow * 4 + m) * ld + j0..][..len].copy_from_slice(&values[..len]);
            }
        }
    }
}

/// `Gᵀ` applied to a column `(a, b, c, d)`, lane by lane:
/// `Gᵀ = [[1, ½, ½, 0], [0, ½, -½, 0], [0, ½, ½, 1]]`.
#[inline(always)]
fn gt_column(
    a: &[f32; LANES],
    b: &[f32; LANES],
    c: &[f32; LANES],
    d: &[f32; LANES],
) -> [[f32; LANES]; 3] {
    let mut out = [[0.0f32; LANES]; 3];
    for l in 0..LANES {
        out[0][l] = a[l] + 0.5 * (b[l] + c[l]);
        out[1][l] = 0.5 * (b[l] - c[l]);
        out[2][l] = 0.5 * (b[l] + c[l]) + d[l];
    }
    out
}

/// `dW_j = Gᵀ dU_j G` for the consecutive channel pairs `j0..j0 + dw.len() / 9` of `du`
/// (`[16][pairs]`), into `dw` (`[j][3][3]`): [`transform_kernels`]' adjoint, [`LANES`] pairs
/// at a time.
fn untransform_kernels(du: &[f32], pairs: usize, j0: usize, dw: &mut [f32]) {
    multiversion!((du: &[f32], pairs: usize, j0: usize, dw: &mut [f32]) =>
        untransform_kernels_body(du, pairs, j0, dw))
}

#[inline(always)]
fn untransform_kernels_body(du: &[f32], pairs: usize, j0: usize, dw: &mut [f32]) {
    for (c0, out) in dw.chunks_mut(LANES * 9).enumerate() {
        let (start, len) = (j0 + c0 * LANES, out.len() / 9);
        let mut at = [[0.0f32; LANES]; TILE];
        for (xi, v) in at.iter_mut().enumerate() {
            v[..len].copy_from_slice(&du[xi * pairs + start..][..len]);
        }
        // Gᵀ dU, a column m of dU at a time: t[m][i].
        let t: [[[f32; LANES]; 3]; 4] =
            std::array::from_fn(|m| gt_column(&at[m], &at[4 + m], &at[8 + m], &at[12 + m]));
        // (Gᵀ dU) G, a row i at a time.
        for i in 0..3 {
            let row = gt_column(&t[0][i], &t[1][i], &t[2][i], &t[3][i]);
            for (l, kernel) in out.chunks_exact_mut(9).enumerate() {
                for (j, values) in row.iter().enumerate() {
                    kernel[i * 3 + j] = values[l];
                }
            }
        }
    }
}

/// The transformed weight as the 16 GEMMs read it.
enum Transformed {
    /// `U[o][ξ][c]`: for each `ξ`, a `cout x cin` matrix at row stride `16·cin`.
    F32(Vec<f32>),
    /// For products on the bf16 GEMM, each `U[ξ]` packed once for all the tile blocks (packing
    /// it for each block of 64 tiles cost as much as the products), made a block of output
    /// channels at a time: `U` never exists whole in f32.
    Bf16(Vec<bf16_gemm::PackedLhs>),
}

impl Transformed {
    /// One output channel (f32) or block of them (bf16) per task.
    fn new(g: &Conv2dGeom, weight: &[f32]) -> Self {
        let (cin, cout) = (g.cin, g.cout);
        // The kernels of output channels `os`, consecutive in the weight.
        let of = |os: std::ops::Range<usize>| &weight[os.start * cin * 9..os.end * cin * 9];
        if g.bf16 && bf16_gemm::available() {
            // `values` is `[ξ][block rows][cin]` for output channels `os`.
            let rows = |os: std::ops::Range<usize>, values: &mut [f32]| {
                let ld = values.len() / TILE;
                transform_kernels(of(os), values, ld);
            };
            return Transformed::Bf16(bf16_gemm::PackedLhs::many(TILE, (cout, cin), rows));
        }
        let mut u = vec![0.0f32; TILE * cout * cin];
        u.par_chunks_mut(TILE * cin)
            .enumerate()
            .for_each(|(o, uo)| transform_kernels(of(o..o + 1), uo, cin));
        Transformed::F32(u)
    }
}

/// Per-thread buffers, kept between calls: `(v, m, rows)`.
#[derive(Default)]
struct Scratch {
    /// Transformed input tiles `[16][cin][group·tiles]`.
    v: Vec<f32>,
    /// GEMM results `[16][cout][group·tiles]`, or in the weight gradient the transformed output
    /// gradients.
    m: Vec<f32>,
    /// One image channel's rows transformed along x: `[h+2][4][w/2]`, plus the even and odd
    /// columns of one padded row.
    rows: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// The tile rows `ty0..ty1` of one image: where the transforms read and write.
#[derive(Debug, Clone, Copy)]
struct Band {
    h: usize,
    w: usize,
    ty0: usize,
    ty1: usize,
}

impl Band {
    /// Up to `rows` tile rows of `g`'s maps from tile row `ty0`.
    fn at(g: &Conv2dGeom, ty0: usize, rows: usize) -> Band {
        Band {
            h: g.h,
            w: g.w,
            ty0,
            ty1: (ty0 + rows).min(g.h / 2),
        }
    }
    fn tw(&self) -> usize {
        self.w / 2
    }
    /// Tiles in the band.
    fn tiles(&self) -> usize {
        (self.ty1 - self.ty0) * self.tw()
    }
}

/// Writes `Bᵀ d B` of the band's tiles of channel plane `x` (`[h, w]`) into `v` at
/// `v[ξ·stride + t]`, `t = (ty - ty0)·tw + tx`.
/// `Bᵀ = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]`.
/// `rows` holds `(h+2)·4·(w/2) + 2·(w/2 + 1)` values.
fn transform_input(x: &[f32], band: Band, v: &mut [f32], stride: usize, rows: &mut [f32]) {
    multiversion!((x: &[f32], band: Band, v: &mut [f32], stride: usize, rows: &mut [f32]) =>
        transform_input_body(x, band, v, stride, rows))
}

#[inline(always)]
fn transform_input_body(x: &[f32], band: Band, v: &mut [f32], stride: usize, rows: &mut [f32]) {
    let (h, w, tw) = (band.h, band.w, band.tw());
    // Padded rows 2·ty0 ..= 2·ty1 + 1 (of h + 2), each split into even e[k] = p[2k] and odd
    // o[k] = p[2k+1], k = 0..=tw: p[0] = 0, p[i+1] = x[i], p[w+1] = 0.
    let (y0, y1) = (2 * band.ty0, 2 * band.ty1 + 2);
    let (xt, eo) = rows.split_at_mut((h + 2) * 4 * tw);
    let (e, o) = eo.split_at_mut(tw + 1);
    let o = &mut o[..tw + 1];
    for y in y0..y1 {
        let dst = &mut xt[(y - y0) * 4 * tw..][..4 * tw];
        if y == 0 || y == h + 1 {
            dst.fill(0.0);
            continue;
        }
        let src = &x[(y - 1) * w..][..w];
        e[0] = 0.0;
        o[tw] = 0.0;
        for ((pair, ek), ok) in src.chunks_exact(2).zip(&mut e[1..]).zip(&mut o[..tw]) {
            *ok = pair[0];
            *ek = pair[1];
        }
        // The tile at tx covers p[2tx..2tx+4] = e[tx], o[tx], e[tx+1], o[tx+1].
        let (e0, e1, o0, o1) = (&e[..tw], &e[1..], &o[..tw], &o[1..]);
        let (d0, rest) = dst.split_at_mut(tw);
        let (d1, rest) = rest.split_at_mut(tw);
        let (d2, d3) = rest.split_at_mut(tw);
        for i in 0..tw {
            d0[i] = e0[i] - e1[i];
            d1[i] = o0[i] + e1[i];
            d2[i] = e1[i] - o0[i];
            d3[i] = o0[i] - o1[i];
        }
    }
    for ty in 0..band.ty1 - band.ty0 {
        for m in 0..4 {
            let r = |i: usize| &xt[((2 * ty + i) * 4 + m) * tw..][..tw];
            let (r0, r1, r2, r3) = (r(0), r(1), r(2), r(3));
            let at = |n: usize| (n * 4 + m) * stride + ty * tw;
            for (d, (a, b)) in v[at(0)..][..tw].iter_mut().zip(r0.iter().zip(r2)) {
                *d = a - b;
            }
            for (d, (a, b)) in v[at(1)..][..tw].iter_mut().zip(r1.iter().zip(r2)) {
                *d = a + b;
            }
            for (d, (a, b)) in v[at(2)..][..tw].iter_mut().zip(r2.iter().zip(r1)) {
                *d = a - b;
            }
            for (d, (a, b)) in v[at(3)..][..tw].iter_mut().zip(r1.iter().zip(r3)) {
                *d = a - b;
            }
        }
    }
}

/// Writes `Aᵀ M A + bias` for the band's tiles into one output channel plane `y` (`[h, w]`), from
/// `m[ξ·stride + t]`. `Aᵀ = [[1, 1, 1, 0], [0, 1, -1, -1]]`. `tmp` holds `4·w/2` values.
fn transform_output(
    m: &[f32],
    stride: usize,
    band: Band,
    bias: f32,
    y: &mut [f32],
    tmp: &mut [f32],
) {
    multiversion!((m: &[f32], stride: usize, band: Band, bias: f32, y: &mut [f32], tmp: &mut [f32]) =>
        transform_output_body(m, stride, band, bias, y, tmp))
}

#[inline(always)]
fn transform_output_body(
    m: &[f32],
    stride: usize,
    band: Band,
    bias: f32,
    y: &mut [f32],
    tmp: &mut [f32],
) {
    let (w, tw) = (band.w, band.tw());
    let (s0, s1) = tmp[..4 * tw].split_at_mut(2 * tw);
    let (top0, bottom0) = s0.split_at_mut(tw);
    let (top1, bottom1) = s1.split_at_mut(tw);
    for ty in 0..band.ty1 - band.ty0 {
        let row = |n: usize, k: usize| &m[(n * 4 + k) * stride + ty * tw..][..tw];
        // Along x: s0[n] = m[n][0] + m[n][1] + m[n][2], s1[n] = m[n][1] - m[n][2] - m[n][3];
        // then along y: top = s[0] + s[1] + s[2], bottom = s[1] - s[2] - s[3].
        for n in 0..4 {
            let (a, b, c, d) = (row(n, 0), row(n, 1), row(n, 2), row(n, 3));
            let (top_sign, bottom_sign) = match n {
                0 => (1.0, 0.0),
                1 => (1.0, 1.0),
                2 => (1.0, -1.0),
                _ => (0.0, -1.0),
            };
            for tx in 0..tw {
                let (v0, v1) = (a[tx] + b[tx] + c[tx], b[tx] - c[tx] - d[tx]);
                if n == 0 {
                    top0[tx] = v0 + bias;
                    top1[tx] = v1 + bias;
                    bottom0[tx] = bias;
                    bottom1[tx] = bias;
                } else {
                    top0[tx] += top_sign * v0;
                    top1[tx] += top_sign * v1;
                    bottom0[tx] += bottom_sign * v0;
                    bottom1[tx] += bottom_sign * v1;
                }
            }
        }
        let oy = 2 * (band.ty0 + ty);
        let (top, bottom) = y[oy * w..][..2 * w].split_at_mut(w);
        for (p, (a, b)) in top.chunks_exact_mut(2).zip(top0.iter().zip(&*top1)) {
            p[0] = *a;
            p[1] = *b;
        }
        for (p, (a, b)) in bottom
            .chunks_exact_mut(2)
            .zip(bottom0.iter().zip(&*bottom1))
        {
            p[0] = *a;
            p[1] = *b;
        }
    }
}

/// Writes `A dY Aᵀ` of the band's 2x2 tiles of one output-gradient plane `dy` (`[h, w]`) into
/// `gt[ξ·stride + t]`, `A = [[1, 0], [1, 1], [1, -1], [0, -1]]`. `tmp` holds `4·w/2` values.
fn transform_grad(dy: &[f32], band: Band, gt: &mut [f32], stride: usize, tmp: &mut [f32]) {
    multiversion!((dy: &[f32], band: Band, gt: &mut [f32], stride: usize, tmp: &mut [f32]) =>
        transform_grad_body(dy, band, gt, stride, tmp))
}

#[inline(always)]
fn transform_grad_body(dy: &[f32], band: Band, gt: &mut [f32], stride: usize, tmp: &mut [f32]) {
    let (w, tw) = (band.w, band.tw());
    let (ab, cd) = tmp[..4 * tw].split_at_mut(2 * tw);
    let (a, b) = ab.split_at_mut(tw);
    let (c, d) = cd.split_at_mut(tw);
    for ty in 0..band.ty1 - band.ty0 {
        // The tile's gradient [[a, b], [c, d]], split out of its two rows.
        let oy = 2 * (band.ty0 + ty);
        let (top, bottom) = dy[oy * w..][..2 * w].split_at(w);
        for (((t, bo), (a, b)), (c, d)) in top
            .chunks_exact(2)
            .zip(bottom.chunks_exact(2))
            .zip(a.iter_mut().zip(b.iter_mut()))
            .zip(c.iter_mut().zip(d.iter_mut()))
        {
            (*a, *b, *c, *d) = (t[0], t[1], bo[0], bo[1]);
        }
        // Rows of A dY: (a, b), (a + c, b + d), (a - c, b - d), (-c, -d); each row (p, q)
        // becomes (p, p + q, p - q, -q).
        let base = ty * tw;
        for n in 0..4 {
            let (sa, sc) = match n {
                0 => (1.0, 0.0),
                1 => (1.0, 1.0),
                2 => (1.0, -1.0),
                _ => (0.0, -1.0),
            };
            let row = |k: usize| (n * 4 + k) * stride + base;
            let (r0, r1, r2, r3) = (row(0), row(1), row(2), row(3));
            for tx in 0..tw {
                let (p, q) = (sa * a[tx] + sc * c[tx], sa * b[tx] + sc * d[tx]);
                gt[r0 + tx] = p;
                gt[r1 + tx] = p + q;
                gt[r2 + tx] = p - q;
                gt[r3 + tx] = -q;
            }
        }
    }
}

/// This thread's scratch buffers, grown to `(v, m_or_gt, rows)` lengths for `f`. They are taken
/// out of the thread's slot for the duration, so a nested call (gemm's threads running another
/// group on this thread) starts from empty buffers instead of sharing them.
fn with_scratch<R>(
    lens: (usize, usize, usize),
    f: impl FnOnce(&mut [f32], &mut [f32], &mut [f32]) -> R,
) -> R {
    let mut s = SCRATCH.with(|cell| std::mem::take(&mut *cell.borrow_mut()));
    let grow = |b: &mut Vec<f32>, n: usize| {
        if b.len() < n {
            b.resize(n, 0.0);
        }
    };
    grow(&mut s.v, lens.0);
    grow(&mut s.m, lens.1);
    grow(&mut s.rows, lens.2);
    let r = f(
        &mut s.v[..lens.0],
        &mut s.m[..lens.1],
        &mut s.rows[..lens.2],
    );
    SCRATCH.with(|cell| *cell.borrow_mut() = s);
    r
}

/// `rows` scratch for transforms of `g`'s planes.
fn rows_len(g: &Conv2dGeom) -> usize {
    (g.h + 2) * 4 * (g.w / 2) + 2 * (g.w / 2 + 1)
}

/// `y = conv2d(x, weight) + bias` for a geometry [`applies`] accepts, `[batch, cout, h, w]`.
pub(super) fn forward(g: &Conv2dGeom, x: &[f32], weight: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    debug_assert!(applies(g));
    let (h, w, cin, cout) = (g.h, g.w, g.cin, g.cout);
    let (th, tw, plane) = (h / 2, w / 2, h * w);
    let u = Transformed::new(g, weight);
    let Blocking { group, band } = forward_blocking(g);
    let most = group * band * tw;
    let lens = (TILE * cin * most, TILE * cout * most, rows_len(g));
    if g.batch.div_ceil(group) < rayon::current_num_threads() && band < th {
        return forward_by_bands(g, x, &u, bias, band, lens);
    }
    let par = gemm_par(g, g.batch.div_ceil(group));
    let (y, _) = super::parallel::par_new(g.output_len(), group * cout * plane, |chunk, ys| {
        let images = ys.len() / (cout * plane);
        with_scratch(lens, |v, m, rows| {
            for ty0 in (0..th).step_by(band) {
                let b = Band::at(g, ty0, band);
                let (bt, ld) = (b.tiles(), images * b.tiles());
                for gi in 0..images {
                    let xb = &x[(chunk * group + gi) * cin * plane..][..cin * plane];
                    for (c, xc) in xb.chunks_exact(plane).enumerate() {
                        transform_input(xc, b, &mut v[c * ld + gi * bt..], cin * ld, rows);
                    }
                }
                forward_gemms(g, &u, v, m, ld, par);
                for (gi, yb) in ys.chunks_mut(cout * plane).enumerate() {
                    for (o, yo) in yb.chunks_mut(plane).enumerate() {
                        let bias = bias.map_or(0.0, |b| b[o]);
                        transform_output(&m[o * ld + gi * bt..], cout * ld, b, bias, yo, rows);
                    }
                }
            }
        })
    });
    y
}

/// The forward's 16 GEMMs `M[ξ] (cout x ld) = U[ξ] (cout x cin) · V[ξ] (cin x ld)`.
fn forward_gemms(
    g: &Conv2dGeom,
    u: &Transformed,
    v: &[f32],
    m: &mut [f32],
    ld: usize,
    par: Product,
) {
    let (cin, cout) = (g.cin, g.cout);
    for xi in 0..TILE {
        let (dst, vxi) = (
            &mut m[xi * cout * ld..][..cout * ld],
            &v[xi * cin * ld..][..cin * ld],
        );
        match u {
            Transformed::F32(u) => {
                let uxi = (&u[xi * cin..], TILE * cin, 1);
                matmul(dst, (cout, ld, cin), false, uxi, (vxi, ld, 1), par)
            }
            Transformed::Bf16(u) => {
                bf16_gemm::matmul_lhs_packed(dst, ld, false, &u[xi], (vxi, ld, 1), par.parallel)
            }
        }
    }
}

/// [`forward`] when there are fewer images than threads (batch 1, as in Stable Diffusion
/// fine-tuning) and each image has several bands: the bands run in parallel, each into its own
/// block of output rows, copied into place at the end.
fn forward_by_bands(
    g: &Conv2dGeom,
    x: &[f32],
    u: &Transformed,
    bias: Option<&[f32]>,
    band: usize,
    lens: (usize, usize, usize),
) -> Vec<f32> {
    let (h, w, cin, cout) = (g.h, g.w, g.cin, g.cout);
    let (th, plane) = (h / 2, h * w);
    let bands: Vec<Band> = (0..th)
        .step_by(band)
        .map(|ty0| Band::at(g, ty0, band))
        .collect();
    let blocks: Vec<Vec<f32>> = (0..g.batch * bands.len())
        .into_par_iter()
        .map(|task| {
            let (img, b) = (task / bands.len(), bands[task % bands.len()]);
            let (ld, out_rows) = (b.tiles(), 2 * (b.ty1 - b.ty0));
            // The block's own rows: the same band renumbered from tile row 0.
            let local = Band {
                ty0: 0,
                ty1: b.ty1 - b.ty0,
                ..b
            };
            let mut out = vec![0.0f32; cout * out_rows * w];
            with_scratch(lens, |v, m, rows| {
                let xb = &x[img * cin * plane..][..cin * plane];
                for (c, xc) in xb.chunks_exact(plane).enumerate() {
                    transform_input(xc, b, &mut v[c * ld..], cin * ld, rows);
                }
                forward_gemms(
                    g,
                    u,
                    v,
                    m,
                    ld,
                    Product {
                        parallel: false,
                        bf16: g.bf16,
                    },
                );
                for (o, yo) in out.chunks_mut(out_rows * w).enumerate() {
                    let bias = bias.map_or(0.0, |b| b[o]);
                    transform_output(&m[o * ld..], cout * ld, local, bias, yo, rows);
                }
            });
            out
        })
        .collect();
    let mut y = vec![0.0f32; g.output_len()];
    y.par_chunks_mut(plane).enumerate().for_each(|(bo, yo)| {
        let (img, o) = (bo / cout, bo % cout);
        for (b, block) in bands.iter().zip(&blocks[img * bands.len()..]) {
            let rows = 2 * (b.ty1 - b.ty0) * w;
            yo[2 * b.ty0 * w..][..rows].copy_from_slice(&block[o * rows..][..rows]);
        }
    });
    y
}

/// `dW = Gᵀ dU G` for every channel pair, `dU` `[16][cout][cin]`, into `[cout, cin, 3, 3]`.
fn untransform_weight_grad(g: &Conv2dGeom, du: &[f32]) -> Vec<f32> {
    let pairs = g.cout * g.cin;
    let mut dw = vec![0.0f32; pairs * 9];
    // Blocks of 64 vectors of pairs per task.
    let per_task = 64 * LANES;
    dw.par_chunks_mut(per_task * 9)
        .enumerate()
        .for_each(|(i, out)| untransform_kernels(du, pairs, i * per_task, out));
    dw
}

/// Weight and bias gradients of [`forward`]: `dU[ξ] = Σ_t (A dY_t Aᵀ)[ξ] · (Bᵀ d_t B)[ξ]ᵀ` over
/// every tile of every image, then `dW = Gᵀ dU G`. Images are summed in `chunks` fixed by the
/// batch size, each chunk's gradient formed and the chunks added in order, as in
/// [`super::conv::weight_grad`]: the result depends on the geometry only.
pub(super) fn weight_grad(
    g: &Conv2dGeom,
    x: &[f32],
    grad: &[f32],
    with_bias: bool,
    chunks: usize,
) -> (Vec<f32>, Vec<f32>) {
    debug_assert!(applies(g));
    let (h, w, cin, cout) = (g.h, g.w, g.cin, g.cout);
    let (th, tw, plane) = (h / 2, w / 2, h * w);
    let Blocking { group, band } = weight_blocking(g);
    let per_chunk = g
        .batch
        .div_ceil(chunks.max(1))
        .max(1)
        .next_multiple_of(group);
    let tasks = g.batch.div_ceil(per_chunk);
    let par = gemm_par(g, tasks);
    let most = group * band * tw;
    let lens = (TILE * cin * most, TILE * cout * most, rows_len(g));
    let bias_len = if with_bias { cout } else { 0 };
    let partials: Vec<(Vec<f32>, Vec<f32>)> = (0..tasks)
        .into_par_iter()
        .map(|chunk| {
            let mut du = vec![0.0f32; TILE * cout * cin];
            let mut db = vec![0.0f32; bias_len];
            with_scratch(lens, |v, gt, rows| {
                let end = ((chunk + 1) * per_chunk).min(g.batch);
                for b0 in (chunk * per_chunk..end).step_by(group) {
                    let b1 = (b0 + group).min(end);
                    for ty0 in (0..th).step_by(band) {
                        let b = Band::at(g, ty0, band);
                        let (bt, ld) = (b.tiles(), (b1 - b0) * b.tiles());
                        for img in b0..b1 {
                            let (xb, gb) = (&x[img * cin * plane..], &grad[img * cout * plane..]);
                            let col = (img - b0) * bt;
                            for (c, xc) in xb[..cin * plane].chunks_exact(plane).enumerate() {
                                transform_input(xc, b, &mut v[c * ld + col..], cin * ld, rows);
                            }
                            for (o, go) in gb[..cout * plane].chunks_exact(plane).enumerate() {
                                transform_grad(go, b, &mut gt[o * ld + col..], cout * ld, rows);
                            }
                        }
                        for xi in 0..TILE {
                            matmul(
                                &mut du[xi * cout * cin..][..cout * cin],
                                (cout, cin, ld),
                                true,
                                (&gt[xi * cout * ld..][..cout * ld], ld, 1),
                                (&v[xi * cin * ld..][..cin * ld], 1, ld),
                                par,
                            );
                        }
                    }
                    for (o, d) in db.iter_mut().enumerate() {
                        for img in b0..b1 {
                            *d += grad[(img * cout + o) * plane..][..plane]
                                .iter()
                                .sum::<f32>();
                        }
                    }
                }
            });
            (untransform_weight_grad(g, &du), db)
        })
        .collect();
    super::parallel::sum_in_order(partials, (cout * cin * 9, bias_len))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Geometries [`applies`] accepts: rectangular maps, a single 2x2 tile, several images per
    /// group with a short last group, more channels out than in and the reverse, banded maps.
    pub(in crate::kernels) fn geometries() -> Vec<Conv2dGeom> {
        let g = |batch, cin, h, w, cout| Conv2dGeom {
            batch,
            cin,
            h,
            w,
            cout,
            k: 3,
            stride: 1,
            pad: 1,
            bf16: false,
        };
        vec![
            g(8, 64, 8, 10, 65),
            g(17, 128, 4, 4, 128),
            g(64, 128, 2, 2, 128),
            g(5, 96, 10, 8, 64),
            // More tiles than a GEMM takes: bands of tile rows, the last one shorter (20 tile
            // rows of 18 in the forward, 12 of 12 in the weight gradient).
            g(2, 64, 40, 36, 64),
            g(3, 64, 24, 24, 64),
            // One image with several bands: the bands in parallel on 2+ threads.
            g(1, 64, 40, 36, 64),
        ]
    }

    fn pixel(g: &Conv2dGeom, x: &[f32], b: usize, c: usize, y: isize, xx: isize) -> f64 {
        if y < 0 || xx < 0 || y >= g.h as isize || xx >= g.w as isize {
            return 0.0;
        }
        x[((b * g.cin + c) * g.h + y as usize) * g.w + xx as usize] as f64
    }

    /// The direct convolution in f64.
    fn direct(g: &Conv2dGeom, x: &[f32], w: &[f32], bias: &[f32]) -> Vec<f64> {
        let mut y = vec![0.0f64; g.output_len()];
        for b in 0..g.batch {
            for o in 0..g.cout {
                for oy in 0..g.h {
                    for ox in 0..g.w {
                        let mut acc = bias[o] as f64;
                        for c in 0..g.cin {
                            for i in 0..3 {
                                for j in 0..3 {
                                    let (iy, ix) = (oy as isize + i - 1, ox as isize + j - 1);
                                    let wv = w[((o * g.cin + c) * 3 + i as usize) * 3 + j as usize];
                                    acc += wv as f64 * pixel(g, x, b, c, iy, ix);
                                }
                            }
                        }
                        y[((b * g.cout + o) * g.h + oy) * g.w + ox] = acc;
                    }
                }
            }
        }
        y
    }

    /// The direct weight gradient in f64: `dW[o, c, i, j] = Σ G[b, o, y, x] x[b, c, y+i-1, x+j-1]`.
    fn direct_weight_grad(g: &Conv2dGeom, x: &[f32], gr: &[f32]) -> Vec<f64> {
        let mut dw = vec![0.0f64; g.cout * g.cin * 9];
        for b in 0..g.batch {
            for o in 0..g.cout {
                for oy in 0..g.h {
                    for ox in 0..g.w {
                        let gv = gr[((b * g.cout + o) * g.h + oy) * g.w + ox] as f64;
                        for c in 0..g.cin {
                            for i in 0..3 {
                                for j in 0..3 {
                                    let (iy, ix) = (oy as isize + i - 1, ox as isize + j - 1);
                                    dw[((o * g.cin + c) * 3 + i as usize) * 3 + j as usize] +=
                                        gv * pixel(g, x, b, c, iy, ix);
                                }
                            }
                        }
                    }
                }
            }
        }
        dw
    }

    /// Largest error relative to the largest magnitude of the reference.
    fn relative_error(got: &[f32], want: &[f64]) -> f64 {
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let err = got
            .iter()
            .zip(want)
            .fold(0.0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
        err / scale
    }

    const G: [[f64; 3]; 4] = [
        [1.0, 0.0, 0.0],
        [0.5, 0.5, 0.5],
        [0.5, -0.5, 0.5],
        [0.0, 0.0, 1.0],
    ];

    #[test]
    fn the_kernel_transform_is_g_w_g_transposed_and_its_adjoint_is_g_transposed_du_g() {
        // 21 kernels: a whole vector of them and a partial one; into rows of 21 (dense) and of
        // 23 (the rest untouched).
        let n = LANES + 5;
        let w = super::super::tests::test_values(n * 9, 7);
        for ld in [n, n + 2] {
            let mut u = vec![-1.0f32; TILE * ld];
            transform_kernels(&w, &mut u, ld);
            for j in 0..n {
                let wj = &w[j * 9..][..9];
                for (a, ga) in G.iter().enumerate() {
                    for (b, gb) in G.iter().enumerate() {
                        let mut want = 0.0f64;
                        for p in 0..3 {
                            for q in 0..3 {
                                want += ga[p] * wj[p * 3 + q] as f64 * gb[q];
                            }
                        }
                        let got = u[(a * 4 + b) * ld + j] as f64;
                        assert!(
                            (got - want).abs() < 1e-6,
                            "kernel {j}, ξ {a},{b}: {got} vs {want}"
                        );
                    }
                }
            }
            for row in u.chunks(ld) {
                assert!(
                    row[n..].iter().all(|&v| v == -1.0),
                    "wrote past the kernels"
                );
            }
        }
        // <U(w), dU> = <w, Uᵀ(dU)> for the pairs from the third on.
        let du = super::super::tests::test_values(TILE * n, 8);
        let mut u = vec![0.0f32; TILE * n];
        transform_kernels(&w, &mut u, n);
        let mut dw = vec![0.0f32; (n - 2) * 9];
        untransform_kernels(&du, n, 2, &mut dw);
        let mut lhs = 0.0f64;
        for xi in 0..TILE {
            for j in 2..n {
                lhs += u[xi * n + j] as f64 * du[xi * n + j] as f64;
            }
        }
        let rhs: f64 = (w[18..].iter().zip(&dw))
            .map(|(&a, &b)| a as f64 * b as f64)
            .sum();
        assert!(
            (lhs - rhs).abs() < 1e-4 * lhs.abs().max(1.0),
            "{lhs} vs {rhs}"
        );
    }

    #[test]
    fn bf16_products_take_winograd_from_more_pixels() {
        // 8 images of 8x10: 640 output pixels.
        let mut g = geometries()[0];
        assert!(applies(&g));
        g.bf16 = true;
        assert_eq!(applies(&g), !bf16_gemm::available());
        g.batch = 13;
        assert!(applies(&g), "1040 output pixels");
    }

    #[test]
    fn forward_matches_the_direct_convolution() {
        let gs = geometries();
        assert!(gs.iter().any(|g| forward_blocking(g).band < g.h / 2));
        assert!(gs.iter().any(|g| weight_blocking(g).band < g.h / 2));
        assert!(gs.iter().any(|g| g.batch % weight_blocking(g).group != 0));
        for g in gs {
            assert!(applies(&g), "{g:?}");
            let x = super::super::tests::test_values(g.input_len(), 1);
            let w = super::super::tests::test_values(g.weight_len(), 2);
            let b = super::super::tests::test_values(g.cout, 3);
            let err = relative_error(&forward(&g, &x, &w, Some(&b)), &direct(&g, &x, &w, &b));
            assert!(err < 1e-6, "{g:?}: relative error {err}");
            let zero = vec![0.0; g.cout];
            let err = relative_error(&forward(&g, &x, &w, None), &direct(&g, &x, &w, &zero));
            assert!(err < 1e-6, "{g:?} without bias: relative error {err}");
        }
    }

    #[test]
    fn weight_grad_matches_the_direct_sum() {
        for g in geometries() {
            let x = super::super::tests::test_values(g.input_len(), 4);
            let gr = super::super::tests::test_values(g.output_len(), 5);
            let (dw, db) = weight_grad(&g, &x, &gr, true, 16);
            let err = relative_error(&dw, &direct_weight_grad(&g, &x, &gr));
            assert!(err < 1e-6, "{g:?}: relative error {err}");
            let plane = g.h * g.w;
            for (o, d) in db.iter().enumerate() {
                let want: f64 = (0..g.batch)
                    .flat_map(|b| &gr[(b * g.cout + o) * plane..][..plane])
                    .map(|v| *v as f64)
                    .sum();
                assert!(
                    (*d as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                    "db[{o}]"
                );
            }
        }
    }

    /// Several images per group, and one image whose bands run in parallel on 3 threads but in
    /// turn on 1.
    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let gs = geometries();
        for g in [gs[1], gs[gs.len() - 1]] {
            let x = super::super::tests::test_values(g.input_len(), 6);
            let w = super::super::tests::test_values(g.weight_len(), 7);
            let gr = super::super::tests::test_values(g.output_len(), 8);
            let run = |threads| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .map(|pool| {
                        pool.install(|| {
                            (
                                forward(&g, &x, &w, None),
                                weight_grad(&g, &x, &gr, true, 16),
                            )
                        })
                    })
            };
            assert_eq!(run(1).expect("pool"), run(3).expect("pool"), "{g:?}");
        }
    }
}
