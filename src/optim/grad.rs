//! Whole-model gradient operations burn does not provide: the global L2 norm over every
//! parameter and `torch.nn.utils.clip_grad_norm_` (burn's clipping works per tensor).
//!
//! Only trainable parameters take part: a frozen parameter (a LoRA run's base model, ~860M
//! values for Stable Diffusion 1.5) has no gradient, is not packed into the all-reduce and
//! is not visited by the norm.

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::prelude::*;

/// Every trainable parameter's gradient as one flat vector on `device`, in visiting order
/// (zeros where a parameter has none), and a presence flag (1 or 0) per parameter: what
/// data-parallel ranks sum in their one all-reduce per step.
pub fn flatten<M: Module>(
    module: &M,
    grads: &GradientsParams,
    device: &Device,
) -> (Tensor<1>, Vec<f32>) {
    let shapes = param_shapes(module);
    let mut parts = Vec::with_capacity(shapes.len());
    let mut present = Vec::with_capacity(shapes.len());
    for (id, dims) in shapes {
        let n: usize = dims.iter().product();
        let g = flat_grad(grads, id, dims.len());
        present.push(if g.is_some() { 1.0 } else { 0.0 });
        parts.push(g.map_or_else(
            || Tensor::zeros([n], device),
            |g| g.cast(burn::tensor::DType::F32),
        ));
    }
    (Tensor::cat(parts, 0), present)
}

/// The inverse of [`flatten`]: gradients for the parameters whose flag is set.
pub fn unflatten<M: Module>(module: &M, flat: Tensor<1>, present: &[bool]) -> GradientsParams {
    let mut grads = GradientsParams::new();
    let mut offset = 0;
    for ((id, dims), &keep) in param_shapes(module).into_iter().zip(present) {
        let n: usize = dims.iter().product();
        let part = flat.clone().slice(offset..offset + n);
        offset += n;
        if !keep {
            continue;
        }
        match dims.len() {
            1 => grads.register::<1>(id, part),
            2 => grads.register::<2>(id, part.reshape([dims[0], dims[1]])),
            3 => grads.register::<3>(id, part.reshape([dims[0], dims[1], dims[2]])),
            4 => grads.register::<4>(id, part.reshape([dims[0], dims[1], dims[2], dims[3]])),
            _ => {}
        }
    }
    grads
}

/// Ids and shapes of a module's trainable float parameters (on an autodiff device: those that
/// require gradients), in visiting order.
#[derive(Default)]
struct ParamShapes(Vec<(ParamId, Vec<usize>)>);

impl ModuleVisitor for ParamShapes {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if param.is_require_grad() {
            self.0
                .push((param.id, param.lazy_shape().dims::<D>().to_vec()));
        }
    }
}

/// The ids of `module`'s trainable parameters (it must be on an autodiff device), or `None`
/// when every float parameter trains.
pub fn trainable_ids<M: Module>(module: &M) -> Option<std::collections::HashSet<ParamId>> {
    #[derive(Default)]
    struct Ids {
        all: usize,
        trainable: std::collections::HashSet<ParamId>,
    }
    impl ModuleVisitor for Ids {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.all += 1;
            if param.is_require_grad() {
                self.trainable.insert(param.id);
            }
        }
    }
    let mut ids = Ids::default();
    module.visit(&mut ids);
    (ids.trainable.len() < ids.all).then_some(ids.trainable)
}

fn param_shapes<M: Module>(module: &M) -> Vec<(ParamId, Vec<usize>)> {
    let mut shapes = ParamShapes::default();
    module.visit(&mut shapes);
    shapes.0
}

/// The gradient of parameter `id` (of tensor rank `rank`) as a 1-D tensor, if it has one.
fn flat_grad(grads: &GradientsParams, id: ParamId, rank: usize) -> Option<Tensor<1>> {
    match rank {
        1 => grads.get::<1>(id),
        2 => grads.get::<2>(id).map(|g| g.flatten(0, 1)),
        3 => grads.get::<3>(id).map(|g| g.flatten(0, 2)),
        4 => grads.get::<4>(id).map(|g| g.flatten(0, 3)),
        _ => None,
    }
}

fn scale_grad(grads: &mut GradientsParams, id: ParamId, rank: usize, factor: f64) {
    macro_rules! scale {
        ($d:literal) => {
            if let Some(g) = grads.remove::<$d>(id) {
                grads.register::<$d>(id, g.mul_scalar(factor));
            }
        };
    }
    match rank {
        1 => scale!(1),
        2 => scale!(2),
        3 => scale!(3),
        4 => scale!(4),
        _ => {}
    }
}

/// The L2 norm of all gradients taken together, read back once.
pub fn global_norm<M: Module>(module: &M, grads: &GradientsParams) -> f64 {
    let mut total: Option<Tensor<1>> = None;
    for (id, dims) in param_shapes(module) {
        if let Some(g) = flat_grad(grads, id, dims.len()) {
            let sq = g.square().sum();
            total = Some(match total.take() {
                Some(t) => t + sq,
                None => sq,
            });
        }
    }
    total.map_or(0.0, |t| (t.into_scalar::<f32>() as f64).sqrt())
}

/// Makes every parameter a fresh autodiff leaf over the same data and id.
struct Replicate;

impl burn::module::ModuleMapper for Replicate {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        // Frozen parameters stay frozen (a LoRA base must get no gradient).
        if param.is_require_grad() {
            param.map(|t| t.detach().require_grad())
        } else {
            param.map(|t| t.detach())
        }
    }
}

/// A replica of `module` for another thread: same weights (not copied) and parameter ids, but
/// its own autodiff leaves. burn merges graphs that share nodes into one mutex-protected graph,
/// so two threads differentiating the same parameters would serialise (and can consume each
/// other's tape); replicas keep their graphs apart and their gradients still add up by id.
pub fn replicate<M: Module>(module: &M) -> M {
    module.clone().map(&mut Replicate)
}

/// Moves the gradients of the parameters in `ids` out of `grads` into their own set.
pub fn take<M: Module>(
    module: &M,
    grads: &mut GradientsParams,
    ids: &std::collections::HashSet<ParamId>,
) -> GradientsParams {
    let mut out = GradientsParams::new();
    for (id, dims) in param_shapes(module) {
        if !ids.contains(&id) {
            continue;
        }
        macro_rules! mv {
            ($d:literal) => {
                if let Some(g) = grads.remove::<$d>(id) {
                    out.register::<$d>(id, g);
                }
            };
        }
        match dims.len() {
            1 => mv!(1),
            2 => mv!(2),
            3 => mv!(3),
            4 => mv!(4),
            _ => {}
        }
    }
    out
}

/// Multiplies every gradient by `factor`.
pub fn scale_all<M: Module>(module: &M, grads: &mut GradientsParams, factor: f64) {
    for (id, dims) in param_shapes(module) {
        scale_grad(grads, id, dims.len(), factor);
    }
}

/// `clip_grad_norm_(max_norm)`: returns the pre-clip norm. Like PyTorch the coefficient is
/// `max_norm / (norm + 1e-6)` clamped to 1, and gradients are only touched when it is below 1.
pub fn clip_global_norm<M: Module>(module: &M, grads: &mut GradientsParams, max_norm: f64) -> f64 {
    let norm = global_norm(module, grads);
    if max_norm > 0.0 && norm.is_finite() {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            scale_all(module, grads, coef);
        }
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::Linear;
    use burn::module::Param;

    /// `loss = sum(W x + b)` with x = [3, 4]: dW = [[3, 4], [3, 4]], db = [1, 1], so the
    /// global norm is sqrt(9 + 16 + 9 + 16 + 1 + 1) = sqrt(52).
    fn grads_of_linear() -> (Linear, GradientsParams) {
        let device = Device::flex().autodiff();
        let mut lin = Linear::new(2, 2, true, &device);
        lin.weight = Param::from_data([[0.1, 0.2], [0.3, 0.4]], &device);
        lin.bias = Some(Param::from_data([0.0, 0.0], &device));
        let loss = lin
            .forward(Tensor::<2>::from_floats([[3.0, 4.0]], &device))
            .sum();
        let grads = GradientsParams::from_grads(loss.backward(), &lin);
        (lin, grads)
    }

    #[test]
    fn global_norm_spans_all_parameters() {
        let (lin, grads) = grads_of_linear();
        assert!((global_norm(&lin, &grads) - 52f64.sqrt()).abs() < 1e-5);
    }

    #[test]
    fn clipping_scales_every_gradient_like_torch() {
        let (lin, mut grads) = grads_of_linear();
        let pre = clip_global_norm(&lin, &mut grads, 1.0);
        assert!((pre - 52f64.sqrt()).abs() < 1e-5);
        assert!((global_norm(&lin, &grads) - 1.0).abs() < 1e-5);
        let coef = 1.0 / (52f64.sqrt() + 1e-6);
        let db: Vec<f32> = grads
            .get::<1>(lin.bias.as_ref().unwrap().id)
            .unwrap()
            .into_data()
            .try_to_vec()
            .unwrap();
        assert!(db.iter().all(|v| (*v as f64 - coef).abs() < 1e-6), "{db:?}");
        // Below the threshold nothing changes.
        let (lin, mut grads) = grads_of_linear();
        assert!(
            (clip_global_norm(&lin, &mut grads, 100.0) - global_norm(&lin, &grads)).abs() < 1e-9
        );
    }

    #[test]
    fn flatten_then_unflatten_gives_the_gradients_back() {
        let (lin, grads) = grads_of_linear();
        let device = Device::flex();
        let (flat, present) = flatten(&lin, &grads, &device);
        assert_eq!(flat.dims(), [6]);
        assert_eq!(present, vec![1.0, 1.0]);
        let back = unflatten(&lin, flat, &[true, true]);
        let w: Vec<f32> = back
            .get::<2>(lin.weight.id)
            .unwrap()
            .into_data()
            .try_to_vec()
            .unwrap();
        assert_eq!(w, vec![3.0, 4.0, 3.0, 4.0]);
        // A parameter no rank had a gradient for stays without one.
        let (flat, _) = flatten(&lin, &grads, &device);
        let back = unflatten(&lin, flat, &[true, false]);
        assert!(back.get::<1>(lin.bias.as_ref().unwrap().id).is_none());
    }

    #[test]
    fn frozen_parameters_are_not_packed_normed_or_clipped() {
        // The weight frozen (a LoRA base), the bias trainable (an adapter).
        let device = Device::flex().autodiff();
        let mut lin = Linear::new(2, 2, true, &device);
        lin.weight = Param::from_data([[0.1, 0.2], [0.3, 0.4]], &device).set_require_grad(false);
        lin.bias = Some(Param::from_data([0.0, 0.0], &device));
        let loss = lin
            .forward(Tensor::<2>::from_floats([[3.0, 4.0]], &device))
            .sum();
        let mut grads = GradientsParams::from_grads(loss.backward(), &lin);
        let (flat, present) = flatten(&lin, &grads, &Device::flex());
        // Only the bias's 2 values travel in the all-reduce (not the weight's 4).
        assert_eq!(flat.dims(), [2]);
        assert_eq!(present, vec![1.0]);
        // The norm and the clipping see the bias alone: |(1, 1)| = sqrt(2).
        assert!((global_norm(&lin, &grads) - 2f64.sqrt()).abs() < 1e-6);
        let pre = clip_global_norm(&lin, &mut grads, 1.0);
        assert!((pre - 2f64.sqrt()).abs() < 1e-6);
        assert!((global_norm(&lin, &grads) - 1.0).abs() < 1e-5);
        let ids = trainable_ids(&lin).expect("one parameter is frozen");
        assert!(ids.contains(&lin.bias.as_ref().unwrap().id) && !ids.contains(&lin.weight.id));
    }
}
