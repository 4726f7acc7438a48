//! 2D convolution forward and backward on contiguous `f32` NCHW slices, as im2col + GEMM.
//!
//! This is what PyTorch's CPU path without oneDNN (`aten/src/ATen/native/ConvolutionMM2d.cpp`,
//! "slow_conv2d") does, and the reason it exists here is the backward pass: burn computes the
//! input gradient with a transposed convolution (a GEMM into a column buffer, then a
//! single-threaded scatter) and the weight gradient as a convolution whose kernel is the whole
//! output gradient. Here both are one small GEMM per image plus a copy, run in parallel over the
//! images of the batch:
//!
//! - forward: `y[b] = W · col(x[b]) + bias`, with `W` as `[cout, cin·k·k]`;
//! - input gradient: `dx[b] = col⁻¹(Wᵀ · g[b])` (col2im adds overlapping windows);
//! - weight gradient: `dW = Σ_b g[b] · col(x[b])ᵀ`, bias gradient `Σ_b Σ_hw g[b]`.
//!
//! The weight and bias gradients are sums over the batch. They are formed in a fixed number of
//! chunks of images, each summed in image order, and the chunks are added in order, so the result
//! depends on the batch size only, never on the thread count or on rayon's scheduling: a run
//! replays bitwise (checkpoint-resume tests rely on it).
//!
//! Square kernels, one stride and one padding for both axes, no dilation, no groups: the layers
//! in [`crate::nn`] never use more.

use rayon::prelude::*;

use super::gemm::{Product, matmul};
use burn::tensor::bf16;

/// A convolution's weight `[cout, cin, k, k]` as the kernels get it: f32, or bf16 as stored.
/// bf16 is for products on the bf16 GEMM ([`Product::bf16`]), which packs the stored values
/// without an f32 copy. At SD's deep levels (1280 channels on 4x4 and 8x8 maps, batch 1) a
/// weight holds as many values as the products do multiply-adds per value, so copying it costs
/// about as much as using it.
#[derive(Clone, Copy)]
pub enum Weights<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

impl<'a> Weights<'a> {
    /// The values in f32 (widened when bf16), for the paths that transform or rearrange them.
    fn to_f32(self) -> std::borrow::Cow<'a, [f32]> {
        match self {
            Weights::F32(w) => std::borrow::Cow::Borrowed(w),
            Weights::Bf16(w) => {
                std::borrow::Cow::Owned(super::convert::convert_par(w, super::convert::widen_bf16))
            }
        }
    }
}

/// `dst (+)= w · rhs` as [`matmul`], with the weight (at strides `rs`, `cs`) on the left.
fn weight_matmul(
    dst: &mut [f32],
    dims: (usize, usize, usize),
    accumulate: bool,
    (w, rs, cs): (Weights, usize, usize),
    rhs: (&[f32], usize, usize),
    how: Product,
) {
    match w {
        Weights::F32(w) => matmul(dst, dims, accumulate, (w, rs, cs), rhs, how),
        Weights::Bf16(w) => {
            super::bf16_gemm::matmul(dst, dims, accumulate, (w, rs, cs), rhs, how.parallel)
        }
    }
}

/// The shape of one convolution: input `[batch, cin, h, w]`, weight `[cout, cin, k, k]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dGeom {
    pub batch: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
    /// The input and weight are bf16 (mixed precision): products run on the bf16 kernel
    /// ([`Product::bf16`]).
    pub bf16: bool,
}

/// At most this many partial sums of the weight gradient (one per chunk of images); a fixed
/// number so that the summation order does not depend on the machine.
const WEIGHT_GRAD_CHUNKS: usize = 16;

impl Conv2dGeom {
    pub fn out_h(&self) -> usize {
        (self.h + 2 * self.pad - self.k) / self.stride + 1
    }
    pub fn out_w(&self) -> usize {
        (self.w + 2 * self.pad - self.k) / self.stride + 1
    }
    /// Rows of the column matrix: `cin·k·k`.
    fn rows(&self) -> usize {
        self.cin * self.k * self.k
    }
    /// Columns of the column matrix: output pixels per image.
    fn cols(&self) -> usize {
        self.out_h() * self.out_w()
    }
    fn image_in(&self) -> usize {
        self.cin * self.h * self.w
    }
    fn image_out(&self) -> usize {
        self.cout * self.cols()
    }
    /// A 1x1 stride-1 unpadded convolution: the image itself is the column matrix.
    fn is_pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.pad == 0
    }
    pub fn input_len(&self) -> usize {
        self.batch * self.image_in()
    }
    pub fn output_len(&self) -> usize {
        self.batch * self.image_out()
    }
    pub fn weight_len(&self) -> usize {
        self.cout * self.rows()
    }
    /// How each per-image GEMM runs: alone when there are at least as many images as threads
    /// (the images already keep every thread busy), else spread over the threads (batch 1, as
    /// in Stable Diffusion fine-tuning).
    fn gemm_par(&self) -> Product {
        Product {
            parallel: self.batch < rayon::current_num_threads(),
            bf16: self.bf16,
        }
    }
}

/// The valid output range `lo..hi` along one axis for kernel offset `i`: those `o` with
/// `0 <= o·stride + i - pad < size`.
fn valid_range(out: usize, size: usize, stride: usize, pad: usize, i: usize) -> (usize, usize) {
    // o·s + i >= pad  <=>  o >= ceil((pad - i) / s)
    let lo = if i >= pad {
        0
    } else {
        (pad - i).div_ceil(stride)
    };
    // o·s + i - pad <= size - 1  <=>  o <= (size - 1 + pad - i) / s
    let hi = if size + pad < i + 1 {
        0
    } else {
        ((size - 1 + pad - i) / stride + 1).min(out)
    };
    (lo.min(hi), hi)
}

/// `col[(c·k + i)·k + j, oy·ow + ox] = x[c, oy·s + i - p, ox·s + j - p]` (0 outside).
fn im2col(g: &Conv2dGeom, x: &[f32], col: &mut [f32]) {
    let (oh, ow, l) = (g.out_h(), g.out_w(), g.cols());
    for c in 0..g.cin {
        let plane = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for i in 0..g.k {
            let (ylo, yhi) = valid_range(oh, g.h, g.stride, g.pad, i);
            for j in 0..g.k {
                let (xlo, xhi) = valid_range(ow, g.w, g.stride, g.pad, j);
                let row = &mut col[((c * g.k + i) * g.k + j) * l..][..l];
                row[..ylo * ow].fill(0.0);
                row[yhi * ow..].fill(0.0);
                for oy in ylo..yhi {
                    let out = &mut row[oy * ow..(oy + 1) * ow];
                    out[..xlo].fill(0.0);
                    out[xhi..].fill(0.0);
                    let iy = oy * g.stride + i - g.pad;
                    let src = &plane[iy * g.w..(iy + 1) * g.w];
                    if g.stride == 1 {
                        let ix0 = xlo + j - g.pad;
                        out[xlo..xhi].copy_from_slice(&src[ix0..ix0 + (xhi - xlo)]);
                    } else {
                        for (ox, o) in out[xlo..xhi].iter_mut().enumerate() {
                            *o = src[(ox + xlo) * g.stride + j - g.pad];
                        }
                    }
                }
            }
        }
    }
}

/// The adjoint of [`im2col`]: `dx[c, iy, ix] += col[...]` over every window covering it.
fn col2im_add(g: &Conv2dGeom, col: &[f32], dx: &mut [f32]) {
    let (oh, ow, l) = (g.out_h(), g.out_w(), g.cols());
    for c in 0..g.cin {
        let plane = &mut dx[c * g.h * g.w..(c + 1) * g.h * g.w];
        for i in 0..g.k {
            let (ylo, yhi) = valid_range(oh, g.h, g.stride, g.pad, i);
            for j in 0..g.k {
                let (xlo, xhi) = valid_range(ow, g.w, g.stride, g.pad, j);
                let row = &col[((c * g.k + i) * g.k + j) * l..][..l];
                for oy in ylo..yhi {
                    let src = &row[oy * ow..(oy + 1) * ow];
                    let iy = oy * g.stride + i - g.pad;
                    let dst = &mut plane[iy * g.w..(iy + 1) * g.w];
                    if g.stride == 1 {
                        let ix0 = xlo + j - g.pad;
                        for (d, s) in dst[ix0..ix0 + (xhi - xlo)].iter_mut().zip(&src[xlo..xhi]) {
                            *d += *s;
                        }
                    } else {
                        for ox in xlo..xhi {
                            dst[ox * g.stride + j - g.pad] += src[ox];
                        }
                    }
                }
            }
        }
    }
}

/// How one image becomes the column matrix the GEMM reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// 1x1, stride 1, no padding: the image is the column matrix.
    Pointwise,
    /// Stride 1: the image is zero-padded once to `[cin, h+2p, w+2p]`; then the output is computed
    /// on the padded width (`oh` rows of `w+2p`, the last `k-1` of each row discarded) and every
    /// row of the column matrix is one contiguous slice of the padded image, so im2col is `cin·k²`
    /// long copies and col2im `cin·k²` long vector adds instead of one short copy per output row.
    PaddedRows,
    /// Any stride: classic im2col over the output grid.
    Strided,
}

impl Conv2dGeom {
    fn plan(&self) -> Plan {
        if self.is_pointwise() {
            Plan::Pointwise
        } else if self.stride == 1 {
            Plan::PaddedRows
        } else {
            Plan::Strided
        }
    }
    fn padded_w(&self) -> usize {
        self.w + 2 * self.pad
    }
    fn padded_plane(&self) -> usize {
        (self.h + 2 * self.pad) * self.padded_w()
    }
    /// Columns of the GEMM: output pixels, or for [`Plan::PaddedRows`] the span from the first to
    /// the last output pixel on the padded-width grid, rounded up to a multiple of
    /// [`GEMM_ALIGN`]. The extra columns read the zero slack after the padded image and are
    /// discarded like the gaps between rows.
    fn gemm_cols(&self) -> usize {
        match self.plan() {
            Plan::PaddedRows => {
                ((self.out_h() - 1) * self.padded_w() + self.out_w()).next_multiple_of(GEMM_ALIGN)
            }
            _ => self.cols(),
        }
    }
    /// The zero-padded image buffer: `cin` padded planes plus the slack the rounded-up GEMM width
    /// reads past the last one.
    fn padded_len(&self) -> usize {
        self.cin * self.padded_plane() + GEMM_ALIGN
    }
}

/// See [`input_grad`] (measured on the tutorial U-Net's shapes: docs/benchmarks.md, "Kernel thresholds").
const ADJOINT_MIN_CIN: usize = 8;

/// gemm copies ("packs") its left operand, which for the forward is the column matrix, unless the
/// operand's row count is a multiple of the vector width (16 `f32` with AVX-512): `PaddedRows`
/// rounds its GEMM width up to this so the column matrix is read in place.
const GEMM_ALIGN: usize = 16;

/// Per-thread buffers for one image at a time, kept between calls (see [`with_scratch`]). Every
/// user writes each element it later reads, so nothing is cleared on reuse.
#[derive(Default)]
struct Scratch {
    /// The column matrix `[cin·k·k, gemm_cols]`.
    col: Vec<f32>,
    /// The zero-padded image `[cin, h+2p, w+2p]` (or its gradient), plus slack.
    padded: Vec<f32>,
    /// An output-shaped matrix on the GEMM's grid `[cout, gemm_cols]`.
    grid: Vec<f32>,
}

/// What scratch buffers are for: the banded forward needs less than the gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Forward,
    Gradient,
}

/// The buffer lengths one image of `g` needs: `(col, padded, grid)`.
fn scratch_lens(g: &Conv2dGeom, purpose: Purpose) -> (usize, usize, usize) {
    let (kk, n) = (g.rows(), g.gemm_cols());
    match g.plan() {
        Plan::Pointwise => (0, 0, 0),
        Plan::Strided => (kk * n, 0, 0),
        Plan::PaddedRows => {
            // The forward needs one band (see `band_rows`); the gradients the whole image.
            let (_, nb) = g.band_cols(0, g.band_rows());
            let band = if g.shifted() {
                g.cin * g.k * (nb + (g.k - 1) * g.padded_w())
            } else {
                kk * nb
            };
            let whole = (kk * n).max(g.cin * g.k * shifted_len(g));
            // A group of images (only when one band holds a whole image, so `nb == n`).
            let group = if purpose == Purpose::Gradient {
                g.weight_group()
            } else {
                1
            };
            (
                group
                    * if purpose == Purpose::Forward {
                        band
                    } else {
                        whole
                    },
                g.padded_len(),
                group * g.cout * if purpose == Purpose::Forward { nb } else { n },
            )
        }
    }
}

/// Row length of the horizontally shifted copies ([`Conv2dGeom::shifted`]): the GEMM width plus
/// the `k-1` padded rows the vertical taps reach past it.
fn shifted_len(g: &Conv2dGeom) -> usize {
    g.gemm_cols() + (g.k - 1) * g.padded_w()
}

/// Below this GEMM width (output pixels on the padded grid) the stride-1 forward and weight
/// gradient use the full column matrix: the shifted form pays off on large maps only
/// (measured: docs/benchmarks.md, "Kernel thresholds").
const SHIFTED_MIN_COLS: usize = 512;

/// The weight gradient's shifted form also needs this many output channels (see
/// [`weight_grad`]).
const SHIFTED_MIN_COUT: usize = 32;

impl Conv2dGeom {
    /// Whether a stride-1 convolution multiplies "shifted copies" instead of the column matrix.
    ///
    /// The column matrix has `cin·k·k` rows, each a shifted slice of the padded image. Keeping only
    /// the `cin·k` horizontal shifts `S[(c, j), q] = padded[c, q + j]` (rows of [`shifted_len`]),
    /// the rows for vertical tap `i` are `S` offset by `i·wp`: a plain strided matrix. So the
    /// convolution is `k` GEMMs of inner dimension `cin·k` over `S` read in place, with a third of
    /// the copying. The price is `k` passes over the output instead of one, which only pays
    /// when the image is large next to the channel count.
    fn shifted(&self) -> bool {
        self.plan() == Plan::PaddedRows && self.gemm_cols() >= SHIFTED_MIN_COLS
    }

    /// Whether a stride-1 convolution multiplies a compact column matrix: `oh·ow` columns per
    /// image instead of the padded-width grid's `(oh-1)·(w+2p) + ow`. On a small map the grid's
    /// discarded columns are a large share of the work (80 columns for 64 pixels at 8x8, 288 for
    /// 256 at 16x16); its rows cannot be read off the padded image in one piece
    /// ([`im2col_compact`]), which pays on small maps only (large ones take the shifted form).
    /// Needs `oh·ow` to be a multiple of [`GEMM_ALIGN`] so gemm reads the matrix in place.
    fn compact(&self) -> bool {
        self.plan() == Plan::PaddedRows
            && !self.shifted()
            && self.band_rows() == self.out_h()
            && self.cols().is_multiple_of(GEMM_ALIGN)
    }

    /// Images whose compact column matrices sit side by side in one weight-gradient GEMM, whose
    /// inner dimension is otherwise one image's `oh·ow` pixels: 64 at 8x8, where each call
    /// re-reads and re-writes the whole `[cin·k·k, cout]` gradient for 64 multiply-adds per
    /// element. About [`WEIGHT_GROUP_COLS`] pixels per GEMM, and at most `batch /`
    /// [`WEIGHT_GROUP_MIN_CHUNKS`] images so the chunks still spread over the threads. A function
    /// of the geometry only, so the summation order is too.
    fn weight_group(&self) -> usize {
        if !self.compact() {
            return 1;
        }
        WEIGHT_GROUP_COLS
            .div_ceil(self.cols())
            .min(self.batch / WEIGHT_GROUP_MIN_CHUNKS)
            .max(1)
    }
}

/// The weight-gradient GEMM width [`Conv2dGeom::weight_group`] aims for (measured: docs/benchmarks.md, "Kernel thresholds").
const WEIGHT_GROUP_COLS: usize = 256;

/// [`Conv2dGeom::weight_group`] leaves at least this many chunks of images.
const WEIGHT_GROUP_MIN_CHUNKS: usize = 4;

/// The shifted copies of one zero-padded image (see [`Conv2dGeom::shifted`]) into `s`
/// `[cin·k, shifted_len]`.
fn shifted_copies(g: &Conv2dGeom, padded: &[f32], s: &mut [f32]) {
    shifted_copies_band(g, padded, s, 0, g.gemm_cols());
}

/// [`shifted_copies`] for the GEMM columns `start..start + n` (a band of output rows): rows of
/// `n + (k-1)·wp`.
fn shifted_copies_band(g: &Conv2dGeom, padded: &[f32], s: &mut [f32], start: usize, n: usize) {
    let (plane, len) = (g.padded_plane(), n + (g.k - 1) * g.padded_w());
    for c in 0..g.cin {
        for j in 0..g.k {
            s[(c * g.k + j) * len..][..len]
                .copy_from_slice(&padded[c * plane + start + j..][..len]);
        }
    }
}

thread_local! {
    /// One [`Scratch`] per rayon worker, grown to the largest convolution seen. A fresh
    /// zero-filled buffer per image chunk cost a training step its `memset` and page faults.
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// Runs `f` with this thread's scratch buffers cut to the lengths `g` needs: `(col, padded,
/// grid)`. Contents are whatever the last user left. If the thread's buffers are already in use
/// (a nested call, which the kernels never make), `f` gets fresh ones.
fn with_scratch<R>(
    g: &Conv2dGeom,
    purpose: Purpose,
    f: impl FnOnce(&mut [f32], &mut [f32], &mut [f32]) -> R,
) -> R {
    let (nc, np, ng) = scratch_lens(g, purpose);
    let grow = |v: &mut Vec<f32>, n: usize| {
        if v.len() < n {
            v.resize(n, 0.0);
        }
    };
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut s) => {
            let Scratch { col, padded, grid } = &mut *s;
            grow(col, nc);
            grow(padded, np);
            grow(grid, ng);
            f(&mut col[..nc], &mut padded[..np], &mut grid[..ng])
        }
        Err(_) => f(&mut vec![0.0; nc], &mut vec![0.0; np], &mut vec![0.0; ng]),
    })
}

/// Zero-pads one image `[cin, h, w]` into `padded` `[cin, h+2p, w+2p]` (+ zero slack). Only the
/// border is cleared; the interior is overwritten.
fn pad_image(g: &Conv2dGeom, x: &[f32], padded: &mut [f32]) {
    let (wp, plane, p) = (g.padded_w(), g.padded_plane(), g.pad);
    for c in 0..g.cin {
        let pl = &mut padded[c * plane..(c + 1) * plane];
        pl[..p * wp].fill(0.0);
        pl[(p + g.h) * wp..].fill(0.0);
        for y in 0..g.h {
            let row = &mut pl[(y + p) * wp..(y + p + 1) * wp];
            row[..p].fill(0.0);
            row[p + g.w..].fill(0.0);
            row[p..p + g.w].copy_from_slice(&x[(c * g.h + y) * g.w..][..g.w]);
        }
    }
    padded[g.cin * plane..].fill(0.0);
}

/// [`Plan::PaddedRows`] im2col: row `(c, i, j)` is the padded image from offset `i·wp + j`.
fn im2col_rows(g: &Conv2dGeom, padded: &[f32], col: &mut [f32]) {
    im2col_rows_band(g, padded, col, 0, g.gemm_cols());
}

/// [`im2col_rows`] for the GEMM columns `start..start + n` only.
fn im2col_rows_band(g: &Conv2dGeom, padded: &[f32], col: &mut [f32], start: usize, n: usize) {
    let (wp, plane) = (g.padded_w(), g.padded_plane());
    for c in 0..g.cin {
        for i in 0..g.k {
            for j in 0..g.k {
                let r = (c * g.k + i) * g.k + j;
                col[r * n..(r + 1) * n]
                    .copy_from_slice(&padded[c * plane + start + i * wp + j..][..n]);
            }
        }
    }
}

/// The column matrix of one image is built and multiplied in bands of output rows whenever it
/// would exceed this many `f32`s (64 MiB): a 512x512 image with 128 channels (the SD VAE's last
/// level) has a 1.2 GB column matrix. Bands split the GEMM's columns only, so every output
/// element is the same sum in the same order: results do not depend on the band size.
const BAND_FLOATS: usize = 16 << 20;

impl Conv2dGeom {
    /// Output rows per band of the [`Plan::PaddedRows`] forward (all of them for small images).
    fn band_rows(&self) -> usize {
        let per_row = if self.shifted() {
            self.cin * self.k * self.padded_w()
        } else {
            self.rows() * self.padded_w()
        };
        (BAND_FLOATS / per_row.max(1)).clamp(1, self.out_h())
    }

    /// The GEMM columns of output rows `y0..y1` on the padded-width grid: their start and count
    /// (rounded up like [`Conv2dGeom::gemm_cols`]).
    fn band_cols(&self, y0: usize, y1: usize) -> (usize, usize) {
        let n = ((y1 - y0 - 1) * self.padded_w() + self.out_w()).next_multiple_of(GEMM_ALIGN);
        (y0 * self.padded_w(), n)
    }
}

/// The adjoint of [`im2col_rows`], into a zeroed padded gradient.
fn col2im_rows(g: &Conv2dGeom, col: &[f32], padded: &mut [f32]) {
    let (wp, plane, n) = (g.padded_w(), g.padded_plane(), g.gemm_cols());
    padded.fill(0.0);
    for c in 0..g.cin {
        for i in 0..g.k {
            for j in 0..g.k {
                let r = (c * g.k + i) * g.k + j;
                let dst = &mut padded[c * plane + i * wp + j..][..n];
                for (d, s) in dst.iter_mut().zip(&col[r * n..(r + 1) * n]) {
                    *d += *s;
                }
            }
        }
    }
}

/// An output gradient `[cout, oh, ow]` spread onto the padded-width grid, zeros in the gaps, so
/// that the discarded columns contribute nothing to either gradient.
fn grad_to_grid(g: &Conv2dGeom, gb: &[f32], grid: &mut [f32]) {
    let (oh, ow, wp, n) = (g.out_h(), g.out_w(), g.padded_w(), g.gemm_cols());
    for o in 0..g.cout {
        let row = &mut grid[o * n..(o + 1) * n];
        for oy in 0..oh {
            row[oy * wp..][..ow].copy_from_slice(&gb[(o * oh + oy) * ow..][..ow]);
            let end = if oy + 1 == oh { n } else { (oy + 1) * wp };
            row[oy * wp + ow..end].fill(0.0);
        }
    }
}

/// The compact column matrix of one image `xb` (row `(c, i, j)` holds the `oh·ow` output pixels
/// only) at `col[r·ld..]`; `padded` is scratch.
///
/// A "same" convolution (`oh = h`, `ow = w`) needs no padded copy: row `(c, i, j)` is plane `c`
/// read from offset `(i - p)·w + (j - p)`, with the pixels whose tap falls left or right of the
/// image zeroed (those above or below fall outside the plane), one contiguous pass per row.
/// Otherwise each row is gathered from the zero-padded image through a table of offsets. On the
/// small maps this form is for, copying each row as `oh` slices of `ow` values (4 at 4x4) had
/// spent more time in `memcpy` calls than the GEMM spent multiplying.
fn im2col_compact(g: &Conv2dGeom, xb: &[f32], padded: &mut [f32], col: &mut [f32], ld: usize) {
    let (oh, ow, l) = (g.out_h(), g.out_w(), g.cols());
    if oh == g.h && ow == g.w {
        let mut inside = vec![false; l];
        for i in 0..g.k {
            for j in 0..g.k {
                // Pixel p = (y, x) reads plane[p + shift] when x + j - pad is inside the row.
                let shift = (i * g.w + j) as isize - (g.pad * g.w + g.pad) as isize;
                for (p, m) in inside.iter_mut().enumerate() {
                    *m = (p % ow + j).wrapping_sub(g.pad) < g.w;
                }
                let lo = (-shift).clamp(0, l as isize) as usize;
                let hi = (l as isize - shift.max(0)).max(lo as isize) as usize;
                for c in 0..g.cin {
                    let r = (c * g.k + i) * g.k + j;
                    let row = &mut col[r * ld..][..l];
                    row[..lo].fill(0.0);
                    row[hi..].fill(0.0);
                    if hi > lo {
                        let src = &xb[c * l + (lo as isize + shift) as usize..][..hi - lo];
                        let pixels = row[lo..hi].iter_mut().zip(src).zip(&inside[lo..hi]);
                        for ((d, &v), &m) in pixels {
                            *d = if m { v } else { 0.0 };
                        }
                    }
                }
            }
        }
        return;
    }
    pad_image(g, xb, padded);
    let (wp, plane) = (g.padded_w(), g.padded_plane());
    let mut offsets = vec![0usize; l];
    for i in 0..g.k {
        for j in 0..g.k {
            for (p, o) in offsets.iter_mut().enumerate() {
                *o = (p / ow + i) * wp + p % ow + j;
            }
            for c in 0..g.cin {
                let r = (c * g.k + i) * g.k + j;
                let src = &padded[c * plane..][..plane];
                for (d, &o) in col[r * ld..][..l].iter_mut().zip(&offsets) {
                    *d = src[o];
                }
            }
        }
    }
}

/// The column matrix of one image (for `Pointwise`, the image itself; compact when
/// [`Conv2dGeom::compact`]).
fn columns<'a>(g: &Conv2dGeom, xb: &'a [f32], col: &'a mut [f32], padded: &mut [f32]) -> &'a [f32] {
    match g.plan() {
        Plan::Pointwise => xb,
        Plan::Strided => {
            im2col(g, xb, col);
            col
        }
        Plan::PaddedRows if g.compact() => {
            im2col_compact(g, xb, padded, col, g.cols());
            &col[..g.rows() * g.cols()]
        }
        Plan::PaddedRows => {
            pad_image(g, xb, padded);
            im2col_rows(g, padded, col);
            col
        }
    }
}

/// Forward: `y = conv2d(x, weight) + bias`, `y` `[batch, cout, oh, ow]`.
pub fn forward(g: &Conv2dGeom, x: &[f32], weight: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    forward_with(g, x, Weights::F32(weight), bias)
}

/// [`forward`] with the weight as [`Weights`] (bf16 only for products on the bf16 GEMM).
pub fn forward_with(g: &Conv2dGeom, x: &[f32], weights: Weights, bias: Option<&[f32]>) -> Vec<f32> {
    if super::winograd::applies(g) {
        return super::winograd::forward(g, x, &weights.to_f32(), bias);
    }
    let (kk, l) = (g.rows(), g.cols());
    let shifted = g.shifted();
    // For the shifted form: the weight of vertical tap i as `[cout, cin·k]`.
    let per_tap: Vec<f32> = if shifted {
        let weight = weights.to_f32();
        let mut w = vec![0.0f32; g.weight_len()];
        for i in 0..g.k {
            for o in 0..g.cout {
                for c in 0..g.cin {
                    for j in 0..g.k {
                        w[((i * g.cout + o) * g.cin + c) * g.k + j] =
                            weight[((o * g.cin + c) * g.k + i) * g.k + j];
                    }
                }
            }
        }
        w
    } else {
        Vec::new()
    };
    let (y, _) = super::parallel::par_new(g.output_len(), g.image_out(), |b, yb| {
        let xb = &x[b * g.image_in()..][..g.image_in()];
        with_scratch(g, Purpose::Forward, |col, padded, grid| {
            if g.plan() != Plan::PaddedRows || g.compact() {
                let cols = columns(g, xb, col, padded);
                if let Some(bias) = bias {
                    for (row, b) in yb.chunks_mut(l).zip(bias) {
                        row.fill(*b);
                    }
                }
                weight_matmul(
                    yb,
                    (g.cout, l, kk),
                    bias.is_some(),
                    (weights, kk, 1),
                    (cols, l, 1),
                    g.gemm_par(),
                );
                return;
            }
            pad_image(g, xb, padded);
            let (oh, ow, wp) = (g.out_h(), g.out_w(), g.padded_w());
            let rows = g.band_rows();
            for y0 in (0..oh).step_by(rows) {
                let y1 = (y0 + rows).min(oh);
                let (start, nb) = g.band_cols(y0, y1);
                let grid = &mut grid[..g.cout * nb];
                if shifted {
                    shifted_copies_band(g, padded, col, start, nb);
                    let (len, ck) = (nb + (g.k - 1) * wp, g.cin * g.k);
                    for i in 0..g.k {
                        matmul(
                            grid,
                            (g.cout, nb, ck),
                            i > 0,
                            (&per_tap[i * g.cout * ck..], ck, 1),
                            (&col[i * wp..], len, 1),
                            g.gemm_par(),
                        );
                    }
                } else {
                    im2col_rows_band(g, padded, col, start, nb);
                    weight_matmul(
                        grid,
                        (g.cout, nb, kk),
                        false,
                        (weights, kk, 1),
                        (&col[..kk * nb], nb, 1),
                        g.gemm_par(),
                    );
                }
                for o in 0..g.cout {
                    let b = bias.map_or(0.0, |b| b[o]);
                    for oy in y0..y1 {
                        let src = &grid[o * nb + (oy - y0) * wp..][..ow];
                        for (d, s) in yb[(o * oh + oy) * ow..][..ow].iter_mut().zip(src) {
                            *d = *s + b;
                        }
                    }
                }
            }
        })
    });
    y
}

/// Input gradient: `dx = col2im(Wᵀ · g)`, `[batch, cin, h, w]`.
///
/// A stride-1 convolution's input gradient is itself a stride-1 convolution: of the output
/// gradient, padded by `k-1-p`, with the kernel flipped in both axes and its channel axes
/// swapped. That form runs as [`forward`]: a GEMM whose inner dimension is `cout·k·k` rather
/// than `cout`, and no col2im scatter-add over a `cin·k·k`-row matrix. It is used when `cin`
/// (that GEMM's column count) is at least [`ADJOINT_MIN_CIN`]: with fewer, the micro-kernel's
/// 6-column tiles run mostly empty and the scatter form is faster.
pub fn input_grad(g: &Conv2dGeom, weight: &[f32], grad: &[f32]) -> Vec<f32> {
    input_grad_with(g, Weights::F32(weight), grad)
}

/// [`input_grad`] with the weight as [`Weights`] (bf16 only for products on the bf16 GEMM).
pub fn input_grad_with(g: &Conv2dGeom, weights: Weights, grad: &[f32]) -> Vec<f32> {
    // The adjoint needs the weight flipped and transposed (a pass over `cout·cin·k²` values
    // every call); the column path scatters `cin·k²` values per output position of each
    // image instead. Deep, small levels (SD's 1280-channel 4x4..8x8 maps) have far more
    // weight than positions, so they take the column path.
    if g.plan() == Plan::PaddedRows
        && g.pad < g.k
        && g.cin >= ADJOINT_MIN_CIN
        && g.cout <= g.batch * g.gemm_cols()
    {
        let adjoint = Conv2dGeom {
            cin: g.cout,
            h: g.out_h(),
            w: g.out_w(),
            cout: g.cin,
            pad: g.k - 1 - g.pad,
            ..*g
        };
        return match weights {
            Weights::F32(w) => forward_with(&adjoint, grad, Weights::F32(&flipped(g, w)), None),
            Weights::Bf16(w) => forward_with(&adjoint, grad, Weights::Bf16(&flipped(g, w)), None),
        };
    }
    let (kk, l, n) = (g.rows(), g.cols(), g.gemm_cols());
    let (dx, _) = super::parallel::par_new(g.input_len(), g.image_in(), |b, dxb| {
        let gb = &grad[b * g.image_out()..][..g.image_out()];
        with_scratch(g, Purpose::Gradient, |col, padded, grid| {
            // Wᵀ is `[kk, cout]`: element (r, o) sits at weight[o·kk + r].
            let wt = (weights, 1, kk);
            match g.plan() {
                Plan::Pointwise => {
                    weight_matmul(dxb, (kk, l, g.cout), false, wt, (gb, l, 1), g.gemm_par())
                }
                Plan::Strided => {
                    weight_matmul(col, (kk, l, g.cout), false, wt, (gb, l, 1), g.gemm_par());
                    col2im_add(g, col, dxb);
                }
                Plan::PaddedRows => {
                    grad_to_grid(g, gb, grid);
                    weight_matmul(col, (kk, n, g.cout), false, wt, (grid, n, 1), g.gemm_par());
                    col2im_rows(g, col, padded);
                    let (wp, plane) = (g.padded_w(), g.padded_plane());
                    for c in 0..g.cin {
                        for y in 0..g.h {
                            let src = &padded[c * plane + (y + g.pad) * wp + g.pad..][..g.w];
                            dxb[(c * g.h + y) * g.w..][..g.w].copy_from_slice(src);
                        }
                    }
                }
            }
        })
    });
    dx
}

/// The adjoint's weight: `weight` `[cout, cin, k, k]` flipped in both kernel axes, with its
/// channel axes swapped (`[cin, cout, k, k]`).
fn flipped<T: Copy + Default>(g: &Conv2dGeom, weight: &[T]) -> Vec<T> {
    let kk = g.k * g.k;
    let mut flipped = vec![T::default(); g.weight_len()];
    for o in 0..g.cout {
        for c in 0..g.cin {
            let src = &weight[(o * g.cin + c) * kk..][..kk];
            let dst = &mut flipped[(c * g.cout + o) * kk..][..kk];
            for (d, s) in dst.iter_mut().zip(src.iter().rev()) {
                *d = *s;
            }
        }
    }
    flipped
}

/// Weight and bias gradients: `dW = Σ_b g[b] · col(x[b])ᵀ` (`[cout, cin, k, k]`) and
/// `db[o] = Σ_b Σ_p g[b, o, p]`, summed in an order fixed by the batch size (module docs).
pub fn weight_grad(
    g: &Conv2dGeom,
    x: &[f32],
    grad: &[f32],
    with_bias: bool,
) -> (Vec<f32>, Vec<f32>) {
    let chunks = g.batch.clamp(1, WEIGHT_GRAD_CHUNKS);
    if super::winograd::applies(g) {
        return super::winograd::weight_grad(g, x, grad, with_bias, chunks);
    }
    let (kk, l, n) = (g.rows(), g.cols(), g.gemm_cols());
    // Whole groups of images per chunk (see `Conv2dGeom::weight_group`).
    let group = g.weight_group();
    let per_chunk = g.batch.div_ceil(chunks).max(1).next_multiple_of(group);
    let bias_len = if with_bias { g.cout } else { 0 };
    // gemm packs the output gradient once per vertical tap here; with fewer than
    // SHIFTED_MIN_COUT output channels that costs more than the copies saved (measured: 10 -> 10
    // channels at 28x28 ~15% slower; 32-64 channels at 32x32 and 64x64 up to 25% faster).
    let shifted = g.shifted() && g.cout >= SHIFTED_MIN_COUT;
    let partials: Vec<(Vec<f32>, Vec<f32>)> = (0..g.batch.div_ceil(per_chunk))
        .into_par_iter()
        .map(|c| {
            // dWᵀ `[kk, cout]`, accumulated as `col(x) · gᵀ`: gemm then runs with the small
            // `cout` as its row dimension and packs (copies transposed) the output gradient
            // rather than the `kk/cout` times larger column matrix; the column matrix is its
            // right operand, read in place.
            // In the shifted form the rows come out ordered (i, c, j) instead of (c, i, j).
            let mut dwt = vec![0.0f32; g.weight_len()];
            let mut db = vec![0.0f32; bias_len];
            with_scratch(g, Purpose::Gradient, |col, padded, grid| {
                let images = c * per_chunk..((c + 1) * per_chunk).min(g.batch);
                for b in images.clone() {
                    let gb = &grad[b * g.image_out()..][..g.image_out()];
                    for (d, row) in db.iter_mut().zip(gb.chunks(l)) {
                        *d += row.iter().sum::<f32>();
                    }
                }
                if g.compact() {
                    for b0 in images.step_by(group) {
                        let b1 = (b0 + group).min(g.batch);
                        let ld = (b1 - b0) * l;
                        for b in b0..b1 {
                            let xb = &x[b * g.image_in()..][..g.image_in()];
                            let gb = &grad[b * g.image_out()..][..g.image_out()];
                            im2col_compact(g, xb, padded, &mut col[(b - b0) * l..], ld);
                            for o in 0..g.cout {
                                grid[o * ld + (b - b0) * l..][..l]
                                    .copy_from_slice(&gb[o * l..][..l]);
                            }
                        }
                        matmul(
                            &mut dwt,
                            (kk, g.cout, ld),
                            true,
                            (&col[..kk * ld], ld, 1),
                            (&grid[..g.cout * ld], 1, ld),
                            g.gemm_par(),
                        );
                    }
                    return;
                }
                for b in images {
                    let xb = &x[b * g.image_in()..(b + 1) * g.image_in()];
                    let gb = &grad[b * g.image_out()..(b + 1) * g.image_out()];
                    if shifted {
                        pad_image(g, xb, padded);
                        shifted_copies(g, padded, col);
                        grad_to_grid(g, gb, grid);
                        let (len, ck) = (shifted_len(g), g.cin * g.k);
                        for i in 0..g.k {
                            matmul(
                                &mut dwt[i * ck * g.cout..],
                                (ck, g.cout, n),
                                true,
                                (&col[i * g.padded_w()..], len, 1),
                                (grid, 1, n),
                                g.gemm_par(),
                            );
                        }
                    } else if g.plan() == Plan::PaddedRows {
                        let cols = columns(g, xb, col, padded);
                        // gᵀ is `[n, cout]`: element (p, o) sits at g[o·n + p].
                        grad_to_grid(g, gb, grid);
                        matmul(
                            &mut dwt,
                            (kk, g.cout, n),
                            true,
                            (cols, n, 1),
                            (grid, 1, n),
                            g.gemm_par(),
                        );
                    } else {
                        let cols = columns(g, xb, col, padded);
                        matmul(
                            &mut dwt,
                            (kk, g.cout, l),
                            true,
                            (cols, l, 1),
                            (gb, 1, l),
                            g.gemm_par(),
                        );
                    }
                }
            });
            let mut dw = vec![0.0f32; g.weight_len()];
            for (r, row) in dwt.chunks_exact(g.cout).enumerate() {
                // Row r is (c, i, j), or (i, c, j) in the shifted form.
                let r = if shifted {
                    let (i, cj) = (r / (g.cin * g.k), r % (g.cin * g.k));
                    let (c, j) = (cj / g.k, cj % g.k);
                    (c * g.k + i) * g.k + j
                } else {
                    r
                };
                for (o, v) in row.iter().enumerate() {
                    dw[o * kk + r] = *v;
                }
            }
            (dw, db)
        })
        .collect();
    super::parallel::sum_in_order(partials, (g.weight_len(), bias_len))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct six-loop convolution, the definition the GEMM path must match.
    fn naive_forward(g: &Conv2dGeom, x: &[f32], w: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
        let (oh, ow) = (g.out_h(), g.out_w());
        let mut y = vec![0.0f32; g.output_len()];
        for b in 0..g.batch {
            for o in 0..g.cout {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut acc = bias.map_or(0.0, |bb| bb[o]) as f64;
                        for c in 0..g.cin {
                            for i in 0..g.k {
                                for j in 0..g.k {
                                    let iy = (oy * g.stride + i) as isize - g.pad as isize;
                                    let ix = (ox * g.stride + j) as isize - g.pad as isize;
                                    if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize
                                    {
                                        continue;
                                    }
                                    let xv = x
                                        [((b * g.cin + c) * g.h + iy as usize) * g.w + ix as usize];
                                    let wv = w[((o * g.cin + c) * g.k + i) * g.k + j];
                                    acc += (xv * wv) as f64;
                                }
                            }
                        }
                        y[((b * g.cout + o) * oh + oy) * ow + ox] = acc as f32;
                    }
                }
            }
        }
        y
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        super::super::tests::test_values(n, seed)
    }

    fn close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: length");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
                "{what}[{i}]: {x} vs {y}"
            );
        }
    }

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
    }

    /// Shapes the models use: 3x3 same padding, 4x4 and 3x3 stride-2 downsampling (even and odd
    /// sizes), 1x1 skips, one batch larger than the chunk count.
    fn geometries() -> Vec<Conv2dGeom> {
        let g = |batch, cin, h, cout, k, stride, pad| Conv2dGeom {
            batch,
            cin,
            h,
            w: h + 1,
            cout,
            k,
            stride,
            pad,
            bf16: false,
        };
        vec![
            g(3, 2, 5, 3, 3, 1, 1),
            g(2, 3, 6, 2, 4, 2, 1),
            g(2, 2, 7, 3, 3, 2, 0),
            g(2, 4, 5, 3, 1, 1, 0),
            g(19, 2, 4, 2, 3, 1, 1),
            g(1, 1, 3, 1, 3, 1, 2),
            g(2, 3, 6, 2, 3, 1, 0),
            g(2, 2, 8, 3, 5, 1, 2),
            // cin >= ADJOINT_MIN_CIN: the stride-1 input gradient as a flipped convolution.
            g(2, 9, 5, 3, 3, 1, 1),
            g(2, 8, 6, 10, 3, 1, 0),
            g(3, 8, 7, 2, 5, 1, 2),
            // cin >= ADJOINT_MIN_CIN but more output channels than positions: the column path.
            g(1, 9, 2, 40, 3, 1, 1),
            // More images than WEIGHT_GRAD_CHUNKS: several images per weight-gradient chunk.
            g(40, 2, 4, 3, 3, 1, 1),
            // GEMM width >= SHIFTED_MIN_COLS: the shifted form (k = 3 and 5, pad 0 and 1), and
            // cout >= SHIFTED_MIN_COUT for the weight gradient's.
            g(3, 9, 24, 4, 3, 1, 1),
            g(2, 3, 22, 33, 3, 1, 1),
            g(2, 3, 26, 2, 5, 1, 0),
            // oh·ow a multiple of GEMM_ALIGN on a small map: compact column matrices, several
            // images per weight-gradient GEMM, the last group of a chunk short.
            g(9, 9, 15, 4, 3, 1, 1),
            g(17, 3, 15, 2, 5, 1, 2),
            // Compact but not "same" (padding 0): the gathered rows.
            g(3, 2, 17, 3, 3, 1, 0),
            // One row of 16: the taps above and below shift by more than the whole map.
            Conv2dGeom {
                batch: 2,
                cin: 3,
                h: 1,
                w: 16,
                cout: 2,
                k: 3,
                stride: 1,
                pad: 1,
                bf16: false,
            },
        ]
    }

    #[test]
    fn forward_matches_direct_convolution() {
        // Both forms of the compact column matrix are among them.
        let same = |g: &Conv2dGeom| g.out_h() == g.h && g.out_w() == g.w;
        assert!(
            geometries()
                .iter()
                .any(|g| g.compact() && same(g) && g.h == 1)
        );
        assert!(geometries().iter().any(|g| g.compact() && !same(g)));
        for g in geometries() {
            let x = values(g.input_len(), 1);
            let w = values(g.weight_len(), 2);
            let b = values(g.cout, 3);
            close(
                &forward(&g, &x, &w, Some(&b)),
                &naive_forward(&g, &x, &w, Some(&b)),
                "forward+bias",
            );
            close(
                &forward(&g, &x, &w, None),
                &naive_forward(&g, &x, &w, None),
                "forward",
            );
        }
    }

    /// Images whose shifted copies exceed `BAND_FLOATS` are computed in bands of output rows
    /// (the last one shorter) and give the direct convolution's numbers.
    #[test]
    fn banded_forward_equals_the_direct_convolution() {
        for (h, batch) in [(400, 1), (347, 2)] {
            let g = Conv2dGeom {
                batch,
                cin: 128,
                h,
                w: 256,
                cout: 3,
                k: 3,
                stride: 1,
                pad: 1,
                bf16: false,
            };
            assert!(g.band_rows() < g.out_h(), "{g:?} must need several bands");
            let x = values(g.input_len(), 11);
            let wt = values(g.weight_len(), 12);
            let b = values(g.cout, 13);
            close(
                &forward(&g, &x, &wt, Some(&b)),
                &naive_forward(&g, &x, &wt, Some(&b)),
                "banded forward",
            );
        }
    }

    /// The gradients are adjoints of the forward map: `<conv(x, W), G> = <x, dx(G)> = <W, dW(x, G)>`
    /// for every x, W, G, which pins both backward kernels to the forward one.
    #[test]
    fn gradients_are_adjoint_to_forward() {
        assert!(
            geometries()
                .iter()
                .any(|g| g.compact() && g.weight_group() > 1 && g.batch % g.weight_group() != 0)
        );
        // Winograd's geometries (the input gradient as its adjoint forward; batch 1 in parallel
        // bands among them).
        let winograd = super::super::winograd::tests::geometries();
        assert!(winograd.iter().all(super::super::winograd::applies));
        for g in geometries().into_iter().chain(winograd) {
            let x = values(g.input_len(), 4);
            let w = values(g.weight_len(), 5);
            let gr = values(g.output_len(), 6);
            let y = naive_forward(&g, &x, &w, None);
            let lhs = dot(&y, &gr);
            let dx = input_grad(&g, &w, &gr);
            let (dw, db) = weight_grad(&g, &x, &gr, true);
            let tol = 1e-4 * (1.0 + lhs.abs());
            assert!(
                (dot(&x, &dx) - lhs).abs() < tol,
                "{g:?}: <x, dx> {} vs {lhs}",
                dot(&x, &dx)
            );
            assert!(
                (dot(&w, &dw) - lhs).abs() < tol,
                "{g:?}: <W, dW> {} vs {lhs}",
                dot(&w, &dw)
            );
            let l = g.out_h() * g.out_w();
            for (o, d) in db.iter().enumerate() {
                let want: f32 = (0..g.batch)
                    .map(|b| gr[(b * g.cout + o) * l..][..l].iter().sum::<f32>())
                    .sum();
                assert!((d - want).abs() < 1e-3, "bias grad {o}: {d} vs {want}");
            }
        }
    }

    #[test]
    fn weight_grad_is_the_same_on_any_thread_count() {
        // 6x6: the padded grid; 4x4: compact, several images per GEMM.
        for hw in [6, 4] {
            let g = Conv2dGeom {
                batch: 37,
                cin: 3,
                h: hw,
                w: hw,
                cout: 4,
                k: 3,
                stride: 1,
                pad: 1,
                bf16: false,
            };
            assert_eq!(g.compact(), hw == 4);
            let x = values(g.input_len(), 7);
            let gr = values(g.output_len(), 8);
            let run = |threads| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .map(|pool| pool.install(|| weight_grad(&g, &x, &gr, true)))
            };
            let one = run(1).expect("pool");
            let three = run(3).expect("pool");
            assert_eq!(one, three);
        }
    }
}
