//! A GEMM on bf16 operands for CPUs with AVX512-BF16 (`vdpbf16ps`: AMD Zen 4 and later, Intel
//! Cooper Lake and Sapphire Rapids and later).
//!
//! Mixed precision hands the kernels bf16 activations and weights, which they widen to f32
//! (`f32_values`); their products are then exact in f32 but take an f32 GEMM's multiply rate.
//! `vdpbf16ps` multiplies pairs of bf16 values and adds both products into f32 lanes: 32
//! multiply-adds per instruction where an f32 FMA does 16, and on Zen 4 at the same rate (one
//! 512-bit instruction per cycle: measured 232 against 115 GFLOP/s on one core). The operands
//! are rounded to bf16 (to nearest even) while they are packed, which is exact for values that
//! were bf16 to begin with; the sums are in f32.
//!
//! Layout (the usual GEMM blocking, with `k` taken two at a time):
//! - both operands are packed once per call, into buffers each thread keeps: `lhs` (`m x k`)
//!   into blocks of [`MR`] rows, `[block][pair][row]`, each `(k, k+1)` pair one `u32` that the
//!   kernel broadcasts; `rhs` (`k x n`) into panels of [`NR`] columns, `[panel][pair][column]`.
//!   An operand whose rows of `k` are contiguous (a column matrix, a transposed weight) is read
//!   two such rows at a time and spread over the panels, which keeps the reads sequential. A
//!   bf16 `lhs` with contiguous rows and even `k` is not packed: its rows already hold the
//!   pairs, and the kernel broadcasts them in place;
//! - the output is split in groups of [`GROUP`] panels (and, when parallel with few groups,
//!   its row blocks in chunks); each task walks `k` in blocks of [`KC`] pairs, so one panel's
//!   block stays in L1 and a group's in L2, and runs the kernel over its row blocks and panels;
//! - with few rows (up to [`FEW`]) and a large `rhs`, each packed panel would be used only a
//!   few times after a round trip through memory: [`streamed`] packs `rhs` a block of `k` at a
//!   time inside each task instead. With few columns and many rows, [`transposed`] computes the
//!   transposed product that way. SD's deep levels at batch 1 (1280 channels, 16 to 80
//!   positions, weights of 1280 x 11520) are such products.
//!
//! Each output element is summed in the same order whatever the thread count, so results do
//! not depend on the machine's parallelism.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use rayon::prelude::*;

/// Rows of `lhs` per kernel call.
const MR: usize = 8;
/// 16-lane vectors of output columns per kernel call.
const NV: usize = 3;
/// Output columns per kernel call (a panel).
const NR: usize = 16 * NV;
/// `k` pairs per block.
const KC: usize = 128;
/// Panels per column group.
const GROUP: usize = 6;
/// `k` pairs per packing task when `rhs` is packed by rows.
const ROW_PAIRS: usize = 32;
/// Products with at most this many rows are [`streamed`]; with at most this many columns (and
/// many rows), [`transposed`]; when the other operand has at least [`BIG`] values.
const FEW: usize = 96;
/// See [`FEW`]: below this, packing the larger operand whole costs little.
const BIG: usize = 1 << 19;

/// Whether this CPU has the instructions the kernel needs.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A pair of values as the kernel reads it: `lo` (even `k`) in the low half, both rounded to
/// bf16 to nearest even.
fn pair(lo: f32, hi: f32) -> u32 {
    let bits = |v: f32| half::bf16::from_f32(v).to_bits() as u32;
    bits(lo) | (bits(hi) << 16)
}

/// A matrix operand: (values, row stride, column stride).
pub(crate) type Operand<'a, E> = (&'a [E], usize, usize);

/// The values an operand holds: f32 (the kernels' widened values), or bf16 as stored, which
/// packs without a conversion.
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    /// Whether the values are bf16.
    const BF16: bool;
    fn to_f32(self) -> f32;
}

impl Elem for f32 {
    const BF16: bool = false;
    fn to_f32(self) -> f32 {
        self
    }
}

impl Elem for half::bf16 {
    const BF16: bool = true;
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
}

/// The output pointer shared by the tasks, which write disjoint tiles of it.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: tasks write disjoint (row block, column group) tiles; see `matmul`.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// A packed operand shared by the packing tasks, which write disjoint pairs of it.
#[derive(Clone, Copy)]
struct Packed(*mut u32);
// SAFETY: the tasks sharing one write disjoint values of it (`pack_by_rows`, `PackedLhs::many`).
unsafe impl Send for Packed {}
unsafe impl Sync for Packed {}

impl Out {
    /// The pointer (a method, so closures capture the whole `Send` wrapper, not its field).
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// `dst (+)= lhs · rhs` as [`super::gemm::matmul`] (same operand convention: `(slice, row stride,
/// column stride)`, `dst` row-major `[m, n]`), with both operands rounded to bf16. `parallel`
/// spreads the work over the thread pool. Callers check [`available`] and the slice extents.
// The operands are GEMM arguments in the convention of `gemm::matmul` (each a slice with its
// two strides, plus the shape): grouping them in a struct would only rename them.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul<L: Elem, R: Elem>(
    dst: &mut [f32],
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    lhs: Operand<L>,
    rhs: Operand<R>,
    parallel: bool,
) {
    assert!(available(), "bf16 matmul on a CPU without AVX512-BF16");
    assert!(dst.len() >= m * n && k > 0);
    if m == 0 || n == 0 {
        return;
    }
    match Path::of(m, n, k) {
        Path::Transposed => transposed(dst, (m, n, k), accumulate, lhs, rhs, parallel),
        Path::Streamed => streamed(dst, (m, n, k), accumulate, lhs, rhs, parallel),
        Path::Blocked => blocked(dst, (m, n, k), accumulate, lhs, rhs, parallel),
    }
}

/// How [`matmul`] computes a product of a shape.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Path {
    Blocked,
    Streamed,
    Transposed,
}

impl Path {
    fn of(m: usize, n: usize, k: usize) -> Self {
        if n <= FEW && m >= 2 * n.max(NR) && m * k >= BIG {
            Path::Transposed
        } else if m <= FEW && n > NR && n * k >= BIG {
            Path::Streamed
        } else {
            Path::Blocked
        }
    }
}

/// [`matmul`] with `rhs` packed whole before the kernels run, and `lhs` too unless it is read
/// in place.
fn blocked<L: Elem, R: Elem>(
    dst: &mut [f32],
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    lhs: Operand<L>,
    rhs: Operand<R>,
    parallel: bool,
) {
    let b_len = n.div_ceil(NR) * k.div_ceil(2) * NR;
    with_lhs(lhs, (m, k), parallel, |a| {
        with_buffer(&PACKED_RHS, b_len, |b| {
            pack_rhs_whole(rhs, (n, k), parallel, b);
            compute(dst, (m, n, k), accumulate, (a, b), parallel);
        })
    });
}

/// Runs `f` with `lhs` (`m x k`) as the kernels read it: in place when it can be (see [`Lhs`]),
/// else packed into this thread's buffer.
fn with_lhs<L: Elem, T>(
    lhs: Operand<L>,
    (m, k): (usize, usize),
    parallel: bool,
    f: impl FnOnce(Lhs) -> T,
) -> T {
    if let Some(rows) = Lhs::in_place(lhs, (m, k)) {
        return f(Lhs::Rows(rows));
    }
    with_buffer(&PACKED_LHS, m.div_ceil(MR) * k.div_ceil(2) * MR, |a| {
        pack_lhs_whole(lhs, (m, k), parallel, a);
        f(Lhs::Packed(a))
    })
}

/// [`matmul`] for `m <= FEW` rows: `lhs` is read as [`blocked`] reads it, and each task packs
/// its panels of `rhs` (up to [`GROUP`]) a block of [`KC`] pairs at a time, just before the
/// kernels use them, so they stay in cache. With so few rows each packed panel is used at most
/// `FEW / MR` times: packed whole, `rhs` (a weight of SD's deep levels: 1280 x 11520) would be
/// written out and read back from memory, which took longer than the products (measured:
/// docs/benchmarks.md, "Kernel thresholds").
fn streamed<L: Elem, R: Elem>(
    dst: &mut [f32],
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    lhs: Operand<L>,
    rhs: Operand<R>,
    parallel: bool,
) {
    let kp = k.div_ceil(2);
    let (blocks, panels) = (m.div_ceil(MR), n.div_ceil(NR));
    let out = Out(dst.as_mut_ptr());
    with_lhs(lhs, (m, k), parallel, |a| {
        // Each task packs a block of `k` of its panels at once (the rows of an `rhs` with
        // contiguous rows are read along, not down), then runs the kernels over them.
        let per_task = match parallel {
            true => panels.div_ceil(4 * rayon::current_num_threads()).min(GROUP),
            false => GROUP,
        };
        let task = |t: usize| {
            let pans = t * per_task..((t + 1) * per_task).min(panels);
            let (col0, width) = (pans.start * NR, (n - pans.start * NR).min(pans.len() * NR));
            with_buffer(&PANELS, pans.len() * KC * NR, |b| {
                for p0 in (0..kp).step_by(KC) {
                    let pairs = KC.min(kp - p0);
                    pack_rhs(rhs, k, (col0, width), p0..p0 + pairs, b);
                    for (i, pan) in pans.clone().enumerate() {
                        let (col, cols) = (pan * NR, NR.min(n - pan * NR));
                        let bpan = &b[i * pairs * NR..][..pairs * NR];
                        for blk in 0..blocks {
                            let rows = MR.min(m - blk * MR);
                            let ablk = a.block((blk, rows), (kp, p0, pairs));
                            // SAFETY: as in `compute`: `ablk` reads and `bpan` holds `pairs`
                            // pairs of the block and the panel; the tile lies in `dst` and
                            // belongs to this task's panels alone.
                            unsafe {
                                let tile = Tile {
                                    c: out.at(blk * MR * n + col),
                                    ldc: n,
                                    rows,
                                    cols,
                                    accumulate: accumulate || p0 > 0,
                                };
                                kernel(pairs, ablk, bpan.as_ptr(), tile);
                            }
                        }
                    }
                }
            });
        };
        let tasks = panels.div_ceil(per_task);
        if parallel {
            (0..tasks).into_par_iter().for_each(task);
        } else {
            (0..tasks).for_each(task);
        }
    });
}

/// [`matmul`] for `n <= FEW` columns and many rows: `dstᵀ (+)= rhsᵀ · lhsᵀ` ([`streamed`])
/// in a buffer, transposed into `dst`. Computed directly, the kernels' 16-column vectors
/// would run mostly empty (SD's deep levels at batch 1 have 16 to 80 positions) and `lhs`,
/// often a large weight, would be packed whole. Each product is the same sum in the same
/// order, so the result is bitwise that of [`blocked`].
fn transposed<L: Elem, R: Elem>(
    dst: &mut [f32],
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    (lhs, lrs, lcs): Operand<L>,
    (rhs, rrs, rcs): Operand<R>,
    parallel: bool,
) {
    let run = |t: &mut [f32]| {
        let d = &mut dst[..m * n];
        if accumulate {
            // The sums start from `dst`, as in `blocked` (not added to it at the end).
            let columns = |(j, tj): (usize, &mut [f32])| {
                tj.iter_mut()
                    .enumerate()
                    .for_each(|(i, x)| *x = d[i * n + j]);
            };
            match parallel {
                true => t.par_chunks_mut(m).enumerate().for_each(columns),
                false => t.chunks_mut(m).enumerate().for_each(columns),
            }
        }
        streamed(
            t,
            (n, m, k),
            accumulate,
            (rhs, rcs, rrs),
            (lhs, lcs, lrs),
            parallel,
        );
        // dst[i][j] = t[j][i], 16 rows of `dst` per task.
        let rows = |(chunk, d): (usize, &mut [f32])| {
            for (r, row) in d.chunks_mut(n).enumerate() {
                let i = chunk * 16 + r;
                row.iter_mut()
                    .enumerate()
                    .for_each(|(j, x)| *x = t[j * m + i]);
            }
        };
        match parallel {
            true => d.par_chunks_mut(16 * n).enumerate().for_each(rows),
            false => d.chunks_mut(16 * n).enumerate().for_each(rows),
        }
    };
    with_buffer(&TRANSPOSED, m * n, run);
}

type Buffer<T> = std::cell::RefCell<Vec<T>>;

thread_local! {
    /// Each thread's buffers, kept between calls: the packed `lhs` and `rhs`, [`streamed`]'s
    /// panels and [`transposed`]'s product.
    static PACKED_LHS: Buffer<u32> = const { Buffer::new(Vec::new()) };
    static PACKED_RHS: Buffer<u32> = const { Buffer::new(Vec::new()) };
    static PANELS: Buffer<u32> = const { Buffer::new(Vec::new()) };
    static TRANSPOSED: Buffer<f32> = const { Buffer::new(Vec::new()) };
}

/// Runs `f` with this thread's buffer `key` cut to `len` values (a fresh one when it is in use:
/// a call nested under a parallel section of another). Users write every value they read.
fn with_buffer<T: Copy + Default, R>(
    key: &'static std::thread::LocalKey<Buffer<T>>,
    len: usize,
    f: impl FnOnce(&mut [T]) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut b) => {
            if b.len() < len {
                b.resize(len, T::default());
            }
            f(&mut b[..len])
        }
        Err(_) => f(&mut vec![T::default(); len]),
    })
}

/// `rhs` (`k x n`) packed once for several products ([`matmul_packed`]): attention's keys and
/// values, which every block of queries multiplies.
pub(crate) struct PackedRhs {
    values: Vec<u32>,
    k: usize,
    n: usize,
}

impl PackedRhs {
    /// Packs `rhs` (`k x n`, as in [`matmul`]) on this thread. Callers check [`available`].
    pub(crate) fn new<E: Elem>(rhs: Operand<E>, (k, n): (usize, usize)) -> Self {
        assert!(available(), "bf16 matmul on a CPU without AVX512-BF16");
        let mut values = vec![0u32; n.div_ceil(NR) * k.div_ceil(2) * NR];
        pack_rhs_whole(rhs, (n, k), false, &mut values);
        Self { values, k, n }
    }
}

/// `dst (+)= lhs · rhs` as [`matmul`] for a `rhs` packed beforehand, on this thread.
pub(crate) fn matmul_packed<E: Elem>(
    dst: &mut [f32],
    m: usize,
    accumulate: bool,
    lhs: Operand<E>,
    rhs: &PackedRhs,
) {
    let (n, k) = (rhs.n, rhs.k);
    assert!(dst.len() >= m * n && k > 0);
    if m == 0 || n == 0 {
        return;
    }
    with_lhs(lhs, (m, k), false, |a| {
        compute(dst, (m, n, k), accumulate, (a, &rhs.values), false)
    });
}

/// `lhs` (`m x k`) packed once for several products ([`matmul_lhs_packed`]): Winograd's
/// transformed weights, which every block of tiles multiplies.
pub(crate) struct PackedLhs {
    values: Vec<u32>,
    m: usize,
    k: usize,
}

impl PackedLhs {
    /// Packs `lhs` (`m x k`, as in [`matmul`]) on this thread. Callers check [`available`].
    #[cfg(test)]
    pub(crate) fn new<E: Elem>(lhs: Operand<E>, (m, k): (usize, usize)) -> Self {
        assert!(available(), "bf16 matmul on a CPU without AVX512-BF16");
        let mut values = vec![0u32; m.div_ceil(MR) * k.div_ceil(2) * MR];
        pack_lhs_whole(lhs, (m, k), false, &mut values);
        Self { values, m, k }
    }

    /// `count` matrices of `m x k`, made and packed a block of rows at a time, in parallel:
    /// `rows(r0..r1, values)` writes rows `r0..r1` (up to [`MR`] of them) of every matrix into
    /// `values`, `[matrix][MR][k]` (row `r0` first). No matrix exists whole in f32.
    pub(crate) fn many(
        count: usize,
        (m, k): (usize, usize),
        rows: impl Fn(std::ops::Range<usize>, &mut [f32]) + Sync,
    ) -> Vec<Self> {
        assert!(available(), "bf16 matmul on a CPU without AVX512-BF16");
        let (blocks, kp) = (m.div_ceil(MR), k.div_ceil(2));
        let mut all: Vec<Self> = (0..count)
            .map(|_| Self {
                values: vec![0u32; blocks * kp * MR],
                m,
                k,
            })
            .collect();
        let outs: Vec<Packed> = all
            .iter_mut()
            .map(|p| Packed(p.values.as_mut_ptr()))
            .collect();
        let fill = |f32s: &mut Vec<f32>, blk: usize| {
            let valid = MR.min(m - blk * MR);
            rows(blk * MR..blk * MR + valid, f32s);
            for (i, out) in outs.iter().enumerate() {
                // SAFETY: block `blk` of matrix `i` (`kp·MR` values from `blk·kp·MR`) is
                // written by this task alone, inside that matrix's `blocks·kp·MR` values.
                let out =
                    unsafe { std::slice::from_raw_parts_mut(out.0.add(blk * kp * MR), kp * MR) };
                pack_lhs((&f32s[i * MR * k..], k, 1), (valid, k), 0, out);
            }
        };
        (0..blocks)
            .into_par_iter()
            .for_each_init(|| vec![0.0f32; count * MR * k], fill);
        all
    }
}

/// `dst (+)= lhs · rhs` as [`matmul`] for an `lhs` packed beforehand: the same sums as
/// [`blocked`], bit for bit.
pub(crate) fn matmul_lhs_packed<E: Elem>(
    dst: &mut [f32],
    n: usize,
    accumulate: bool,
    lhs: &PackedLhs,
    rhs: Operand<E>,
    parallel: bool,
) {
    let (m, k) = (lhs.m, lhs.k);
    assert!(dst.len() >= m * n && k > 0);
    if m == 0 || n == 0 {
        return;
    }
    with_buffer(&PACKED_RHS, n.div_ceil(NR) * k.div_ceil(2) * NR, |b| {
        pack_rhs_whole(rhs, (n, k), parallel, b);
        compute(
            dst,
            (m, n, k),
            accumulate,
            (Lhs::Packed(&lhs.values), b),
            parallel,
        );
    });
}

/// Packs all of `lhs` (`m x k`) into `a`, `[block][pair][row]`.
fn pack_lhs_whole<L: Elem>(lhs: Operand<L>, (m, k): (usize, usize), parallel: bool, a: &mut [u32]) {
    let kp = k.div_ceil(2);
    if lhs.1 == 1 {
        // SAFETY: `a` holds `blocks·kp·MR` values.
        unsafe { pack_by_rows::<L, MR>((lhs.0, lhs.2), (k, m), parallel, a) };
    } else {
        let block = |(blk, out): (usize, &mut [u32])| pack_lhs(lhs, (m, k), blk, out);
        match parallel {
            true => a.par_chunks_mut(kp * MR).enumerate().for_each(block),
            false => a.chunks_mut(kp * MR).enumerate().for_each(block),
        }
    }
}

/// Packs all of `rhs` (`k x n`) into `b`, `[panel][pair][column]`.
fn pack_rhs_whole<R: Elem>(rhs: Operand<R>, (n, k): (usize, usize), parallel: bool, b: &mut [u32]) {
    let kp = k.div_ceil(2);
    if rhs.2 == 1 {
        // SAFETY: `b` holds `panels·kp·NR` values.
        unsafe { pack_by_rows::<R, NR>((rhs.0, rhs.1), (k, n), parallel, b) };
    } else {
        let panel = |(pan, out): (usize, &mut [u32])| {
            let col = pan * NR;
            pack_rhs(rhs, k, (col, NR.min(n - col)), 0..kp, out)
        };
        match parallel {
            true => b.par_chunks_mut(kp * NR).enumerate().for_each(panel),
            false => b.chunks_mut(kp * NR).enumerate().for_each(panel),
        }
    }
}

/// Packs all of an operand whose rows of `k` are contiguous (`src` `k x n` at row stride `rs`:
/// a column matrix as `rhs`, a transposed `lhs`) into `out`, panels `W` wide. It is read a pair
/// of rows at a time, in order, and spread over the panels (reading it panel by panel walks down
/// all its rows once per panel and stalls on the loads); each task packs `ROW_PAIRS` pairs.
///
/// # Safety
/// `out` holds `n.div_ceil(W)·kp·W` values.
unsafe fn pack_by_rows<E: Elem, const W: usize>(
    src: (&[E], usize),
    (k, n): (usize, usize),
    parallel: bool,
    out: &mut [u32],
) {
    let kp = k.div_ceil(2);
    let out = Packed(out.as_mut_ptr());
    let task = |p0: usize| {
        let pairs = p0..(p0 + ROW_PAIRS).min(kp);
        // SAFETY: the callers checked the features; each task writes the values of its own
        // pairs in every panel of `out`, disjoint from the other tasks'.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            pack_rows_avx512::<E, W>(src, (k, n), pairs, (out, kp, 0))
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (pairs, out);
    };
    let tasks = (0..kp).step_by(ROW_PAIRS);
    match parallel {
        true => tasks.collect::<Vec<_>>().into_par_iter().for_each(task),
        false => tasks.for_each(task),
    }
}

/// Where the kernels read `lhs`: packed (`[block][pair][row]`), or in place: a bf16 `lhs` with
/// contiguous rows and even `k` already holds each row's pairs as consecutive `u32`s, which
/// the kernel broadcasts from its rows directly (a weight row-major, as convolutions and
/// linear layers store it).
#[derive(Clone, Copy)]
enum Lhs<'a> {
    Packed(&'a [u32]),
    Rows(InPlace),
}

/// A bf16 `lhs` read in place: its first value, and its row stride in values.
#[derive(Clone, Copy)]
struct InPlace(*const half::bf16, usize);
// SAFETY: the kernels only read through it, while the `lhs` it points into is borrowed.
unsafe impl Send for InPlace {}
unsafe impl Sync for InPlace {}

impl Lhs<'_> {
    /// `lhs` (`m x k`) read in place when it can be.
    fn in_place<L: Elem>((values, rs, cs): Operand<L>, (m, k): (usize, usize)) -> Option<InPlace> {
        let can = L::BF16 && cs == 1 && k.is_multiple_of(2) && m > 0;
        // The kernels read it through pointers: every row's `k` values lie in `values`.
        assert!(
            !can || values.len() >= (m - 1) * rs + k,
            "bf16 matmul: lhs too small"
        );
        can.then_some(InPlace(values.as_ptr() as *const half::bf16, rs))
    }

    /// Block `blk` (its first `rows` rows valid) for the pairs `p0..p0 + pairs` of `kp`.
    fn block(self, (blk, rows): (usize, usize), (kp, p0, pairs): (usize, usize, usize)) -> Block {
        match self {
            Lhs::Packed(a) => Block::Packed(a[(blk * kp + p0) * MR..][..pairs * MR].as_ptr()),
            // Rows past `m` read the last row again; the kernel does not store their results.
            Lhs::Rows(InPlace(base, rs)) => Block::Rows(std::array::from_fn(|r| {
                base.wrapping_add((blk * MR + r.min(rows - 1)) * rs + 2 * p0) as *const u32
            })),
        }
    }
}

/// One block of `lhs` as a kernel call reads it: packed pairs, or `MR` row pointers.
#[derive(Clone, Copy)]
enum Block {
    Packed(*const u32),
    Rows([*const u32; MR]),
}

/// `dst (+)= a · b` for the packed operands.
fn compute(
    dst: &mut [f32],
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    (a, b): (Lhs, &[u32]),
    parallel: bool,
) {
    let kp = k.div_ceil(2);
    let (blocks, panels) = (m.div_ceil(MR), n.div_ceil(NR));
    let groups = panels.div_ceil(GROUP);
    // With too few column groups to keep every thread busy, row blocks are split too.
    let chunks = if parallel {
        (2 * rayon::current_num_threads())
            .div_ceil(groups)
            .clamp(1, blocks)
    } else {
        1
    };
    let per_chunk = blocks.div_ceil(chunks);
    let out = Out(dst.as_mut_ptr());
    let task = |t: usize| {
        let (group, chunk) = (t % groups, t / groups);
        let (pan0, pan1) = (group * GROUP, ((group + 1) * GROUP).min(panels));
        let (b0, b1) = (chunk * per_chunk, ((chunk + 1) * per_chunk).min(blocks));
        for p0 in (0..kp).step_by(KC) {
            let pairs = KC.min(kp - p0);
            let add = accumulate || p0 > 0;
            for blk in b0..b1 {
                let rows = MR.min(m - blk * MR);
                let ablk = a.block((blk, rows), (kp, p0, pairs));
                for pan in pan0..pan1 {
                    let (col, bpan) = (pan * NR, &b[(pan * kp + p0) * NR..][..pairs * NR]);
                    let cols = NR.min(n - col);
                    // SAFETY: `ablk` reads `pairs` pairs of `MR` rows and `bpan` holds `pairs`
                    // pairs of `NR` columns; the kernel writes `rows x cols` at stride `n` from
                    // row `blk·MR`, column `col`, inside `dst` (`m·n` long), a tile no other
                    // task touches (tasks own disjoint panel groups and row-block ranges).
                    unsafe {
                        let tile = Tile {
                            c: out.at(blk * MR * n + col),
                            ldc: n,
                            rows,
                            cols,
                            accumulate: add,
                        };
                        kernel(pairs, ablk, bpan.as_ptr(), tile);
                    }
                }
            }
        }
    };
    if parallel {
        (0..groups * chunks).into_par_iter().for_each(task);
    } else {
        (0..groups * chunks).for_each(task);
    }
}

/// Rows `blk·MR..` of `lhs` (`m x k`) as `[pair][row]` into `out` (`kp·MR`), zeros past `m`
/// and past `k`. (An `lhs` stored transposed is packed by rows in [`pack_by_rows`].)
fn pack_lhs<E: Elem>(
    (lhs, rs, cs): Operand<E>,
    (m, k): (usize, usize),
    blk: usize,
    out: &mut [u32],
) {
    let rows = MR.min(m - blk * MR);
    let at = |r: usize, kk: usize| lhs[(blk * MR + r) * rs + kk * cs].to_f32();
    let kp = k.div_ceil(2);
    if cs == 1 {
        // Each row's k values are contiguous: 16 pairs of each row per conversion, transposed
        // eight rows at a time.
        let row = |r: usize| (r < rows).then(|| &lhs[(blk * MR + r) * rs..][..k]);
        let rows: [Option<&[E]>; MR] = std::array::from_fn(row);
        for p0 in (0..kp).step_by(16) {
            let chunks = rows.map(|r| window(r, 2 * p0));
            transposed_pairs(chunks, &mut out[p0 * MR..], MR, (kp - p0).min(16));
        }
    } else {
        for r in 0..MR {
            for p in 0..kp {
                out[p * MR + r] = match r < rows {
                    true => pair(
                        at(r, 2 * p),
                        if 2 * p + 1 < k { at(r, 2 * p + 1) } else { 0.0 },
                    ),
                    false => 0,
                };
            }
        }
    }
}

/// Pairs `pairs` of columns `col..col + cols` of `rhs` (`k x n`) into `out`, as
/// `[panel][pair][column]` (`pairs.len()` pairs per panel), zeros past the columns and past
/// `k`. (When all of `rhs` is packed, [`pack_by_rows`] reads an `rhs` with contiguous rows by
/// rows.)
fn pack_rhs<E: Elem>(
    (rhs, rs, cs): Operand<E>,
    k: usize,
    (col, cols): (usize, usize),
    pairs: std::ops::Range<usize>,
    out: &mut [u32],
) {
    let (first, kp) = (pairs.start, pairs.len());
    assert!(out.len() >= cols.div_ceil(NR) * kp * NR && pairs.end <= k.div_ceil(2));
    if cs == 1 {
        // SAFETY: the CPU has the features (callers check `available`); `out` holds the
        // panels (asserted above); the rows' columns `col..col + cols` exist.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            let out = (Packed(out.as_mut_ptr()), kp, first);
            pack_rows_avx512::<E, NR>((&rhs[col..], rs), (k, cols), pairs, out)
        };
        return;
    }
    for (pan, out) in out.chunks_mut(kp * NR).take(cols.div_ceil(NR)).enumerate() {
        let (col, cols) = (col + pan * NR, (cols - pan * NR).min(NR));
        if rs == 1 {
            // Columns contiguous: 16 pairs of each column per conversion, transposed eight
            // columns at a time.
            for c0 in (0..NR).step_by(8) {
                let column = |c: usize| (c0 + c < cols).then(|| &rhs[(col + c0 + c) * cs..][..k]);
                let columns: [Option<&[E]>; 8] = std::array::from_fn(column);
                for q0 in pairs.clone().step_by(16) {
                    transposed_pairs(
                        columns.map(|c| window(c, 2 * q0)),
                        &mut out[(q0 - first) * NR + c0..],
                        NR,
                        (pairs.end - q0).min(16),
                    );
                }
            }
        } else {
            for p in pairs.clone() {
                let kk = 2 * p;
                for c in 0..NR {
                    out[(p - first) * NR + c] = if c < cols {
                        let at = |kk: usize| rhs[kk * rs + (col + c) * cs].to_f32();
                        pair(at(kk), if kk + 1 < k { at(kk + 1) } else { 0.0 })
                    } else {
                        0
                    };
                }
            }
        }
    }
}

/// Values `from..from + 32` of `values` (fewer at its end).
fn window<E>(values: Option<&[E]>, from: usize) -> Option<&[E]> {
    values.map(|v| &v[from..(from + 32).min(v.len())])
}

/// Eight sources of up to 32 consecutive values (`k` order; `None` is zeros) as pairs,
/// transposed: pair `p` of source `s` goes to `out[p·stride + s]`, for the first `count` pairs.
fn transposed_pairs<E: Elem>(src: [Option<&[E]>; 8], out: &mut [u32], stride: usize, count: usize) {
    assert!(count <= 16 && out.len() >= (count - 1) * stride + 8);
    // SAFETY: the callers checked the features; the stores stay in `out` (asserted above).
    #[cfg(target_arch = "x86_64")]
    unsafe {
        transposed_pairs_avx512(&src, out, stride, count)
    };
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("the bf16 matmul is x86-64 only")
}

#[cfg(target_arch = "x86_64")]
fn mask(len: usize) -> __mmask16 {
    ((1u32 << len.min(16)) - 1) as __mmask16
}

/// 16 pairs from the `len` (up to 32) consecutive values at `src` (`k` order), zeros past them.
///
/// # Safety
/// The CPU has the features; `src` points to `len` values.
#[inline]
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn consecutive_pairs<E: Elem>(src: *const E, len: usize) -> __m512i {
    // SAFETY (whole body): the masks keep the loads inside the `len` values.
    unsafe {
        if E::BF16 {
            // bf16 pairs in order are already what the kernel reads.
            let m = if len >= 32 { !0 } else { (1u32 << len) - 1 };
            _mm512_maskz_loadu_epi16(m, src as *const i16)
        } else {
            let src = src as *const f32;
            let first = _mm512_maskz_loadu_ps(mask(len), src);
            let second = _mm512_maskz_loadu_ps(mask(len.saturating_sub(16)), src.add(len.min(16)));
            // [first as bf16 | second as bf16] is the pairs in order.
            std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(second, first))
        }
    }
}

/// 16 pairs `(lo[i], hi[i])` (`hi` zero when absent) of the first `len` (up to 16) values,
/// zeros past them.
///
/// # Safety
/// The CPU has the features; `lo` and `hi` point to `len` values.
#[inline]
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn row_pairs<E: Elem>(lo: *const E, hi: Option<*const E>, len: usize) -> __m512i {
    // SAFETY (whole body): the masks keep the loads inside the `len` values.
    unsafe {
        let m = mask(len);
        if E::BF16 {
            let load = |p: *const E| _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p as _));
            let l = load(lo);
            match hi {
                Some(h) => _mm512_or_si512(l, _mm512_slli_epi32::<16>(load(h))),
                None => l,
            }
        } else {
            let l = _mm512_maskz_loadu_ps(m, lo as *const f32);
            let h = match hi {
                Some(h) => _mm512_maskz_loadu_ps(m, h as *const f32),
                None => _mm512_setzero_ps(),
            };
            // Words [lo0..lo15, hi0..hi15] -> [lo0, hi0, lo1, hi1, ...].
            let packed = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(h, l));
            let index = _mm512_set_epi16(
                31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5,
                20, 4, 19, 3, 18, 2, 17, 1, 16, 0,
            );
            _mm512_permutexvar_epi16(index, packed)
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn transposed_pairs_avx512<E: Elem>(
    src: &[Option<&[E]>; 8],
    out: &mut [u32],
    stride: usize,
    count: usize,
) {
    // SAFETY (whole body): the loads stay in each source; the caller checked `out`.
    unsafe {
        let rows: [__m512i; 8] = std::array::from_fn(|s| match src[s] {
            Some(v) => consecutive_pairs(v.as_ptr(), v.len()),
            None => _mm512_setzero_si512(),
        });
        for half in 0..2 {
            let r: [__m256i; 8] = std::array::from_fn(|s| match half {
                0 => _mm512_castsi512_si256(rows[s]),
                _ => _mm512_extracti64x4_epi64::<1>(rows[s]),
            });
            let columns = transpose8x8(r);
            for (j, column) in columns.iter().enumerate() {
                let p = 8 * half + j;
                if p < count {
                    _mm256_storeu_si256(out.as_mut_ptr().add(p * stride) as *mut _, *column);
                }
            }
        }
    }
}

/// The 8x8 transpose of 32-bit values: column `j` of `r` as vector `j`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn transpose8x8(r: [__m256i; 8]) -> [__m256i; 8] {
    let t: [__m256i; 8] = std::array::from_fn(|i| {
        let (a, b) = (r[2 * (i / 2)], r[2 * (i / 2) + 1]);
        if i % 2 == 0 {
            _mm256_unpacklo_epi32(a, b)
        } else {
            _mm256_unpackhi_epi32(a, b)
        }
    });
    // t: [0] lo(r0,r1) [1] hi(r0,r1) [2] lo(r2,r3) [3] hi(r2,r3), then rows 4..8.
    let u = |x: __m256i, y: __m256i, lo: bool| {
        if lo {
            _mm256_unpacklo_epi64(x, y)
        } else {
            _mm256_unpackhi_epi64(x, y)
        }
    };
    // u[j] holds column j (j < 4) of rows 0..4 in its low lane and column j + 4 in its high
    // lane; v[j] the same for rows 4..8.
    let u4 = [
        u(t[0], t[2], true),
        u(t[0], t[2], false),
        u(t[1], t[3], true),
        u(t[1], t[3], false),
    ];
    let v4 = [
        u(t[4], t[6], true),
        u(t[4], t[6], false),
        u(t[5], t[7], true),
        u(t[5], t[7], false),
    ];
    std::array::from_fn(|j| {
        if j < 4 {
            _mm256_permute2x128_si256::<0x20>(u4[j], v4[j])
        } else {
            _mm256_permute2x128_si256::<0x31>(u4[j - 4], v4[j - 4])
        }
    })
}

/// Pairs `pairs` of `src` (`k x n` with contiguous rows at stride `rs`) into every panel of
/// `out` (`[panel][pair][column]`, panels `W` columns wide, `kp` pairs each, from pair
/// `first`), zeros past `n` and `k`. Packs `rhs` (`W = NR`), and `lhs` stored transposed
/// (`W = MR`, its rows as columns).
///
/// # Safety
/// The CPU has the features; `out` points to `n.div_ceil(W)·kp·W` values, and `pairs` lies in
/// `first..first + kp`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn pack_rows_avx512<E: Elem, const W: usize>(
    (src, rs): (&[E], usize),
    (k, n): (usize, usize),
    pairs: std::ops::Range<usize>,
    (out, kp, first): (Packed, usize, usize),
) {
    const { assert!(W.is_multiple_of(16) || W == 8) };
    let width = n.div_ceil(W) * W;
    let at = |p: usize, c: usize| ((c / W) * kp + p - first) * W + c % W;
    // Short row pieces (a few panels of a wide `rhs`, streamed) are fetched ahead: the
    // hardware does not follow reads that jump from row to row.
    let size = std::mem::size_of::<E>();
    let ahead = n * size <= 1024;
    for p in pairs {
        let lo = &src[2 * p * rs..][..n];
        let hi = (2 * p + 1 < k).then(|| &src[(2 * p + 1) * rs..][..n]);
        if ahead && 2 * (p + 4) + 1 < k {
            let next = src.as_ptr().wrapping_add(2 * (p + 4) * rs) as *const i8;
            for off in (0..n * size).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(off));
                _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(rs * size + off));
            }
        }
        for c in (0..width).step_by(16) {
            let (from, len) = (c.min(n), n.saturating_sub(c).min(16));
            // SAFETY: the loads read `len` values inside the rows; the stores are pair `p`'s
            // values for columns `c..` (up to `width`) in `out`.
            unsafe {
                let hi = hi.map(|h| h.as_ptr().add(from));
                let pairs = row_pairs(lo.as_ptr().add(from), hi, len);
                if W.is_multiple_of(16) {
                    _mm512_storeu_si512(out.0.add(at(p, c)) as *mut _, pairs);
                } else {
                    let low = _mm512_castsi512_si256(pairs);
                    _mm256_storeu_si256(out.0.add(at(p, c)) as *mut _, low);
                    if c + 8 < width {
                        let high = _mm512_extracti64x4_epi64::<1>(pairs);
                        _mm256_storeu_si256(out.0.add(at(p, c + 8)) as *mut _, high);
                    }
                }
            }
        }
    }
}

/// Where a kernel call's result goes: `rows x cols` (of its `MR x NR`) at `c`, row stride
/// `ldc`, added to what is there when `accumulate`.
#[derive(Clone, Copy)]
struct Tile {
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    accumulate: bool,
}

/// `tile` (+)= the `a` block times the packed `b` panel over `pairs` pairs.
unsafe fn kernel(pairs: usize, a: Block, b: *const u32, tile: Tile) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: forwarded from the caller; `matmul` checked the features.
    unsafe {
        match a {
            Block::Packed(a) => kernel_vectors(pairs, PackedA(a), b, tile),
            Block::Rows(rows) => kernel_vectors(pairs, RowsA(rows), b, tile),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (pairs, a, b, tile);
        unreachable!("the bf16 matmul is x86-64 only")
    }
}

/// [`kernel`] for the panel's width in vectors.
#[cfg(target_arch = "x86_64")]
unsafe fn kernel_vectors<A: ReadA>(pairs: usize, a: A, b: *const u32, tile: Tile) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match tile.cols.div_ceil(16) {
            1 => kernel_avx512::<1, A>(pairs, a, b, tile),
            2 => kernel_avx512::<2, A>(pairs, a, b, tile),
            _ => kernel_avx512::<NV, A>(pairs, a, b, tile),
        }
    }
}

/// How a kernel call reads its block of `lhs`.
trait ReadA: Copy {
    /// Pair `p` of row `r`.
    ///
    /// # Safety
    /// `r < MR` and `p` is below the call's pair count.
    unsafe fn at(self, r: usize, p: usize) -> u32;
}

/// A packed block: `[pair][row]`.
#[derive(Clone, Copy)]
struct PackedA(*const u32);

impl ReadA for PackedA {
    #[inline(always)]
    unsafe fn at(self, r: usize, p: usize) -> u32 {
        // SAFETY: the block holds the call's pairs of `MR` rows.
        unsafe { *self.0.add(p * MR + r) }
    }
}

/// A block read in place: each row's pairs are consecutive `u32`s (of bf16 values).
#[derive(Clone, Copy)]
struct RowsA([*const u32; MR]);

impl ReadA for RowsA {
    #[inline(always)]
    unsafe fn at(self, r: usize, p: usize) -> u32 {
        // SAFETY: each row pointer reaches the call's pairs; bf16 rows need not be 4-aligned.
        unsafe { self.0[r].add(p).read_unaligned() }
    }
}

/// [`kernel`] for panels of `V` vectors (the last panel of a narrow matrix uses fewer).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn kernel_avx512<const V: usize, A: ReadA>(pairs: usize, a: A, b: *const u32, tile: Tile) {
    let Tile {
        c,
        ldc,
        rows,
        cols,
        accumulate,
    } = tile;
    // SAFETY (whole body): the caller guarantees the extents documented on `kernel`.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); V]; MR];
        for p in 0..pairs {
            let bp = b.add(p * NR);
            let mut bv = [std::mem::transmute::<__m512i, __m512bh>(_mm512_setzero_si512()); V];
            for (v, x) in bv.iter_mut().enumerate() {
                *x = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                    bp.add(16 * v) as *const _
                ));
            }
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let av =
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(a.at(r, p) as i32));
                for v in 0..V {
                    acc_r[v] = _mm512_dpbf16_ps(acc_r[v], av, bv[v]);
                }
            }
        }
        for (r, acc_r) in acc.iter().enumerate().take(rows) {
            let row = c.add(r * ldc);
            for (v, &x) in acc_r.iter().enumerate() {
                let m = mask(cols.saturating_sub(16 * v));
                let ptr = row.add(16 * v);
                let x = if accumulate {
                    _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, ptr))
                } else {
                    x
                };
                _mm512_mask_storeu_ps(ptr, m, x);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pseudo-random bf16 values in [-0.5, 0.5) from `seed`.
    fn values(seed: u64) -> impl FnMut() -> half::bf16 {
        let mut state = seed;
        move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            half::bf16::from_f32(((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5)
        }
    }

    /// Values bf16 holds exactly, so the bf16 product is the f32 one up to summation order, over
    /// shapes that reach every edge (odd `k`, partial row blocks and panels, one- and two-vector
    /// panels, several `k` blocks and column groups, row chunks) and every packing path (rows
    /// or columns contiguous, general strides), accumulating or not, serial and parallel.
    #[test]
    fn bf16_matmul_matches_f32_on_bf16_values() {
        if !available() {
            eprintln!("skipped: no AVX512-BF16 on this CPU");
            return;
        }
        let mut bf16_next = values(7);
        let mut next = || bf16_next().to_f32();
        for &(m, n, k) in &[
            (1, 1, 1),
            (8, 48, 2),
            (13, 45, 7),
            (9, 17, 33),
            (19, 300, 600),
            (70, 33, 513),
            (3, 700, 260),
        ] {
            for (accumulate, layout, parallel) in [
                (false, 0, false),
                (true, 1, true),
                (false, 2, true),
                (true, 0, true),
            ] {
                let lhs: Vec<f32> = (0..m * k).map(|_| next()).collect();
                // Enough room for the general strides below.
                let rhs: Vec<f32> = (0..2 * k * n + 1).map(|_| next()).collect();
                let start: Vec<f32> = (0..m * n).map(|_| next()).collect();
                // lhs row-major or transposed; rhs row-major, transposed or spread out.
                let lhs_s = if layout == 1 { (1, m) } else { (k, 1) };
                let rhs_s = match layout {
                    0 => (n, 1),
                    1 => (1, k),
                    _ => (2 * n, 2),
                };
                let mut want = start.clone();
                super::super::gemm::matmul(
                    &mut want,
                    (m, n, k),
                    accumulate,
                    (&lhs, lhs_s.0, lhs_s.1),
                    (&rhs, rhs_s.0, rhs_s.1),
                    super::super::gemm::Product::SERIAL,
                );
                let mut got = start.clone();
                matmul(
                    &mut got,
                    (m, n, k),
                    accumulate,
                    (&lhs, lhs_s.0, lhs_s.1),
                    (&rhs, rhs_s.0, rhs_s.1),
                    parallel,
                );
                let err = got
                    .iter()
                    .zip(&want)
                    .fold(0f32, |e, (a, b)| e.max((a - b).abs()));
                assert!(err < 1e-4, "{m}x{n}x{k} {accumulate} {layout}: {err}");
            }
        }
    }

    /// Few rows or few columns take the streamed and transposed paths, which sum each product
    /// in the blocked path's order: bitwise its results, as is a product with `lhs` packed
    /// beforehand, over odd `k`, partial blocks and
    /// panels, every `rhs` layout (rows or columns contiguous, general strides), bf16 and f32
    /// operands, accumulating or not, serial and parallel.
    #[test]
    fn streamed_transposed_and_prepacked_products_are_the_blocked_ones_bit_for_bit() {
        if !available() {
            eprintln!("skipped: no AVX512-BF16 on this CPU");
            return;
        }
        let mut next = values(13);
        for &(m, n, k, path) in &[
            (1029, 37, 515, Path::Transposed),
            (700, 90, 801, Path::Transposed),
            (37, 1100, 513, Path::Streamed),
            (5, 2000, 300, Path::Streamed),
            (90, 700, 777, Path::Streamed),
        ] {
            assert_eq!(Path::of(m, n, k), path, "{m}x{n}x{k}");
            for (accumulate, layout, parallel) in [
                (false, 0, true),
                (true, 1, false),
                (false, 2, true),
                (true, 1, true),
            ] {
                let lhs: Vec<half::bf16> = (0..m * k).map(|_| next()).collect();
                let rhs: Vec<f32> = (0..2 * k * n + 1).map(|_| next().to_f32()).collect();
                let start: Vec<f32> = (0..m * n).map(|_| next().to_f32()).collect();
                let l = match layout {
                    1 => (&lhs[..], 1, m),
                    _ => (&lhs[..], k, 1),
                };
                let r = match layout {
                    0 => (&rhs[..], n, 1),
                    1 => (&rhs[..], 1, k),
                    _ => (&rhs[..], 2 * n, 2),
                };
                let mut want = start.clone();
                blocked(&mut want, (m, n, k), accumulate, l, r, parallel);
                let same = |got: &[f32]| {
                    got.iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits())
                };
                let mut got = start.clone();
                matmul(&mut got, (m, n, k), accumulate, l, r, parallel);
                let case = format!("{m}x{n}x{k} {accumulate} {layout} {parallel}");
                assert!(same(&got), "{case} {path:?}");
                // And with `lhs` packed beforehand (Winograd's weights).
                let mut got = start.clone();
                let packed = PackedLhs::new(l, (m, k));
                matmul_lhs_packed(&mut got, n, accumulate, &packed, r, parallel);
                assert!(same(&got), "{case} packed lhs");
            }
        }
    }

    /// bf16 operands read as stored pack to the same pairs as their values widened to f32 (or
    /// are those pairs, read in place), so the products are identical bit for bit, over every
    /// packing path.
    #[test]
    fn bf16_operands_give_the_f32_operands_products() {
        if !available() {
            eprintln!("skipped: no AVX512-BF16 on this CPU");
            return;
        }
        let mut next = values(11);
        // Even `k` with contiguous rows: the bf16 `lhs` is read in place, not packed.
        let shapes = [
            (13, 45, 7),
            (9, 17, 33),
            (19, 300, 600),
            (70, 33, 513),
            (70, 33, 514),
        ];
        for &(m, n, k) in &shapes {
            for layout in 0..3 {
                let lhs: Vec<half::bf16> = (0..m * k).map(|_| next()).collect();
                let rhs: Vec<half::bf16> = (0..2 * k * n + 1).map(|_| next()).collect();
                let wide = |v: &[half::bf16]| v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
                let (lhs32, rhs32) = (wide(&lhs), wide(&rhs));
                let lhs_s = if layout == 1 { (1, m) } else { (k, 1) };
                let rhs_s = [(n, 1), (1, k), (2 * n, 2)][layout];
                let mut want = vec![0.0; m * n];
                let (l, r) = (
                    (&lhs32[..], lhs_s.0, lhs_s.1),
                    (&rhs32[..], rhs_s.0, rhs_s.1),
                );
                matmul(&mut want, (m, n, k), false, l, r, true);
                let mut got = vec![0.0; m * n];
                let (l, r) = ((&lhs[..], lhs_s.0, lhs_s.1), (&rhs[..], rhs_s.0, rhs_s.1));
                matmul(&mut got, (m, n, k), false, l, r, true);
                assert_eq!(got, want, "{m}x{n}x{k} layout {layout}");
                // With `rhs` packed beforehand (attention's keys and values).
                let mut got = vec![0.0; m * n];
                matmul_packed(&mut got, m, false, l, &PackedRhs::new(r, (k, n)));
                assert_eq!(got, want, "{m}x{n}x{k} layout {layout}, packed rhs");
            }
        }
    }

    /// Values bf16 does not hold are rounded to nearest even, as torch's `.to(torch.bfloat16)`.
    #[test]
    fn operands_are_rounded_to_nearest_even() {
        if !available() {
            eprintln!("skipped: no AVX512-BF16 on this CPU");
            return;
        }
        // 1 + 2^-8 is halfway between two bf16 values: ties to even (1.0); 1 + 3·2^-9 rounds up.
        let lhs = [1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-9)];
        let rhs = [1.0, 1.0];
        let mut got = [0.0];
        matmul(
            &mut got,
            (1, 1, 2),
            false,
            (&lhs, 2, 1),
            (&rhs, 1, 1),
            false,
        );
        assert_eq!(got[0], 1.0 + (1.0 + 2f32.powi(-7)));
    }
}
