//! Parallel output buffers for the kernels: built chunk by chunk on the thread pool, and
//! partial sums added in a fixed order (so results do not depend on the thread count).

use rayon::prelude::*;

/// A new `len`-element vector built in parallel, `chunk` elements per task: each task zeroes its
/// own chunk and hands it to `f` with the chunk's index; `f`'s results come back in chunk order.
///
/// `vec![0.0; len]` zeroes on the calling thread before any task starts. Once freed activations
/// are reused from the heap (see [`crate::tune_allocator`]) that serial `memset` was a share of
/// a training step's samples, all on one core (docs/benchmarks.md); here it is spread over the
/// tasks, each on memory it is about to write anyway.
pub(crate) fn par_new<R: Send>(
    len: usize,
    chunk: usize,
    f: impl Fn(usize, &mut [f32]) -> R + Sync + Send,
) -> (Vec<f32>, Vec<R>) {
    let zero_then_f = |i, c: &mut [std::mem::MaybeUninit<f32>]| {
        for e in c.iter_mut() {
            e.write(0.0);
        }
        // SAFETY: every element of `c` was initialised just above, and `MaybeUninit<f32>` has
        // the layout of `f32`.
        f(i, unsafe {
            &mut *(c as *mut [std::mem::MaybeUninit<f32>] as *mut [f32])
        })
    };
    // SAFETY: `zero_then_f` writes every element of its chunk before anything else.
    unsafe { par_new_uninit(len, chunk, zero_then_f) }
}

/// [`par_new`] without the zeroing, for kernels that write every output element exactly once
/// (element-wise activations, normalisations): each task gets its chunk uninitialised. Zeroing
/// first would be one more full write pass over an output that is often larger than the caches.
///
/// # Safety
/// `f` must write every element of the chunk it is given (a chunk `f` returns from without
/// writing would be read as uninitialised memory).
pub(crate) unsafe fn par_new_uninit<R: Send>(
    len: usize,
    chunk: usize,
    f: impl Fn(usize, &mut [std::mem::MaybeUninit<f32>]) -> R + Sync + Send,
) -> (Vec<f32>, Vec<R>) {
    let mut v = Vec::<f32>::with_capacity(len);
    let results = v.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .map(|(i, c)| f(i, c))
        .collect();
    // SAFETY: the chunks cover `0..len` and the caller guarantees `f` wrote each one (a panic
    // in `f` propagates before this line).
    unsafe { v.set_len(len) };
    (v, results)
}

/// Adds per-chunk partial gradients `(a, b)` in chunk order (zeros of `lens` when there are none):
/// the fixed summation order that makes the kernels' batch sums independent of threading.
pub(crate) fn sum_in_order(
    partials: Vec<(Vec<f32>, Vec<f32>)>,
    lens: (usize, usize),
) -> (Vec<f32>, Vec<f32>) {
    let mut parts = partials.into_iter();
    let (mut a, mut b) = parts
        .next()
        .unwrap_or_else(|| (vec![0.0; lens.0], vec![0.0; lens.1]));
    for (pa, pb) in parts {
        a.iter_mut().zip(&pa).for_each(|(x, y)| *x += y);
        b.iter_mut().zip(&pb).for_each(|(x, y)| *x += y);
    }
    (a, b)
}
