//! Batch and group normalisation as one kernel each way on flex (`burn_flex::ops::norm`), one
//! node of the autodiff graph, instead of burn's chain of element-wise ops and reductions (about
//! 21 passes over the activation per layer and step, 30 % of a MobileNetV2 training step).
//! An activation after it (`NormAct`) runs inside the same kernels. Other backends get `None` and
//! compose burn's ops (`norm::normalise`).

use std::any::Any;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use burn_flex::ops::norm::{norm_backward_f32, norm_forward_f32, NormShape};
use burn_flex::FlexTensor;

use super::norm::Normalised;

pub use burn_flex::ops::norm::{NormAct, NormGroups};

/// [`normalise`](super::norm::normalise) on flex (training or inference); `None` on another
/// backend or element type.
pub fn fused<B: Backend>(
    x: Tensor<B, 4>,
    groups: NormGroups,
    gamma: Tensor<B, 1>,
    beta: Tensor<B, 1>,
    eps: f64,
    act: NormAct,
) -> Option<Normalised<B>> {
    // Rust has no specialisation: the two flex backends are recognised by type at run time.
    let inputs: Box<dyn Any> = Box::new((x, gamma, beta));
    let out: Box<dyn Any> = match inputs.downcast::<Inputs<Autodiff<Flex>>>() {
        Ok(inputs) => Box::new(recorded(*inputs, groups, eps as f32, act)?),
        Err(inputs) => {
            let (x, gamma, beta) = *inputs.downcast::<Inputs<Flex>>().ok()?;
            let flex = |t: Tensor<Flex, 1>| t.into_primitive().tensor();
            let (y, mean, var) = forward(
                x.into_primitive().tensor(),
                &flex(gamma),
                &flex(beta),
                groups,
                eps as f32,
                act,
            )?;
            Box::new(Normalised::<Flex> {
                output: Tensor::from_primitive(TensorPrimitive::Float(y)),
                mean: host_tensor(mean),
                var: host_tensor(var),
            })
        }
    };
    Some(*out.downcast::<Normalised<B>>().ok()?)
}

/// `x`, `gamma`, `beta` on backend `B`.
type Inputs<B> = (Tensor<B, 4>, Tensor<B, 1>, Tensor<B, 1>);

/// A contiguous f32 view of a flex tensor, or `None` for another element type.
pub(crate) fn f32_values(t: &FlexTensor) -> Option<FlexTensor> {
    (t.dtype() == DType::F32).then(|| t.to_contiguous())
}

/// A contiguous flex tensor of `values`.
pub(crate) fn flex_tensor(values: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// A 1D tensor of `values` on the default device (the statistics, for running averages).
fn host_tensor<B: Backend>(values: Vec<f32>) -> Tensor<B, 1> {
    Tensor::from_data(TensorData::from(values.as_slice()), &Default::default())
}

/// The kernel's layout of `x` (`[N, C, H, W]`).
fn layout(x: &FlexTensor, groups: NormGroups) -> NormShape {
    let d = x.layout().shape();
    NormShape {
        n: d[0],
        c: d[1],
        s: d[2] * d[3],
        groups,
    }
}

/// The forward kernel: output, group means, group variances.
fn forward(
    x: FlexTensor,
    gamma: &FlexTensor,
    beta: &FlexTensor,
    groups: NormGroups,
    eps: f32,
    act: NormAct,
) -> Option<(FlexTensor, Vec<f32>, Vec<f32>)> {
    let (x, gamma, beta) = (f32_values(&x)?, f32_values(gamma)?, f32_values(beta)?);
    let shape = layout(&x, groups);
    let (y, mean, var) = norm_forward_f32(
        x.as_slice()?,
        &shape,
        gamma.as_slice()?,
        beta.as_slice()?,
        eps,
        act,
    );
    Some((flex_tensor(y, x.layout().shape().to_vec()), mean, var))
}

/// The normalisation recorded as one node with parents `x`, `gamma`, `beta`.
fn recorded(
    (x, gamma, beta): Inputs<Autodiff<Flex>>,
    groups: NormGroups,
    eps: f32,
    act: NormAct,
) -> Option<Normalised<Autodiff<Flex>>> {
    let (x, gamma, beta) = (
        x.into_primitive().tensor(),
        gamma.into_primitive().tensor(),
        beta.into_primitive().tensor(),
    );
    let (input, scale, shift) = (
        f32_values(&x.primitive)?,
        f32_values(&gamma.primitive)?,
        f32_values(&beta.primitive)?,
    );
    let (y, mean, var) = forward(input.clone(), &scale, &shift, groups, eps, act)?;
    let state = NormState {
        shape: layout(&input, groups),
        x: input,
        gamma: scale,
        beta: shift,
        mean: mean.clone(),
        var: var.clone(),
        eps,
        act,
    };
    let output = match NormBackward
        .prepare::<NoCheckpointing>([x.node, gamma.node, beta.node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(state, y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Some(Normalised {
        output: Tensor::from_primitive(TensorPrimitive::Float(output)),
        mean: host_tensor(mean),
        var: host_tensor(var),
    })
}

/// What the backward kernel needs: the input, the statistics, the affine and the activation.
#[derive(Debug, Clone)]
struct NormState {
    x: FlexTensor,
    gamma: FlexTensor,
    beta: FlexTensor,
    mean: Vec<f32>,
    var: Vec<f32>,
    shape: NormShape,
    eps: f32,
    act: NormAct,
}

/// The values of a tensor made contiguous f32 (by [`f32_values`]).
pub(crate) fn values(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>()
        .expect("contiguous f32, as made by f32_values")
}

#[derive(Debug)]
struct NormBackward;

impl Backward<Flex, 3> for NormBackward {
    type State = NormState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let s = ops.state;
        let dy = grads.consume::<Flex>(&ops.node).to_contiguous();
        let (dx, dgamma, dbeta) = norm_backward_f32(
            values(&s.x),
            values(&dy),
            &s.shape,
            (&s.mean, &s.var),
            (values(&s.gamma), values(&s.beta)),
            s.eps,
            s.act,
        );
        let c = s.shape.c;
        register_grads(
            grads,
            ops.parents.map(|p| p.map(|node| node.id)),
            [
                (dx, s.x.layout().shape().to_vec()),
                (dgamma, vec![c]),
                (dbeta, vec![c]),
            ],
        );
    }
}

/// Registers the gradient of each tracked parent (`Some` id), given as values and shape.
pub(crate) fn register_grads<const N: usize>(
    grads: &mut Gradients,
    parents: [Option<NodeId>; N],
    values: [(Vec<f32>, Vec<usize>); N],
) {
    for (id, (values, shape)) in parents.into_iter().zip(values) {
        if let Some(id) = id {
            grads.register::<Flex>(id, flex_tensor(values, shape));
        }
    }
}
