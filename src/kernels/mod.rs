//! Training kernels that burn's CPU backend lacks, as a burn backend extension.
//!
//! Profiling a training step of the small U-Nets (docs/benchmarks.md) put most of the CPU time
//! in two places that are not model code: the backward pass of every convolution (burn computes
//! the input gradient with a transposed convolution whose scatter loop is single-threaded, and the
//! weight gradient as a convolution whose kernel is the whole output gradient), and SiLU (scalar
//! libm `expf`, then four more element-wise passes in its backward). [`TrainOps`] replaces these
//! two operations:
//!
//! - on burn's Flex (CPU) backend with the kernels in [`conv`] and [`act`];
//! - under autodiff with a backward step that calls those kernels (one node per operation, so the
//!   graph also gets smaller);
//! - on every other backend (CUDA) with the trait's default bodies, which are exactly the burn
//!   operations the layers called before.
//!
//! Layers call [`conv2d`] and [`silu`]; nothing else in the crate knows this module exists.

pub mod act;
pub mod conv;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ops::{ActivationOps, ConvOptions, FloatTensorOps, ModuleOps};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, TensorMetadata, backend_extension};
use burn::prelude::*;
use burn::tensor::{DType, TensorData};

use burn::backend::flex::FlexTensor;

use conv::Conv2dGeom;

/// Convolution (square kernel, one stride and padding, no dilation or groups) and SiLU with
/// their gradients. The default bodies are burn's own operations; Flex overrides them with the
/// kernels of this module and autodiff routes its backward pass through them.
#[backend_extension(Flex, Autodiff, Cube: cfg(feature = "cuda"))]
pub trait TrainOps: Backend {
    /// `conv2d(x, weight)`, `x` `[n, cin, h, w]`, `weight` `[cout, cin, k, k]`.
    fn conv2d_train(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        Self::conv2d(x, weight, None, conv_options(stride, padding))
    }

    /// `conv2d(x, weight) + bias`, `bias` `[cout]`. (A separate method because the extension
    /// macro cannot route an optional tensor.)
    fn conv2d_bias_train(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        Self::conv2d(x, weight, Some(bias), conv_options(stride, padding))
    }

    /// The gradient of [`TrainOps::conv2d_train`] with respect to `x`.
    fn conv2d_input_grad(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        Self::conv2d_x_backward(x, weight, grad, conv_options(stride, padding))
    }

    /// The gradients of [`TrainOps::conv2d_train`] with respect to `weight` and `bias`.
    fn conv2d_param_grads(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let dw = Self::conv2d_weight_backward(
            x.clone(),
            weight.clone(),
            grad.clone(),
            conv_options(stride, padding),
        );
        let cout = weight.shape()[0];
        let bias = Self::float_zeros([cout].into(), &x.device(), x.dtype().into());
        (dw, Self::conv2d_bias_backward(x, bias, grad))
    }

    /// `x·σ(x)`.
    fn silu_train(x: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_mul(x.clone(), Self::sigmoid(x))
    }

    /// `grad·σ(x)·(1 + x·(1 - σ(x)))`, the gradient of [`TrainOps::silu_train`].
    fn silu_input_grad(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        let s = Self::sigmoid(x.clone());
        let one_minus_s = Self::float_add_scalar(Self::float_neg(s.clone()), 1.0.into());
        let inner = Self::float_add_scalar(Self::float_mul(x, one_minus_s), 1.0.into());
        Self::float_mul(grad, Self::float_mul(s, inner))
    }
}

fn conv_options(stride: usize, padding: usize) -> ConvOptions<2> {
    ConvOptions::new([stride, stride], [padding, padding], [1, 1], 1)
}

/// `conv2d(x, weight) + bias` through [`TrainOps`].
///
/// # Shapes
/// - `x` `[batch, in_channels, height, width]`, `weight` `[out_channels, in_channels, k, k]`,
///   `bias` `[out_channels]`
/// - output `[batch, out_channels, height', width']`
pub fn conv2d(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    stride: usize,
    padding: usize,
) -> Tensor<4> {
    let (x, weight) = (x.into_dispatch(), weight.into_dispatch());
    Tensor::from_dispatch(match bias {
        Some(b) => {
            <Dispatch as TrainOps>::conv2d_bias_train(x, weight, b.into_dispatch(), stride, padding)
        }
        None => <Dispatch as TrainOps>::conv2d_train(x, weight, stride, padding),
    })
}

/// `x·σ(x)` through [`TrainOps`].
///
/// # Shapes
/// - any; output the same
pub fn silu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as TrainOps>::silu_train(x.into_dispatch()))
}

// ---------------------------------------------------------------------------------------------
// Flex: the CPU kernels.

/// The contiguous `f32` values of a Flex tensor, or `None` for another dtype (those keep
/// burn's path).
fn f32_values(t: &FlexTensor) -> Option<std::borrow::Cow<'_, [f32]>> {
    if t.dtype() != DType::F32 {
        return None;
    }
    match t.as_slice::<f32>() {
        Some(s) if t.is_contiguous() => Some(std::borrow::Cow::Borrowed(s)),
        _ => t
            .to_contiguous()
            .as_slice::<f32>()
            .map(|s| std::borrow::Cow::Owned(s.to_vec())),
    }
}

fn flex_tensor(values: Vec<f32>, shape: &[usize]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape.to_vec()))
}

fn geometry(
    x: &FlexTensor,
    weight: &FlexTensor,
    stride: usize,
    padding: usize,
) -> Option<Conv2dGeom> {
    let (xs, ws) = (x.shape(), weight.shape());
    let ok = xs.num_dims() == 4
        && ws.num_dims() == 4
        && ws[1] == xs[1]
        && ws[2] == ws[3]
        && stride > 0
        && xs[2] + 2 * padding >= ws[2]
        && xs[3] + 2 * padding >= ws[2];
    ok.then(|| Conv2dGeom {
        batch: xs[0],
        cin: xs[1],
        h: xs[2],
        w: xs[3],
        cout: ws[0],
        k: ws[2],
        stride,
        pad: padding,
    })
}

fn flex_conv2d(
    x: FlexTensor,
    weight: FlexTensor,
    bias: Option<FlexTensor>,
    stride: usize,
    padding: usize,
) -> FlexTensor {
    let fast = geometry(&x, &weight, stride, padding).and_then(|g| {
        let (xv, wv) = (f32_values(&x)?, f32_values(&weight)?);
        let bv = match &bias {
            Some(b) => Some(f32_values(b)?),
            None => None,
        };
        let y = conv::forward(&g, &xv, &wv, bv.as_deref());
        Some(flex_tensor(y, &[g.batch, g.cout, g.out_h(), g.out_w()]))
    });
    fast.unwrap_or_else(|| Flex::conv2d(x, weight, bias, conv_options(stride, padding)))
}

impl TrainOps for Flex {
    fn conv2d_train(
        x: FlexTensor,
        weight: FlexTensor,
        stride: usize,
        padding: usize,
    ) -> FlexTensor {
        flex_conv2d(x, weight, None, stride, padding)
    }

    fn conv2d_bias_train(
        x: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        stride: usize,
        padding: usize,
    ) -> FlexTensor {
        flex_conv2d(x, weight, Some(bias), stride, padding)
    }

    fn conv2d_input_grad(
        x: FlexTensor,
        weight: FlexTensor,
        grad: FlexTensor,
        stride: usize,
        padding: usize,
    ) -> FlexTensor {
        let fast = geometry(&x, &weight, stride, padding).and_then(|g| {
            let dx = conv::input_grad(&g, &f32_values(&weight)?, &f32_values(&grad)?);
            Some(flex_tensor(dx, &[g.batch, g.cin, g.h, g.w]))
        });
        fast.unwrap_or_else(|| {
            Self::conv2d_x_backward(x, weight, grad, conv_options(stride, padding))
        })
    }

    fn conv2d_param_grads(
        x: FlexTensor,
        weight: FlexTensor,
        grad: FlexTensor,
        stride: usize,
        padding: usize,
    ) -> (FlexTensor, FlexTensor) {
        let fast = geometry(&x, &weight, stride, padding).and_then(|g| {
            let (dw, db) = conv::weight_grad(&g, &f32_values(&x)?, &f32_values(&grad)?, true);
            Some((
                flex_tensor(dw, &[g.cout, g.cin, g.k, g.k]),
                flex_tensor(db, &[g.cout]),
            ))
        });
        match fast {
            Some(grads) => grads,
            None => {
                let dw = Self::conv2d_weight_backward(
                    x.clone(),
                    weight.clone(),
                    grad.clone(),
                    conv_options(stride, padding),
                );
                let bias =
                    Self::float_zeros([weight.shape()[0]].into(), &x.device(), x.dtype().into());
                (dw, Self::conv2d_bias_backward(x, bias, grad))
            }
        }
    }

    fn silu_train(x: FlexTensor) -> FlexTensor {
        match f32_values(&x) {
            Some(v) => flex_tensor(act::silu(&v), x.shape().as_slice()),
            None => Self::float_mul(x.clone(), Self::sigmoid(x)),
        }
    }

    fn silu_input_grad(x: FlexTensor, grad: FlexTensor) -> FlexTensor {
        match (f32_values(&x), f32_values(&grad)) {
            (Some(xv), Some(gv)) => flex_tensor(act::silu_grad(&xv, &gv), x.shape().as_slice()),
            _ => {
                let s = Self::sigmoid(x.clone());
                let one_minus_s = Self::float_add_scalar(Self::float_neg(s.clone()), 1.0.into());
                let inner = Self::float_add_scalar(Self::float_mul(x, one_minus_s), 1.0.into());
                Self::float_mul(grad, Self::float_mul(s, inner))
            }
        }
    }
}

#[cfg(feature = "cuda")]
impl TrainOps for burn::backend::Cube {}

// ---------------------------------------------------------------------------------------------
// Autodiff: one graph node per operation, its backward through the inner backend's kernels.

/// Backward step of a convolution with `N` parents: `x`, `weight` and, when `N == 3`, `bias`.
#[derive(Debug)]
struct Conv2dBackward<const N: usize>;

impl<B: Backend + TrainOps, const N: usize> Backward<B, N> for Conv2dBackward<N> {
    /// Checkpointed `x` and `weight`, stride, padding.
    type State = (
        burn::backend::autodiff::NodeId,
        burn::backend::autodiff::NodeId,
        usize,
        usize,
    );

    fn backward(
        self,
        ops: Ops<Self::State, N>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let (x_id, w_id, stride, padding) = ops.state;
        let x = checkpointer.retrieve_node_output::<FloatTensor<B>>(x_id);
        let weight = checkpointer.retrieve_node_output::<FloatTensor<B>>(w_id);
        let node_bias = if N == 3 { ops.parents[2].clone() } else { None };
        if let Some(node) = &ops.parents[0] {
            let dx = B::conv2d_input_grad(x.clone(), weight.clone(), grad.clone(), stride, padding);
            grads.register::<B>(node.id, dx);
        }
        if ops.parents[1].is_some() || node_bias.is_some() {
            let (dw, db) = B::conv2d_param_grads(x, weight, grad, stride, padding);
            if let Some(node) = &ops.parents[1] {
                grads.register::<B>(node.id, dw);
            }
            if let Some(node) = node_bias {
                grads.register::<B>(node.id, db);
            }
        }
    }
}

/// Backward step of SiLU: the checkpointed input.
#[derive(Debug)]
struct SiluBackward;

impl<B: Backend + TrainOps> Backward<B, 1> for SiluBackward {
    type State = burn::backend::autodiff::NodeId;

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let x = checkpointer.retrieve_node_output::<FloatTensor<B>>(ops.state);
        if let Some(node) = &ops.parents[0] {
            grads.register::<B>(node.id, B::silu_input_grad(x, grad));
        }
    }
}

impl<B: Backend + TrainOps, C: CheckpointStrategy> TrainOps for Autodiff<B, C> {
    fn conv2d_train(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        let forward = |x, w| B::conv2d_train(x, w, stride, padding);
        match Conv2dBackward::<2>
            .prepare::<C>([x.node(), weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let state = (
                    prep.checkpoint(&x),
                    prep.checkpoint(&weight),
                    stride,
                    padding,
                );
                prep.finish(state, forward(x.into_primitive(), weight.into_primitive()))
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(forward(x.into_primitive(), weight.into_primitive()))
            }
        }
    }

    fn conv2d_bias_train(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        let forward = |x, w, b| B::conv2d_bias_train(x, w, b, stride, padding);
        match Conv2dBackward::<3>
            .prepare::<C>([x.node(), weight.node(), bias.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let state = (
                    prep.checkpoint(&x),
                    prep.checkpoint(&weight),
                    stride,
                    padding,
                );
                prep.finish(
                    state,
                    forward(
                        x.into_primitive(),
                        weight.into_primitive(),
                        bias.into_primitive(),
                    ),
                )
            }
            OpsKind::UnTracked(prep) => prep.finish(forward(
                x.into_primitive(),
                weight.into_primitive(),
                bias.into_primitive(),
            )),
        }
    }

    fn silu_train(x: FloatTensor<Self>) -> FloatTensor<Self> {
        match SiluBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let state = prep.checkpoint(&x);
                prep.finish(state, B::silu_train(x.into_primitive()))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::silu_train(x.into_primitive())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    fn device() -> Device {
        Device::flex().autodiff()
    }

    /// Forward values and all gradients of a conv + SiLU chain through [`TrainOps`] equal burn's
    /// own `conv2d` and `silu` on the same inputs.
    #[test]
    fn conv_and_silu_match_burn_with_gradients() {
        for (k, stride, padding, bias) in [
            (3, 1, 1, true),
            (4, 2, 1, false),
            (3, 2, 0, true),
            (1, 1, 0, true),
        ] {
            let d = device();
            let x = Tensor::<4>::random([3, 4, 9, 8], Distribution::Normal(0.0, 1.0), &d);
            let w = Tensor::<4>::random([5, 4, k, k], Distribution::Normal(0.0, 0.3), &d);
            let b = Tensor::<1>::random([5], Distribution::Normal(0.0, 0.3), &d);
            let target = |y: Tensor<4>| {
                let shape = y.dims();
                let weights = Tensor::<1, Int>::arange(
                    0..shape.iter().product::<usize>() as i64,
                    &y.device(),
                )
                .float()
                .reshape(shape)
                .sin();
                (y * weights).sum()
            };
            let run = |ours: bool| {
                let (x, w, b) = (
                    x.clone().require_grad(),
                    w.clone().require_grad(),
                    b.clone().require_grad(),
                );
                let bias_t = bias.then(|| b.clone());
                let y = if ours {
                    silu(conv2d(x.clone(), w.clone(), bias_t, stride, padding))
                } else {
                    let options = ConvOptions::new([stride, stride], [padding, padding], [1, 1], 1);
                    burn::tensor::activation::silu(burn::tensor::module::conv2d(
                        x.clone(),
                        w.clone(),
                        bias_t,
                        options,
                    ))
                };
                let grads = target(y.clone()).backward();
                let grad_b = bias.then(|| b.grad(&grads).map(|g| g.into_data()));
                (
                    y.into_data(),
                    x.grad(&grads).map(|g| g.into_data()),
                    w.grad(&grads).map(|g| g.into_data()),
                    grad_b,
                )
            };
            let (ours, theirs) = (run(true), run(false));
            let tol = burn::tensor::Tolerance::absolute(2e-4);
            ours.0.assert_approx_eq::<f32>(&theirs.0, tol);
            ours.1
                .expect("x grad")
                .assert_approx_eq::<f32>(&theirs.1.expect("x grad"), tol);
            ours.2
                .expect("w grad")
                .assert_approx_eq::<f32>(&theirs.2.expect("w grad"), tol);
            if let (Some(a), Some(b)) = (ours.3, theirs.3) {
                a.expect("b grad")
                    .assert_approx_eq::<f32>(&b.expect("b grad"), tol);
            }
        }
    }

    #[test]
    fn without_autodiff_the_forward_is_the_same() {
        let d = Device::flex();
        let x = Tensor::<4>::random([2, 3, 7, 7], Distribution::Normal(0.0, 1.0), &d);
        let w = Tensor::<4>::random([4, 3, 3, 3], Distribution::Normal(0.0, 0.3), &d);
        let options = ConvOptions::new([2, 2], [1, 1], [1, 1], 1);
        let ours = silu(conv2d(x.clone(), w.clone(), None, 2, 1));
        let theirs =
            burn::tensor::activation::silu(burn::tensor::module::conv2d(x, w, None, options));
        ours.into_data()
            .assert_approx_eq::<f32>(&theirs.into_data(), burn::tensor::Tolerance::absolute(1e-5));
    }
}
