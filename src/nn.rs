//! Layers stored in PyTorch's layout under PyTorch's parameter names.
//!
//! burn's own `Linear` keeps its weight as `[in, out]` and `GroupNorm` names its affine
//! parameters `gamma`/`beta`. Models here are checkpoint-compatible with diffusers, so their
//! layers store `weight: [out, in]`, `weight`/`bias` for norms, exactly as `torch.nn` does: a
//! module's parameter path *is* the safetensors key and the io module never renames anything.
//! Initialisation follows `torch.nn` defaults (Kaiming-uniform with a = sqrt(5)) and draws from
//! a thread-local host RNG seeded by [`seed_init`], so the same seed gives the same weights on
//! every backend and concurrent runs (tests) cannot disturb each other's draws.

use std::cell::RefCell;

use burn::module::{Module, Param};
use burn::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::dtype::as_dtype;

thread_local! {
    static INIT_RNG: RefCell<ChaCha8Rng> = RefCell::new(ChaCha8Rng::seed_from_u64(0));
    static SKIP_INIT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// The dtype of the zero weights [`without_init`] builds ([`loading_in`]).
    static LOAD_DTYPE: std::cell::Cell<burn::tensor::DType> =
        const { std::cell::Cell::new(burn::tensor::DType::F32) };
}

/// Seeds the weight initialisation of layers built afterwards on this thread.
pub fn seed_init(seed: u64) {
    INIT_RNG.with(|r| *r.borrow_mut() = ChaCha8Rng::seed_from_u64(seed));
}

/// Builds layers with zero weights and no random draws: for models about to be loaded from a
/// file (drawing 860M random numbers for a Stable Diffusion U-Net that is then overwritten would
/// take seconds). The init RNG is not advanced.
pub fn without_init<T>(build: impl FnOnce() -> T) -> T {
    let before = SKIP_INIT.with(|s| s.replace(true));
    let out = build();
    SKIP_INIT.with(|s| s.set(before));
    out
}

/// A tensor's values on the host as `f32`, whatever its dtype.
pub fn to_host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 after convert")
}

fn skipping_init() -> bool {
    SKIP_INIT.with(|s| s.get())
}

/// Runs `load` (which builds layers with [`without_init`] and then reads their weights from a
/// file) with the zero weights built in `dtype`: the loader converts each tensor to its
/// parameter's dtype as it reads it, so a model loaded for mixed precision never exists in f32
/// (a Stable Diffusion U-Net: 1.7 GB in bf16 instead of 3.4 GB in f32 and then a cast).
/// Parameters built outside `without_init` (norms' ones and zeros) stay f32.
pub fn loading_in<T>(dtype: burn::tensor::FloatDType, load: impl FnOnce() -> T) -> T {
    let before = LOAD_DTYPE.with(|d| d.replace(dtype.into()));
    let out = load();
    LOAD_DTYPE.with(|d| d.set(before));
    out
}

/// Zeros in the dtype [`loading_in`] asked for.
fn load_zeros<const D: usize>(shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::zeros(shape, (device, LOAD_DTYPE.with(|d| d.get())))
}

/// `U(-k, k)` with `k = 1 / sqrt(fan_in)`: what `torch.nn.Linear`/`Conv2d` use for both the
/// weight (Kaiming-uniform, a = sqrt(5)) and the bias.
fn torch_uniform<const D: usize>(shape: [usize; D], fan_in: usize, device: &Device) -> Tensor<D> {
    if skipping_init() {
        return load_zeros(shape, device);
    }
    let k = 1.0 / (fan_in.max(1) as f64).sqrt();
    let n = shape.iter().product::<usize>();
    let values: Vec<f32> = INIT_RNG.with(|r| {
        (0..n)
            .map(|_| r.borrow_mut().random_range(-k..k) as f32)
            .collect()
    });
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// `torch.nn.Linear`: `y = x W^T + b`, weight `[out_features, in_features]`, with an optional
/// low-rank adapter (LoRA): `y = x W^T + b + scale · dropout(x) D^T U^T`.
#[derive(Module, Debug)]
pub struct Linear {
    pub weight: Param<Tensor<2>>,
    pub bias: Option<Param<Tensor<1>>>,
    /// Parameter paths `<layer>.lora.down.weight` / `<layer>.lora.up.weight`: the keys
    /// diffusers' LoRA scripts write.
    pub lora: Option<LoraAdapter>,
}

/// One factor of a LoRA adapter, `weight` in PyTorch's `[out, in]` layout.
#[derive(Module, Debug)]
pub struct LoraFactor {
    pub weight: Param<Tensor<2>>,
}

/// A LoRA adapter on a [`Linear`]: `down` `[rank, in]`, `up` `[out, rank]`, added as
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

fn lora_dropout<const D: usize>(x: Tensor<D>, p: f64) -> Tensor<D> {
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
                let std = 1.0 / rank as f64;
                let values: Vec<f32> = INIT_RNG.with(|r| {
                    let mut r = r.borrow_mut();
                    (0..rank * in_features)
                        .map(|_| (r.sample::<f64, _>(rand_distr::StandardNormal) * std) as f32)
                        .collect()
                });
                Tensor::from_data(TensorData::new(values, [rank, in_features]), device)
            }
            // kohya / PEFT's default: Kaiming-uniform with a = sqrt(5), as torch.nn.Linear.
            LoraInit::Kaiming => torch_uniform([rank, in_features], in_features, device),
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

impl Linear {
    pub fn new(in_features: usize, out_features: usize, bias: bool, device: &Device) -> Self {
        Self {
            weight: Param::from_tensor(torch_uniform(
                [out_features, in_features],
                in_features,
                device,
            )),
            bias: bias
                .then(|| Param::from_tensor(torch_uniform([out_features], in_features, device))),
            lora: None,
        }
    }

    /// # Shapes
    /// - input `[..., in_features]`
    /// - output `[..., out_features]`
    ///
    /// Computes in `x`'s dtype: f32 weights are cast to it under mixed precision (the cast is
    /// differentiable, so their gradients stay f32).
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dtype = x.dtype();
        let w = |p: &Param<Tensor<2>>| as_dtype(p.val(), dtype);
        let y = times_transposed(x.clone(), w(&self.weight));
        let y = match &self.bias {
            Some(b) => y + as_dtype(b.val(), dtype).unsqueeze(),
            None => y,
        };
        match &self.lora {
            Some(l) => {
                let h = times_transposed(lora_dropout(x, l.dropout), w(&l.down.weight));
                let h = times_transposed(h, w(&l.up.weight));
                y + h.mul_scalar(l.scale)
            }
            None => y,
        }
    }

    /// Folds the adapter into the weight (`W + scale · up · down`) and removes it.
    pub fn merge_lora(mut self) -> Self {
        if let Some(l) = self.lora.take() {
            let w = self.weight.val() + l.delta().cast(self.weight.val().dtype());
            self.weight = Param::initialized(self.weight.id, w);
        }
        self
    }
}

/// `x · wᵀ` for `x` `[..., in]` and `w` `[out, in]`, with the leading axes flattened into one so
/// the product is a single `[rows, in] · [in, out]` GEMM: burn multiplies a `[b, n, in]` input by
/// a broadcast weight as `b` separate small GEMMs, and its backward then forms `b` weight
/// gradients `[in, out]` and sums them, where one GEMM with inner dimension `b·n` does.
fn times_transposed<const D: usize>(x: Tensor<D>, w: Tensor<2>) -> Tensor<D> {
    let dims = x.dims();
    let rows = dims[..D - 1].iter().product::<usize>();
    let mut out_dims = dims;
    out_dims[D - 1] = w.dims()[0];
    crate::kernels::linear(x.reshape([rows, dims[D - 1]]), w).reshape(out_dims)
}

/// `torch.nn.Conv2d` with square kernel, symmetric zero padding, no groups.
#[derive(Module, Debug)]
pub struct Conv2d {
    pub weight: Param<Tensor<4>>,
    pub bias: Option<Param<Tensor<1>>>,
    pub stride: usize,
    pub padding: usize,
}

impl Conv2d {
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        device: &Device,
    ) -> Self {
        let fan_in = in_channels * kernel * kernel;
        Self {
            weight: Param::from_tensor(torch_uniform(
                [out_channels, in_channels, kernel, kernel],
                fan_in,
                device,
            )),
            bias: Some(Param::from_tensor(torch_uniform(
                [out_channels],
                fan_in,
                device,
            ))),
            stride,
            padding,
        }
    }

    pub fn without_bias(mut self) -> Self {
        self.bias = None;
        self
    }

    /// # Shapes
    /// - input `[batch, in_channels, height, width]`
    /// - output `[batch, out_channels, height', width']`
    /// - computes in `x`'s dtype (the weights are cast to it)
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let dtype = x.dtype();
        crate::kernels::conv2d(
            x,
            as_dtype(self.weight.val(), dtype),
            self.bias.as_ref().map(|b| as_dtype(b.val(), dtype)),
            self.stride,
            self.padding,
        )
    }
}

/// `torch.nn.ConvTranspose2d` (square kernel, no groups), weight `[in, out, k, k]`.
#[derive(Module, Debug)]
pub struct ConvTranspose2d {
    pub weight: Param<Tensor<4>>,
    pub bias: Option<Param<Tensor<1>>>,
    pub stride: usize,
    pub padding: usize,
}

impl ConvTranspose2d {
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        device: &Device,
    ) -> Self {
        // PyTorch computes fan_in from weight.size(1) * k * k for transposed convs.
        let fan_in = out_channels * kernel * kernel;
        Self {
            weight: Param::from_tensor(torch_uniform(
                [in_channels, out_channels, kernel, kernel],
                fan_in,
                device,
            )),
            bias: Some(Param::from_tensor(torch_uniform(
                [out_channels],
                fan_in,
                device,
            ))),
            stride,
            padding,
        }
    }

    /// # Shapes
    /// - input `[batch, in_channels, h, w]`
    /// - output `[batch, out_channels, (h - 1) * stride - 2 * padding + k, ...]`
    /// - computes in `x`'s dtype (the weights are cast to it)
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let dtype = x.dtype();
        let weight = as_dtype(self.weight.val(), dtype);
        match &self.bias {
            Some(b) => crate::kernels::conv_transpose2d(
                x,
                weight,
                as_dtype(b.val(), dtype),
                self.stride,
                self.padding,
            ),
            None => {
                let options = burn::tensor::ops::ConvTransposeOptions::new(
                    [self.stride, self.stride],
                    [self.padding, self.padding],
                    [0, 0],
                    [1, 1],
                    1,
                );
                burn::tensor::module::conv_transpose2d(x, weight, None, options)
            }
        }
    }
}

/// `torch.nn.Embedding`: a lookup table `weight: [num_embeddings, embedding_dim]`.
#[derive(Module, Debug)]
pub struct Embedding {
    pub weight: Param<Tensor<2>>,
}

impl Embedding {
    /// Rows drawn from `U(-bound, bound)` (VQ-VAE codebooks use `bound = 1 / num_embeddings`).
    pub fn uniform(
        num_embeddings: usize,
        embedding_dim: usize,
        bound: f64,
        device: &Device,
    ) -> Self {
        if skipping_init() {
            return Self {
                weight: Param::from_tensor(load_zeros([num_embeddings, embedding_dim], device)),
            };
        }
        let values: Vec<f32> = INIT_RNG.with(|r| {
            (0..num_embeddings * embedding_dim)
                .map(|_| r.borrow_mut().random_range(-bound..bound) as f32)
                .collect()
        });
        let weight = Tensor::from_data(
            TensorData::new(values, [num_embeddings, embedding_dim]),
            device,
        );
        Self {
            weight: Param::from_tensor(weight),
        }
    }

    /// Rows drawn from `N(0, 1)`, `torch.nn.Embedding`'s default.
    pub fn normal(num_embeddings: usize, embedding_dim: usize, device: &Device) -> Self {
        if skipping_init() {
            return Self::uniform(num_embeddings, embedding_dim, 0.0, device);
        }
        let values: Vec<f32> = INIT_RNG.with(|r| {
            (0..num_embeddings * embedding_dim)
                .map(|_| r.borrow_mut().sample::<f32, _>(rand_distr::StandardNormal))
                .collect()
        });
        let weight = Tensor::from_data(
            TensorData::new(values, [num_embeddings, embedding_dim]),
            device,
        );
        Self {
            weight: Param::from_tensor(weight),
        }
    }

    /// # Shapes
    /// - `indices`: `[n]`, values in `0..num_embeddings`; returns `[n, embedding_dim]`
    pub fn forward(&self, indices: Tensor<1, Int>) -> Tensor<2> {
        self.weight.val().select(0, indices)
    }
}

/// `torch.nn.GroupNorm` with affine parameters named `weight`/`bias`.
#[derive(Module, Debug)]
pub struct GroupNorm {
    pub weight: Param<Tensor<1>>,
    pub bias: Param<Tensor<1>>,
    pub num_groups: usize,
    pub eps: f64,
}

impl GroupNorm {
    pub fn new(num_groups: usize, num_channels: usize, eps: f64, device: &Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::ones([num_channels], device)),
            bias: Param::from_tensor(Tensor::zeros([num_channels], device)),
            num_groups,
            eps,
        }
    }

    /// # Shapes
    /// - input `[batch, channels, ...]` (rank 3 or 4), output the same
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        crate::kernels::group_norm(
            x,
            self.weight.val(),
            self.bias.val(),
            self.num_groups,
            self.eps,
        )
    }
}

/// `torch.nn.LayerNorm(normalized_shape)` over the trailing `N` dims, elementwise affine.
#[derive(Module, Debug)]
pub struct LayerNorm<const N: usize> {
    pub weight: Param<Tensor<N>>,
    pub bias: Param<Tensor<N>>,
    pub eps: f64,
}

impl<const N: usize> LayerNorm<N> {
    pub fn new(normalized_shape: [usize; N], device: &Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::ones(normalized_shape, device)),
            bias: Param::from_tensor(Tensor::zeros(normalized_shape, device)),
            eps: 1e-5,
        }
    }

    pub fn with_eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        self
    }

    /// # Shapes
    /// - input `[...leading, ...normalized_shape]` (rank `D > N`), output the same
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        crate::kernels::layer_norm(x, self.weight.val(), self.bias.val(), self.eps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    use burn::tensor::Distribution;

    #[test]
    fn group_norm_normalises_each_group() {
        let device = Device::flex();
        let norm = GroupNorm::new(2, 4, 1e-5, &device);
        let x = Tensor::<4>::random([3, 4, 5, 5], Distribution::Normal(3.0, 2.0), &device);
        let y = norm.forward(x).reshape([3, 2, 50]);
        let mean: Vec<f32> = y
            .clone()
            .mean_dim(2)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let var: Vec<f32> = y.var_bias(2).into_data().try_to_vec::<f32>().unwrap();
        assert!(mean.iter().all(|m| m.abs() < 1e-4), "{mean:?}");
        assert!(var.iter().all(|v| (v - 1.0).abs() < 1e-3), "{var:?}");
    }

    /// Mixed precision at the layer level: a half input makes conv, group norm and linear
    /// compute in half and answer in half, while the f32 weights get f32 gradients close to
    /// those of the f32 computation.
    #[test]
    fn half_inputs_compute_in_half_with_f32_weights_and_gradients() {
        use burn::tensor::DType;
        let device = Device::flex().autodiff();
        seed_init(3);
        let conv = Conv2d::new(3, 8, 3, 1, 1, &device);
        let norm = GroupNorm::new(2, 8, 1e-5, &device);
        let lin = Linear::new(4, 3, true, &device);
        let x = Tensor::<4>::random([2, 3, 4, 4], Distribution::Normal(0.0, 1.0), &device);
        let run = |dtype: DType| {
            let y = lin.forward(norm.forward(conv.forward(x.clone().cast(dtype))));
            assert_eq!(y.dtype(), dtype);
            let loss = crate::dtype::to_f32(y).sin().sum();
            let grads = loss.backward();
            let (gc, gl) = (
                conv.weight.grad(&grads).unwrap(),
                lin.weight.grad(&grads).unwrap(),
            );
            assert_eq!((gc.dtype(), gl.dtype()), (DType::F32, DType::F32));
            (to_host(gc), to_host(gl))
        };
        let (c32, l32) = run(DType::F32);
        for (dtype, tol) in [(DType::F16, 1e-2), (DType::BF16, 5e-2)] {
            let (c, l) = run(dtype);
            for (got, want) in [(c, &c32), (l, &l32)] {
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                let err = got
                    .iter()
                    .zip(want)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(err <= tol * scale, "{dtype:?}: error {err} of {scale}");
            }
        }
    }

    #[test]
    fn linear_uses_torch_weight_layout() {
        let device = Device::flex();
        let mut lin = Linear::new(3, 2, true, &device);
        lin.weight = Param::from_data([[1.0, 0.0, 0.0], [0.0, 2.0, 1.0]], &device);
        lin.bias = Some(Param::from_data([0.5, -1.0], &device));
        let y: Vec<f32> = lin
            .forward(Tensor::<2>::from_floats([[1.0, 2.0, 3.0]], &device))
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        assert_eq!(y, vec![1.5, 6.0]);
    }
}
