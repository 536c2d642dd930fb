//! ReLU6 as one autodiff operation. burn's autodiff has no clamp: `clamp(0, 6)` records two
//! comparisons and two mask fills forward and two mask fills backward, about 15 % of a
//! MobileNetV2 training step on flex; here it is the backend's one clamp pass forward, and
//! backward the gradient masked by the stored output, with no boolean masks kept in between.

use std::any::Any;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorPrimitive};

use crate::backend::Training;

/// `min(max(x, 0), 6)`; its gradient passes where `0 < x < 6` (PyTorch's `hardtanh`).
pub fn relu6<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    // Rust has no specialisation: the training backend is recognised by its type at run time;
    // any other backend (inference, no graph to record) clamps directly.
    let x: Box<dyn Any> = Box::new(x);
    match x.downcast::<Tensor<Training, D>>() {
        Ok(x) => {
            let y: Box<dyn Any> = Box::new(recorded_relu6(*x));
            *y.downcast::<Tensor<B, D>>()
                .expect("the same type it was cast from")
        }
        Err(x) => x
            .downcast::<Tensor<B, D>>()
            .expect("the type it was boxed as")
            .clamp(0.0, 6.0),
    }
}

/// ReLU6 recorded as one node of the autodiff graph.
fn recorded_relu6<B: Backend, C: CheckpointStrategy, const D: usize>(
    x: Tensor<Autodiff<B, C>, D>,
) -> Tensor<Autodiff<B, C>, D> {
    let x = x.into_primitive().tensor();
    // The input's buffer is handed over (the backward reads the output only), so a backend may
    // clamp in place.
    let node = x.node.clone();
    let y = B::float_clamp(x.primitive, 0.0.into(), 6.0.into());
    let out = match Relu6Backward::<D>
        .prepare::<C>([node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(y.clone(), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// The gradient of ReLU6 from its output `y`: `grad` where `0 < y < 6`, else 0.
#[derive(Debug)]
struct Relu6Backward<const D: usize>;

impl<B: Backend, const D: usize> Backward<B, 1> for Relu6Backward<D> {
    type State = B::FloatTensorPrimitive;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let y = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            let positive = Tensor::<B, D>::from_primitive(TensorPrimitive::Float(
                B::relu_backward(y.clone(), grad),
            ));
            let y = Tensor::<B, D>::from_primitive(TensorPrimitive::Float(y));
            positive
                .mask_fill(y.greater_equal_elem(6.0), 0.0)
                .into_primitive()
                .tensor()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Inference;
    use burn::tensor::TensorData;

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
}
