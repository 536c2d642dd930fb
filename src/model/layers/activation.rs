//! ReLU6 and softmax as one autodiff operation each. burn's autodiff has no clamp: `clamp(0, 6)`
//! records two comparisons and two mask fills forward and two mask fills backward, about 15 % of
//! a MobileNetV2 training step on flex; here it is the backend's one clamp pass forward, and
//! backward the gradient masked by the stored output, with no boolean masks kept in between (on
//! flex one pass that zeroes the incoming gradient in place; burn's ops take three). Softmax is
//! the backend's fused kernel forward and one pass per row backward.

use std::any::Any;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::ops::{ActivationOps, FloatTensorOps};
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use burn_flex::ops::norm::{masked, NormAct};
use burn_flex::FlexTensor;

use crate::backend::{Inference, Training};

/// `act` applied on its own (where it could not be fused into the operation before it).
pub fn activate<B: Backend, const D: usize>(x: Tensor<B, D>, act: NormAct) -> Tensor<B, D> {
    match act {
        NormAct::Identity => x,
        NormAct::Relu => burn::tensor::activation::relu(x),
        NormAct::Relu6 => relu6(x),
    }
}

/// `min(max(x, 0), 6)`; its gradient passes where `0 < x < 6` (PyTorch's `hardtanh`).
pub fn relu6<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    on_training(
        x,
        |x| {
            recorded_from_output(x, Relu6Backward::<D>, |x| {
                Inference::float_clamp(x, 0.0.into(), 6.0.into())
            })
        },
        |x| x.clamp(0.0, 6.0),
    )
}

/// `recorded(x)` on the training backend, `plain(x)` on any other (inference: no graph to
/// record). Rust has no specialisation: the training backend is recognised by its type at run
/// time.
fn on_training<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    recorded: impl FnOnce(Tensor<Training, D>) -> Tensor<Training, D>,
    plain: impl FnOnce(Tensor<B, D>) -> Tensor<B, D>,
) -> Tensor<B, D> {
    let x: Box<dyn Any> = Box::new(x);
    match x.downcast::<Tensor<Training, D>>() {
        Ok(x) => {
            let y: Box<dyn Any> = Box::new(recorded(*x));
            *y.downcast::<Tensor<B, D>>()
                .expect("the same type it was cast from")
        }
        Err(x) => plain(
            *x.downcast::<Tensor<B, D>>()
                .expect("the type it was boxed as"),
        ),
    }
}

/// `forward(x)` recorded as one node of the autodiff graph whose backward pass `op` reads only
/// the output. The input's buffer is handed over, so a backend may compute in place.
fn recorded_from_output<B, C, O, const D: usize>(
    x: Tensor<Autodiff<B, C>, D>,
    op: O,
    forward: impl FnOnce(B::FloatTensorPrimitive) -> B::FloatTensorPrimitive,
) -> Tensor<Autodiff<B, C>, D>
where
    B: Backend,
    C: CheckpointStrategy,
    O: Backward<B, 1, State = B::FloatTensorPrimitive>,
{
    let x = x.into_primitive().tensor();
    let node = x.node.clone();
    let y = forward(x.primitive);
    let out = match op.prepare::<C>([node]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(y.clone(), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// The input gradient from the output `y` and the output gradient: `flex(y, grad)` on flex,
/// `composed(y, grad)` with the backend's ops on any other.
fn grad_from_output<B: Backend>(
    y: B::FloatTensorPrimitive,
    grad: B::FloatTensorPrimitive,
    flex: impl FnOnce(FlexTensor, FlexTensor) -> FlexTensor,
    composed: impl FnOnce(B::FloatTensorPrimitive, B::FloatTensorPrimitive) -> B::FloatTensorPrimitive,
) -> B::FloatTensorPrimitive {
    let pair: Box<dyn Any> = Box::new((y, grad));
    match pair.downcast::<(FlexTensor, FlexTensor)>() {
        Ok(pair) => {
            let (y, grad) = *pair;
            let grad: Box<dyn Any> = Box::new(flex(y, grad));
            *grad
                .downcast::<B::FloatTensorPrimitive>()
                .expect("the primitive type it was cast from")
        }
        Err(pair) => {
            let (y, grad) = *pair
                .downcast::<(B::FloatTensorPrimitive, B::FloatTensorPrimitive)>()
                .expect("the type it was boxed as");
            composed(y, grad)
        }
    }
}

/// The gradient of ReLU6 from its output `y`: `grad` where `0 < y < 6`, else 0.
#[derive(Debug)]
struct Relu6Backward<const D: usize>;

impl<B: Backend, const D: usize> Backward<B, 1> for Relu6Backward<D> {
    type State = B::FloatTensorPrimitive;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let y = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            grad_from_output::<B>(
                y,
                grad,
                |y, grad| flex_relu6_grad::<D>(&y, grad),
                composed_relu6_grad::<B, D>,
            )
        });
    }
}

/// ReLU6's gradient from its output with burn's ops: `grad` where `0 < y < 6`, else 0.
fn composed_relu6_grad<B: Backend, const D: usize>(
    y: B::FloatTensorPrimitive,
    grad: B::FloatTensorPrimitive,
) -> B::FloatTensorPrimitive {
    let positive =
        Tensor::<B, D>::from_primitive(TensorPrimitive::Float(B::relu_backward(y.clone(), grad)));
    let y = Tensor::<B, D>::from_primitive(TensorPrimitive::Float(y));
    positive
        .mask_fill(y.greater_equal_elem(6.0), 0.0)
        .into_primitive()
        .tensor()
}

/// ReLU6's gradient on flex in one pass, in place when `grad` owns its contiguous f32 buffer;
/// other element types or layouts take [`composed_relu6_grad`].
fn flex_relu6_grad<const D: usize>(y: &FlexTensor, mut grad: FlexTensor) -> FlexTensor {
    let pass = |y: f32, g: f32| masked(NormAct::Relu6.passes(y), g);
    let same_shape = y.layout().shape() == grad.layout().shape();
    let (Some(ys), true, DType::F32) = (y.as_slice::<f32>(), same_shape, grad.dtype()) else {
        return composed_relu6_grad::<burn::backend::Flex, D>(y.clone(), grad);
    };
    let offsets = grad.layout().contiguous_offsets();
    match offsets {
        Some((start, end)) if grad.is_unique() => {
            let gs = &mut grad.try_storage_mut::<f32>().expect("a unique buffer")[start..end];
            for (g, &y) in gs.iter_mut().zip(ys) {
                *g = pass(y, *g);
            }
            grad
        }
        Some(_) => {
            let gs = grad.as_slice::<f32>().expect("a contiguous f32 buffer");
            let values: Vec<f32> = ys.iter().zip(gs).map(|(&y, &g)| pass(y, g)).collect();
            FlexTensor::from_data(TensorData::new(values, grad.layout().shape().to_vec()))
        }
        None => composed_relu6_grad::<burn::backend::Flex, D>(y.clone(), grad),
    }
}

/// Softmax over `dim`; recorded for autodiff as one node whose backward pass reads only the
/// output: `y ⊙ (dy − Σ_dim dy ⊙ y)`. burn composes it from a max, a subtraction, an
/// exponential (recomputed in the backward pass), a sum and a division, each a node.
pub fn softmax<B: Backend, const D: usize>(x: Tensor<B, D>, dim: usize) -> Tensor<B, D> {
    on_training(
        x,
        |x| recorded_from_output(x, SoftmaxBackward { dim }, |x| Inference::softmax(x, dim)),
        |x| burn::tensor::activation::softmax(x, dim),
    )
}

/// The gradient of softmax over `dim` from its output.
#[derive(Debug)]
struct SoftmaxBackward {
    dim: usize,
}

impl<B: Backend> Backward<B, 1> for SoftmaxBackward {
    type State = B::FloatTensorPrimitive;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (y, dim) = (ops.state, self.dim);
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            grad_from_output::<B>(
                y,
                grad,
                |y, grad| {
                    flex_softmax_grad(&y, &grad, dim)
                        .unwrap_or_else(|| composed_softmax_grad::<Flex>(y, grad, dim))
                },
                |y, grad| composed_softmax_grad::<B>(y, grad, dim),
            )
        });
    }
}

/// Softmax's gradient from its output with the backend's ops.
fn composed_softmax_grad<B: Backend>(
    y: B::FloatTensorPrimitive,
    grad: B::FloatTensorPrimitive,
    dim: usize,
) -> B::FloatTensorPrimitive {
    let weighted = B::float_mul(grad, y.clone());
    let sum = B::float_sum_dim(weighted.clone(), dim);
    B::float_sub(weighted, B::float_mul(y, sum))
}

/// Softmax's gradient on flex over the last dimension of f32 tensors, one pass per row: the
/// row's `Σ dy ⊙ y` in eight fixed lanes (so it vectorises and its bits do not depend on
/// timing), then `y ⊙ (dy − Σ)`. `None` for other dimensions or element types.
fn flex_softmax_grad(y: &FlexTensor, grad: &FlexTensor, dim: usize) -> Option<FlexTensor> {
    let shape = y.layout().shape().to_vec();
    let (DType::F32, true) = (y.dtype(), dim + 1 == shape.len()) else {
        return None;
    };
    let (y, grad) = (y.to_contiguous(), grad.to_contiguous());
    let (ys, gs) = (y.as_slice::<f32>()?, grad.as_slice::<f32>()?);
    let n = shape[dim];
    if n == 0 || ys.len() != gs.len() {
        return None;
    }
    let mut out = vec![0f32; ys.len()];
    for ((o, y), g) in out
        .chunks_exact_mut(n)
        .zip(ys.chunks_exact(n))
        .zip(gs.chunks_exact(n))
    {
        let mut lanes = [0f32; 8];
        let (y8, g8) = (y.chunks_exact(8), g.chunks_exact(8));
        let (y_rest, g_rest) = (y8.remainder(), g8.remainder());
        for (y, g) in y8.zip(g8) {
            for l in 0..8 {
                lanes[l] += y[l] * g[l];
            }
        }
        let tail: f32 = y_rest.iter().zip(g_rest).map(|(a, b)| a * b).sum();
        let dot = lanes.iter().sum::<f32>() + tail;
        for ((o, &y), &g) in o.iter_mut().zip(y).zip(g) {
            *o = y * (g - dot);
        }
    }
    Some(FlexTensor::from_data(TensorData::new(out, shape)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Inference;
    use burn::backend::Flex;

    /// Values and gradients on both sides of, and exactly at, 0 and 6; the inference backend
    /// takes the plain clamp.
    #[test]
    fn relu6_values_and_gradients() {
        let device = Default::default();
        let values = [-3.0f32, -1e-7, 0.0, 0.5, 5.5, 6.0, 7.0, 1e9];
        let x = Tensor::<Training, 1>::from_floats(values, &device).require_grad();
        let y = relu6(x.clone());
        let expected = [0.0f32, 0.0, 0.0, 0.5, 5.5, 6.0, 6.0, 6.0];
        y.to_data().assert_eq(&TensorData::from(expected), false);
        let weights =
            Tensor::<Training, 1>::from_floats([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], &device);
        let grads = (y * weights).sum().backward();
        let grad = x.grad(&grads).expect("a gradient");
        grad.to_data().assert_eq(
            &TensorData::from([0.0f32, 0.0, 0.0, 4.0, 5.0, 0.0, 0.0, 0.0]),
            false,
        );
        let plain = relu6(Tensor::<Inference, 1>::from_floats(values, &device));
        plain
            .to_data()
            .assert_eq(&TensorData::from(expected), false);
    }

    /// The recorded softmax gives burn's softmax and its gradient over the last and another
    /// dimension, on rows longer and shorter than the eight lanes.
    #[test]
    fn recorded_softmax_matches_burns_with_gradients() {
        let device = Default::default();
        let shape = [2, 3, 13];
        let n = shape.iter().product::<usize>();
        let values: Vec<f32> = (0..n).map(|i| (i as f32 * 0.73).sin() * 4.0).collect();
        let weights: Vec<f32> = (0..n).map(|i| (i as f32 * 0.29).cos()).collect();
        let weights = Tensor::<Training, 3>::from_data(TensorData::new(weights, shape), &device);
        for dim in [2, 1] {
            let run = |f: &dyn Fn(Tensor<Training, 3>) -> Tensor<Training, 3>| {
                let x = Tensor::<Training, 3>::from_data(
                    TensorData::new(values.clone(), shape),
                    &device,
                )
                .require_grad();
                let y = f(x.clone());
                let grads = (y.clone() * weights.clone()).sum().backward();
                (
                    y.into_data(),
                    x.grad(&grads).expect("a gradient").into_data(),
                )
            };
            let (y, dx) = run(&|x| softmax(x, dim));
            let (want_y, want_dx) = run(&|x| burn::tensor::activation::softmax(x, dim));
            let tolerance = burn::tensor::Tolerance::<f32>::absolute(1e-6);
            y.assert_approx_eq::<f32>(&want_y, tolerance);
            dx.assert_approx_eq::<f32>(&want_dx, tolerance);
        }
    }

    /// flex's one-pass gradient equals burn's composed ops bit for bit, in place on a gradient
    /// it owns and into a new buffer (leaving the input alone) on a shared one.
    #[test]
    fn flex_relu6_gradient_matches_composed_ops() {
        let shape = vec![2, 3, 5, 7];
        let n: usize = shape.iter().product();
        // Steps of 1/8 from −2 to 10: exactly 0 and 6 included, and one NaN.
        let mut ys: Vec<f32> = (0..n).map(|i| ((i * 37) % 97) as f32 / 8.0 - 2.0).collect();
        ys[5] = f32::NAN;
        let gs: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let flex = |v: &[f32]| FlexTensor::from_data(TensorData::new(v.to_vec(), shape.clone()));
        let expected = composed_relu6_grad::<Flex, 4>(flex(&ys), flex(&gs)).into_data();
        let kept = expected.as_slice::<f32>().expect("f32").iter();
        assert!(kept.filter(|&&g| g != 0.0).count() > n / 3);
        let in_place = flex_relu6_grad::<4>(&flex(&ys), flex(&gs));
        in_place.into_data().assert_eq(&expected, true);
        let shared = flex(&gs);
        let copied = flex_relu6_grad::<4>(&flex(&ys), shared.clone());
        copied.into_data().assert_eq(&expected, true);
        shared
            .into_data()
            .assert_eq(&TensorData::new(gs, shape.clone()), true);
    }
}
