//! Training kernels that burn's CPU backend lacks, as a burn backend extension.
//!
//! Profiling a training step of the small U-Nets (docs/benchmarks.md) put most of the CPU time
//! in places that are not model code: the backward pass of every convolution (burn computes the
//! input gradient with a transposed convolution whose scatter loop is single-threaded, and the
//! weight gradient as a convolution whose kernel is the whole output gradient), SiLU and softmax
//! (scalar libm `expf`, several single-threaded element-wise passes each way), and
//! GroupNorm/LayerNorm (about ten single-threaded passes forward, twenty backward); in the
//! latent-diffusion U-Net's feed-forward, GELU (scalar libm `erff`).
//! [`TrainOps`] replaces these operations (convolution, transposed convolution, group norm,
//! SiLU, GELU, softmax over the last dimension, attention), and, under bf16 mixed precision,
//! linear layers' products (whose bf16 operands `bf16_gemm` multiplies at twice the f32 rate).
//!
//! This file is an index. The parts:
//!
//! - [`ops`]: the op trait [`TrainOps`] and the public functions layers call ([`conv2d`],
//!   [`conv_transpose2d`], [`group_norm`], [`layer_norm`], [`scaled_dot_product_attention`],
//!   [`silu`], [`gelu`], [`geglu`], [`softmax_last`], [`linear`]); nothing else in the crate
//!   knows this module exists.
//! - `composed`: the trait's default bodies, built from burn operations: what every backend
//!   without its own kernels (CUDA today) runs, and the reference the kernels are tested
//!   against.
//! - `flex`: the CPU (burn Flex) implementation, calling the algorithm files [`conv`]
//!   (+ `winograd`), [`norm`], [`act`], [`attention`] and `bf16_gemm`.
//! - `autodiff`: one autodiff graph node per operation, its backward through the inner
//!   backend's `TrainOps` (so CPU training runs the kernels both ways).
//! - `gemm` (the f32/bf16 product every kernel uses), `convert` (f32 <-> half conversions of
//!   Flex tensors), `parallel` (the parallel buffer helpers): the helpers the algorithm files
//!   import directly.
//! - `tests`: the kernels against the composed bodies (values and gradients, f32 and half).
//!
//! # How to add an op
//! 1. Add a method to [`TrainOps`] in `ops.rs` whose default body calls a new `composed_*`
//!    function in `composed.rs` (burn operations only), and a public function in `ops.rs`
//!    that layers call (it casts statistics ops to f32 off the CPU, as `stats_in_f32` says).
//! 2. Give it a backward: a method for its gradients (default body composed too), and in
//!    `autodiff.rs` a `Backward` node whose backward calls that method on the inner backend,
//!    plus the method's `Autodiff` implementation recording the node.
//! 3. Implement it for Flex in `flex.rs` (geometry check, `convert::f32_values` in,
//!    `convert::flex_tensor_in` out, the algorithm in its own file; fall back to the composed
//!    body where the geometry does not apply). A backend with kernels of its own (CUDA)
//!    overrides the method in its `impl TrainOps`.
//! 4. Test it in `tests.rs` against the composed body: values and gradients, f32 and bf16/f16,
//!    odd shapes; and the algorithm's own unit tests beside it.

/// Runs `$body` compiled for the best instruction set this CPU has. The code is the same in each
/// arm; only the vector width differs, and every operation is exactly rounded IEEE arithmetic
/// (no fused multiply-add is requested), so all arms give identical results.
macro_rules! multiversion {
    (($($arg:ident: $ty:ty),*) => $body:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f")]
            unsafe fn avx512($($arg: $ty),*) { $body }
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($arg: $ty),*) { $body }
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the feature was detected on this CPU.
                return unsafe { avx512($($arg),*) };
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: the features were detected on this CPU.
                return unsafe { avx2($($arg),*) };
            }
        }
        $body
    }};
}

pub mod act;
pub mod attention;
mod autodiff;
mod bf16_gemm;
mod composed;
pub mod conv;
#[macro_use]
mod convert;
mod flex;
mod gemm;
pub mod norm;
pub mod ops;
mod parallel;
#[cfg(test)]
mod tests;
mod winograd;

pub use ops::{
    TrainOps, conv_transpose2d, conv2d, geglu, gelu, group_norm, layer_norm, linear,
    scaled_dot_product_attention, silu, softmax_last,
};
