//! The LoRA adapter itself (Hu et al. 2021, PEFT's `lora.Linear`): two factors on a
//! [`Linear`](crate::nn::Linear), their initialisation, and the input dropout whose masks
//! replay on resume.
//!
//! This file sits at the layers' level (`nn::Linear` holds an `Option<LoraAdapter>`); the
//! rest of `lora` (config, target selection, merging, parameter groups) builds on the models.

use std::cell::RefCell;

use burn::module::{Module, Param};
use burn::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::dtype::as_dtype;
use crate::nn::init;
use crate::nn::times_transposed;

/// One factor of a LoRA adapter, `weight` in PyTorch's `[out, in]` layout.
#[derive(Module, Debug)]
pub struct LoraFactor {
    pub weight: Param<Tensor<2>>,
}

/// A LoRA adapter on a [`Linear`](crate::nn::Linear): `down` `[rank, in]`, `up` `[out, rank]`, added as
/// `scale · up(down(dropout(x)))` with `scale = alpha / rank`. Computed factored (two thin
/// products, never the dense `up · down`), as PEFT does.
#[derive(Module, Debug)]
pub struct LoraAdapter {
    pub down: LoraFactor,
    pub up: LoraFactor,
    pub scale: f64,
    pub dropout: f64,
}

/// Where this thread's LoRA dropout masks come from: one ChaCha stream per adapted-layer call
/// (in forward order) under the step's `seed`, read from the position of sample `offset` of the
/// global batch. A sample's mask therefore depends on the step, the layer and its place in the
/// global batch, not on how the batch is split over ranks or threads.
struct DropoutStream {
    seed: u64,
    offset: usize,
    calls: u64,
}

thread_local! {
    /// `None` (the default, and always outside training) means no dropout.
    static LORA_DROPOUT: RefCell<Option<DropoutStream>> = const { RefCell::new(None) };
}

/// Turns LoRA dropout on for this thread, for a slice of the global batch starting at sample
/// `offset`, with masks drawn under `seed` (the training objective draws it from the run's
/// stream each step, so resume replays the same masks); or off with `None`.
pub fn set_lora_dropout_seed(seed: Option<(u64, usize)>) {
    LORA_DROPOUT.with(|r| {
        *r.borrow_mut() = seed.map(|(seed, offset)| DropoutStream {
            seed,
            offset,
            calls: 0,
        })
    });
}

pub(crate) fn lora_dropout<const D: usize>(x: Tensor<D>, p: f64) -> Tensor<D> {
    if p <= 0.0 {
        return x;
    }
    let dims = x.dims();
    let n: usize = dims.iter().product();
    // Values per sample (dimension 0 is the batch everywhere adapters run).
    let per = n / dims[0].max(1);
    let keep = (1.0 / (1.0 - p)) as f32;
    let mask: Option<Vec<f32>> = LORA_DROPOUT.with(|r| {
        r.borrow_mut().as_mut().map(|s| {
            let mut rng = ChaCha8Rng::seed_from_u64(s.seed);
            rng.set_stream(s.calls);
            s.calls += 1;
            // Each f64 draw takes two 32-bit words: skip the samples before this slice.
            rng.set_word_pos(2 * (s.offset * per) as u128);
            (0..n)
                .map(|_| if rng.random::<f64>() < p { 0.0 } else { keep })
                .collect()
        })
    });
    match mask {
        Some(m) => {
            let m = Tensor::<D>::from_data(TensorData::new(m, dims), &x.device()).cast(x.dtype());
            x * m
        }
        None => x,
    }
}

impl LoraAdapter {
    /// A fresh adapter for a `[out, in]` weight: `down` from `init`, `up` zero, so the layer
    /// starts exactly at its base.
    pub fn new(
        in_features: usize,
        out_features: usize,
        rank: usize,
        alpha: f64,
        dropout: f64,
        init: LoraInit,
        device: &Device,
    ) -> Self {
        let down = match init {
            // PEFT's `init_lora_weights="gaussian"` (diffusers' LoRA scripts): N(0, 1/r).
            LoraInit::Gaussian => {
                let values = init::normal_values(rank * in_features, 1.0 / rank as f64);
                Tensor::from_data(TensorData::new(values, [rank, in_features]), device)
            }
            // kohya / PEFT's default: Kaiming-uniform with a = sqrt(5), as torch.nn.Linear.
            LoraInit::Kaiming => init::torch_uniform([rank, in_features], in_features, device),
        };
        Self {
            down: LoraFactor {
                weight: Param::from_tensor(down),
            },
            up: LoraFactor {
                weight: Param::from_tensor(Tensor::zeros([out_features, rank], device)),
            },
            scale: alpha / rank as f64,
            dropout,
        }
    }

    pub fn rank(&self) -> usize {
        self.down.weight.dims()[0]
    }

    /// The adapter's output for the layer input `x`: `scale · up(down(dropout(x)))`, computed
    /// factored in `x`'s dtype (the factors are cast to it, differentiably).
    ///
    /// # Shapes
    /// - `x` `[..., in]`; returns `[..., out]`
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dtype = x.dtype();
        let w = |p: &Param<Tensor<2>>| as_dtype(p.val(), dtype);
        let h = times_transposed(lora_dropout(x, self.dropout), w(&self.down.weight));
        times_transposed(h, w(&self.up.weight)).mul_scalar(self.scale)
    }

    /// `scale · up · down`, `[out, in]`: the adapter's change to the weight.
    pub fn delta(&self) -> Tensor<2> {
        self.up
            .weight
            .val()
            .matmul(self.down.weight.val())
            .mul_scalar(self.scale)
    }
}

/// How a fresh LoRA `down` factor is drawn (`lora.init`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraInit {
    Gaussian,
    Kaiming,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::to_host;

    #[test]
    fn lora_dropout_masks_follow_the_sample_not_the_split() {
        let device = Device::flex();
        let x = Tensor::<3>::ones([4, 3, 5], &device);
        let masks = |offset: usize, rows: std::ops::Range<usize>| {
            set_lora_dropout_seed(Some((7, offset)));
            let first = to_host(lora_dropout(x.clone().slice(rows.clone()), 0.5));
            let second = to_host(lora_dropout(x.clone().slice(rows), 0.5));
            set_lora_dropout_seed(None);
            (first, second)
        };
        let (full, full_next) = masks(0, 0..4);
        let (tail, tail_next) = masks(2, 2..4);
        assert_eq!(tail, full[2 * 15..]);
        assert_eq!(tail_next, full_next[2 * 15..]);
        // Another layer call gets another mask; about half is dropped.
        assert_ne!(full, full_next);
        let dropped = full.iter().filter(|v| **v == 0.0).count();
        assert!((15..45).contains(&dropped), "{dropped} of 60 dropped");
        // Off: the identity.
        assert_eq!(to_host(lora_dropout(x.clone(), 0.5)), vec![1.0; 60]);
    }
}
