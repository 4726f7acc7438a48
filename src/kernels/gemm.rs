//! The matrix product every kernel uses: gemm's f32 kernel, or the bf16 GEMM (`bf16_gemm`)
//! where both operands hold bf16 values and the CPU has AVX512-BF16.

use super::bf16_gemm;

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
// `gemm`'s own argument convention (shape, accumulate, two strided operands, how): one call
// site per kernel, each readable as a GEMM call.
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
