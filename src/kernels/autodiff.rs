//! Autodiff for [`TrainOps`]: one graph node per operation, whose backward calls the inner
//! backend's gradient methods (the Flex kernels on the CPU, burn's composed bodies elsewhere).

use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend};

use super::ops::TrainOps;

/// Backward step of a convolution with `N` parents: `x`, `weight` and, when `N == 3`, `bias`.
#[derive(Debug)]
struct Conv2dBackward<const N: usize>;

impl<B: Backend + TrainOps, const N: usize> Backward<B, N> for Conv2dBackward<N> {
    /// Checkpointed `x` and `weight`, (stride, padding).
    type State = (NodeId, NodeId, (usize, usize));

    fn backward(
        self,
        ops: Ops<Self::State, N>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let (x_id, w_id, (stride, padding)) = ops.state;
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

/// The three gradients of an operation on `(x, weight, bias)` from the checkpointed `x` and
/// `weight`, the output gradient and the operation's parameters.
type XwbGrads<B, P> = fn(FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, P) -> [FloatTensor<B>; 3];

/// Backward step of such an operation (group norm, transposed convolution): all three gradients
/// from one [`XwbGrads`] call.
struct XwbBackward<B: Backend, P>(XwbGrads<B, P>);

impl<B: Backend, P> std::fmt::Debug for XwbBackward<B, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("XwbBackward")
    }
}

impl<B, P> Backward<B, 3> for XwbBackward<B, P>
where
    B: Backend + TrainOps,
    P: Clone + Send + std::fmt::Debug + 'static,
{
    type State = (NodeId, NodeId, P);

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let (x_id, w_id, params) = ops.state;
        let x = checkpointer.retrieve_node_output::<FloatTensor<B>>(x_id);
        let weight = checkpointer.retrieve_node_output::<FloatTensor<B>>(w_id);
        for (parent, g) in ops.parents.iter().zip((self.0)(x, weight, grad, params)) {
            if let Some(node) = parent {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

/// `(x, weight, bias)` of one operation.
type Xwb<B> = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

/// Records `forward(x, weight, bias)` on the autodiff graph with `op` as its backward step, `x`
/// and `weight` checkpointed and `params` kept.
fn record_xwb<B, C, O, P>(
    op: O,
    (x, weight, bias): Xwb<Autodiff<B, C>>,
    params: P,
    forward: impl FnOnce(FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) -> FloatTensor<B>,
) -> FloatTensor<Autodiff<B, C>>
where
    B: Backend + TrainOps,
    C: CheckpointStrategy,
    O: Backward<B, 3, State = (NodeId, NodeId, P)>,
    P: Clone + Send + std::fmt::Debug + 'static,
{
    match op
        .prepare::<C>([x.node(), weight.node(), bias.node()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let state = (prep.checkpoint(&x), prep.checkpoint(&weight), params);
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

/// Backward step of a softmax: its output, kept as state (the gradient needs `y`, not `x`).
#[derive(Debug)]
struct SoftmaxBackward;

impl<B: Backend + TrainOps> Backward<B, 1> for SoftmaxBackward {
    type State = FloatTensor<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        if let Some(node) = &ops.parents[0] {
            grads.register::<B>(node.id, B::softmax_last_grad(ops.state, grad));
        }
    }
}

/// Backward step of a linear layer's product: the checkpointed `x` and `w`; each gradient is
/// computed only when its input is tracked (a frozen weight's never is).
#[derive(Debug)]
struct LinearBackward;

impl<B: Backend + TrainOps> Backward<B, 2> for LinearBackward {
    type State = (NodeId, NodeId);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let (x_id, w_id) = ops.state;
        let x = checkpointer.retrieve_node_output::<FloatTensor<B>>(x_id);
        let w = checkpointer.retrieve_node_output::<FloatTensor<B>>(w_id);
        if let Some(node) = &ops.parents[0] {
            grads.register::<B>(node.id, B::linear_input_grad(w, grad.clone()));
        }
        if let Some(node) = &ops.parents[1] {
            grads.register::<B>(node.id, B::linear_weight_grad(x, grad));
        }
    }
}

/// Backward step of attention: the inputs, the output and the rows' log-sum-exp (not the
/// probabilities, which the backward recomputes block by block).
#[derive(Debug)]
struct AttentionBackward;

impl<B: Backend + TrainOps> Backward<B, 3> for AttentionBackward {
    // The three gradients of a three-parent node, as burn's `Backward` signature has them.
    #[allow(clippy::type_complexity)]
    type State = (
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        f64,
    );

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let (q, k, v, o, lse, scale) = ops.state;
        let (dq, dk, dv) = B::attention_grads(q, k, v, o, lse, grad, scale);
        for (parent, g) in ops.parents.iter().zip([dq, dk, dv]) {
            if let Some(node) = parent {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

/// An element-wise operation's input gradient from its input and the output gradient.
type PointwiseGrad<B> = fn(FloatTensor<B>, FloatTensor<B>) -> FloatTensor<B>;

/// Backward step of an operation on one input (SiLU, GELU, GEGLU): the checkpointed input and
/// the output gradient through its [`PointwiseGrad`].
struct PointwiseBackward<B: Backend>(PointwiseGrad<B>);

impl<B: Backend> std::fmt::Debug for PointwiseBackward<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PointwiseBackward")
    }
}

impl<B: Backend + TrainOps> Backward<B, 1> for PointwiseBackward<B> {
    type State = NodeId;

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let x = checkpointer.retrieve_node_output::<FloatTensor<B>>(ops.state);
        if let Some(node) = &ops.parents[0] {
            grads.register::<B>(node.id, (self.0)(x, grad));
        }
    }
}

/// Records `forward(x)` on the autodiff graph with `x` checkpointed and `grad` as its backward.
fn record_pointwise<B: Backend + TrainOps, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    forward: fn(FloatTensor<B>) -> FloatTensor<B>,
    grad: PointwiseGrad<B>,
) -> FloatTensor<Autodiff<B, C>> {
    match PointwiseBackward(grad)
        .prepare::<C>([x.node()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let state = prep.checkpoint(&x);
            prep.finish(state, forward(x.into_primitive()))
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(x.into_primitive())),
    }
}

impl<B: Backend + TrainOps, C: CheckpointStrategy> TrainOps for Autodiff<B, C> {
    fn conv_transpose2d_bias_train(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        let grads: XwbGrads<B, (usize, usize)> = |x, w, g, (stride, padding)| {
            let (dx, dw, db) = B::conv_transpose2d_grads(x, w, g, stride, padding);
            [dx, dw, db]
        };
        record_xwb::<B, C, _, _>(
            XwbBackward(grads),
            (x, weight, bias),
            (stride, padding),
            |x, w, b| B::conv_transpose2d_bias_train(x, w, b, stride, padding),
        )
    }

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
                    (stride, padding),
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
        record_xwb::<B, C, _, _>(
            Conv2dBackward::<3>,
            (x, weight, bias),
            (stride, padding),
            |x, w, b| B::conv2d_bias_train(x, w, b, stride, padding),
        )
    }

    fn group_norm_train(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        groups: usize,
        eps: f64,
    ) -> FloatTensor<Self> {
        let grads: XwbGrads<B, (usize, f64)> = |x, w, g, (groups, eps)| {
            let (dx, dw, db) = B::group_norm_grads(x, w, g, groups, eps);
            [dx, dw, db]
        };
        record_xwb::<B, C, _, _>(
            XwbBackward(grads),
            (x, weight, bias),
            (groups, eps),
            |x, w, b| B::group_norm_train(x, w, b, groups, eps),
        )
    }

    fn softmax_last_train(x: FloatTensor<Self>) -> FloatTensor<Self> {
        match SoftmaxBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = B::softmax_last_train(x.into_primitive());
                prep.finish(y.clone(), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::softmax_last_train(x.into_primitive())),
        }
    }

    fn attention_train(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        match AttentionBackward
            .prepare::<C>([q.node(), k.node(), v.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (q, k, v) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
                let (o, lse) = B::attention_lse(q.clone(), k.clone(), v.clone(), scale);
                prep.finish((q, k, v, o.clone(), lse, scale), o)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::attention_train(
                q.into_primitive(),
                k.into_primitive(),
                v.into_primitive(),
                scale,
            )),
        }
    }

    fn linear_train(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        match LinearBackward
            .prepare::<C>([x.node(), w.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let state = (prep.checkpoint(&x), prep.checkpoint(&w));
                prep.finish(
                    state,
                    B::linear_train(x.into_primitive(), w.into_primitive()),
                )
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::linear_train(x.into_primitive(), w.into_primitive()))
            }
        }
    }

    fn silu_train(x: FloatTensor<Self>) -> FloatTensor<Self> {
        record_pointwise::<B, C>(x, B::silu_train, B::silu_input_grad)
    }

    fn gelu_train(x: FloatTensor<Self>) -> FloatTensor<Self> {
        record_pointwise::<B, C>(x, B::gelu_train, B::gelu_input_grad)
    }

    fn geglu_train(h: FloatTensor<Self>) -> FloatTensor<Self> {
        record_pointwise::<B, C>(h, B::geglu_train, B::geglu_input_grad)
    }
}
