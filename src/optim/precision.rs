//! `train.mixed_precision`, with accelerate's names, and the one place that turns it into the
//! dtype models compute in. Only `no` is built so far (`config` refuses the others); models read
//! their compute dtype from [`compute_dtype`], so adding the others casts in one place.

use burn::tensor::FloatDType;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MixedPrecision {
    No,
    Fp16,
    Bf16,
}

/// The dtype activations are computed in.
pub fn compute_dtype(precision: MixedPrecision) -> FloatDType {
    match precision {
        MixedPrecision::No => FloatDType::F32,
        MixedPrecision::Fp16 => FloatDType::F16,
        MixedPrecision::Bf16 => FloatDType::BF16,
    }
}
