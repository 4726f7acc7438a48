//! Float dtypes of tensors, below everything that computes: [`as_dtype`], the cast every layer
//! and kernel uses to run in its input's dtype under mixed precision.

use burn::prelude::*;
use burn::tensor::DType;

/// `t` in `dtype`: `t` itself when it already is (a cast would add a graph node), else a
/// differentiable cast (its gradient comes back in `t`'s dtype).
pub fn as_dtype<const D: usize>(t: Tensor<D>, dtype: DType) -> Tensor<D> {
    if t.dtype() == dtype { t } else { t.cast(dtype) }
}

/// `t` in f32 (a no-op when it already is).
pub fn to_f32<const D: usize>(t: Tensor<D>) -> Tensor<D> {
    as_dtype(t, DType::F32)
}
