//! Weight initialisation as `torch.nn` does it (Kaiming-uniform with a = sqrt(5) for linear and
//! convolution weights and biases, N(0, 1) embeddings), drawn from a thread-local host RNG
//! seeded by [`seed_init`], so the same seed gives the same weights on every backend and
//! concurrent runs (tests) cannot disturb each other's draws; and building models without
//! draws for weights about to be loaded ([`without_init`], [`loading_in`]).

use std::cell::RefCell;

use burn::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

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

pub(crate) fn skipping_init() -> bool {
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
pub(crate) fn load_zeros<const D: usize>(shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::zeros(shape, (device, LOAD_DTYPE.with(|d| d.get())))
}

/// `U(-k, k)` with `k = 1 / sqrt(fan_in)`: what `torch.nn.Linear`/`Conv2d` use for both the
/// weight (Kaiming-uniform, a = sqrt(5)) and the bias.
pub(crate) fn torch_uniform<const D: usize>(
    shape: [usize; D],
    fan_in: usize,
    device: &Device,
) -> Tensor<D> {
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

/// `n` values drawn from `N(0, std²)` with the init RNG.
pub(crate) fn normal_values(n: usize, std: f64) -> Vec<f32> {
    INIT_RNG.with(|r| {
        let mut r = r.borrow_mut();
        (0..n)
            .map(|_| (r.sample::<f64, _>(rand_distr::StandardNormal) * std) as f32)
            .collect()
    })
}

/// `n` values drawn from `U(-bound, bound)` with the init RNG.
pub(crate) fn uniform_values(n: usize, bound: f64) -> Vec<f32> {
    INIT_RNG.with(|r| {
        (0..n)
            .map(|_| r.borrow_mut().random_range(-bound..bound) as f32)
            .collect()
    })
}

/// `n` values drawn from `N(0, 1)` in f32 with the init RNG (`torch.nn.Embedding`'s init).
pub(crate) fn standard_normal_f32(n: usize) -> Vec<f32> {
    INIT_RNG.with(|r| {
        let mut r = r.borrow_mut();
        (0..n)
            .map(|_| r.sample::<f32, _>(rand_distr::StandardNormal))
            .collect()
    })
}
