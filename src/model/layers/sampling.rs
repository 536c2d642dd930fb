//! The read of deformable attention: each query's weighted sum of the value rows its bilinear
//! corners point at. On flex one loop each way over the `n` samples of every query, recorded
//! as one autodiff node; other backends scatter the weights into a dense `[G, Q, T]` matrix and
//! multiply it with the values. The dense form cost a zeroed `Q × T` matrix per head, a matmul
//! over every token and the same again in its backward pass, for 48 samples per query.

use std::any::Any;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::{IndexingUpdateOp, Int, Tensor, TensorData, TensorPrimitive};
use burn_flex::FlexTensor;

use crate::model::layers::fused_norm::{self, f32_values, flex_tensor, register_grads};

/// `out[g, q, :] = Σ_k weights[g, q, k] · values[g, index[g, q, k], :]` for `weights [G, Q, n]`,
/// `values [G, T, C]` and `index` (row-major `[G, Q, n]`, each entry `< T`).
pub fn weighted_rows<B: Backend>(
    weights: Tensor<B, 3>,
    index: Vec<u32>,
    values: Tensor<B, 3>,
) -> Tensor<B, 3> {
    // Rust has no specialisation: the two flex backends are recognised by type at run time.
    let inputs: Box<dyn Any> = Box::new((weights, index, values));
    let inputs = match inputs.downcast::<Inputs<Autodiff<Flex>>>() {
        Ok(inputs) => match recorded(*inputs) {
            Ok(out) => return cast(out),
            Err(inputs) => inputs as Box<dyn Any>,
        },
        Err(inputs) => inputs,
    };
    let inputs = match inputs.downcast::<Inputs<Flex>>() {
        Ok(inputs) => {
            let (weights, index, values) = *inputs;
            let flex = |t: Tensor<Flex, 3>| f32_values(&t.into_primitive().tensor());
            if let (Some(w), Some(v)) = (flex(weights.clone()), flex(values.clone())) {
                let out = forward(&w, &index, &v);
                return cast(Tensor::<Flex, 3>::from_primitive(TensorPrimitive::Float(
                    out,
                )));
            }
            Box::new((weights, index, values)) as Box<dyn Any>
        }
        Err(inputs) => inputs,
    };
    let (weights, index, values) = *inputs
        .downcast::<Inputs<B>>()
        .expect("the type it was boxed as");
    dense(weights, index, values)
}

/// `weights`, `index`, `values` on backend `B`.
type Inputs<B> = (Tensor<B, 3>, Vec<u32>, Tensor<B, 3>);

/// A tensor of a concrete backend as the caller's `B` (the same type, recognised at run time).
fn cast<B: Backend, C: Backend>(t: Tensor<C, 3>) -> Tensor<B, 3> {
    let t: Box<dyn Any> = Box::new(t);
    *t.downcast::<Tensor<B, 3>>()
        .expect("the backend it was recognised as")
}

/// Any backend: the weights scattered into a dense `[G, Q, T]` matrix, times the values.
fn dense<B: Backend>(weights: Tensor<B, 3>, index: Vec<u32>, values: Tensor<B, 3>) -> Tensor<B, 3> {
    let [g, q, n] = weights.dims();
    let t = values.dims()[1];
    let device = weights.device();
    let index: Vec<i64> = index.into_iter().map(i64::from).collect();
    let index = Tensor::<B, 3, Int>::from_data(TensorData::new(index, [g, q, n]), &device);
    Tensor::<B, 3>::zeros([g, q, t], &device)
        .scatter(2, index, weights, IndexingUpdateOp::Add)
        .matmul(values)
}

/// The shape `[G, Q, n]`, `T`, `C` of a read.
fn dims(weights: &FlexTensor, values: &FlexTensor) -> ([usize; 3], usize, usize) {
    let (w, v) = (weights.layout().shape(), values.layout().shape());
    ([w[0], w[1], w[2]], v[1], v[2])
}

/// The forward loop: for every query its samples in order, each adding its weighted row.
fn forward(weights: &FlexTensor, index: &[u32], values: &FlexTensor) -> FlexTensor {
    let ([g, q, n], t, c) = dims(weights, values);
    let (w, v) = (fused_norm::values(weights), fused_norm::values(values));
    let mut out = vec![0f32; g * q * c];
    for (gq, row) in out.chunks_exact_mut(c).enumerate() {
        let base = gq / q * t;
        for k in gq * n..(gq + 1) * n {
            let read = &v[(base + index[k] as usize) * c..][..c];
            for (o, &x) in row.iter_mut().zip(read) {
                *o += w[k] * x;
            }
        }
    }
    flex_tensor(out, vec![g, q, c])
}

/// The backward loop: each sample's weight gradient is its row dotted with the output
/// gradient, and its weighted output gradient is added to its row's gradient, queries and
/// samples in order (so the sums do not depend on timing).
fn backward(
    weights: &FlexTensor,
    index: &[u32],
    values: &FlexTensor,
    grad: &FlexTensor,
) -> (Vec<f32>, Vec<f32>) {
    let ([g, q, n], t, c) = dims(weights, values);
    let (w, v, dy) = (
        fused_norm::values(weights),
        fused_norm::values(values),
        fused_norm::values(grad),
    );
    let mut dw = vec![0f32; g * q * n];
    let mut dv = vec![0f32; g * t * c];
    for gq in 0..g * q {
        let base = gq / q * t;
        let dy = &dy[gq * c..][..c];
        for k in gq * n..(gq + 1) * n {
            let row = (base + index[k] as usize) * c;
            dw[k] = v[row..row + c].iter().zip(dy).map(|(x, d)| x * d).sum();
            for (dx, &d) in dv[row..row + c].iter_mut().zip(dy) {
                *dx += w[k] * d;
            }
        }
    }
    (dw, dv)
}

/// The read recorded as one node with parents `weights` and `values`; the inputs back when
/// either is not f32.
fn recorded(
    (weights, index, values): Inputs<Autodiff<Flex>>,
) -> Result<Tensor<Autodiff<Flex>, 3>, Box<Inputs<Autodiff<Flex>>>> {
    let (w, v) = (
        weights.clone().into_primitive().tensor(),
        values.clone().into_primitive().tensor(),
    );
    let (Some(wf), Some(vf)) = (f32_values(&w.primitive), f32_values(&v.primitive)) else {
        return Err(Box::new((weights, index, values)));
    };
    let out = forward(&wf, &index, &vf);
    let output = match SampleBackward
        .prepare::<NoCheckpointing>([w.node, v.node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            SampleState {
                weights: wf,
                index,
                values: vf,
            },
            out,
        ),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Ok(Tensor::from_primitive(TensorPrimitive::Float(output)))
}

/// What the backward loop needs: both inputs and the sample rows.
#[derive(Debug, Clone)]
struct SampleState {
    weights: FlexTensor,
    index: Vec<u32>,
    values: FlexTensor,
}

#[derive(Debug)]
struct SampleBackward;

impl Backward<Flex, 2> for SampleBackward {
    type State = SampleState;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let s = ops.state;
        let dy = grads.consume::<Flex>(&ops.node).to_contiguous();
        let (dw, dv) = backward(&s.weights, &s.index, &s.values, &dy);
        register_grads(
            grads,
            ops.parents.map(|p| p.map(|node| node.id)),
            [
                (dw, s.weights.layout().shape().to_vec()),
                (dv, s.values.layout().shape().to_vec()),
            ],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    type Train = Autodiff<Flex>;

    /// Deterministic inputs: `[G, Q, n]` weights, `[G, T, C]` values and indices with repeats
    /// (two corners of one sample on one row, as at a map's edge).
    fn inputs(g: usize, q: usize, n: usize, t: usize, c: usize) -> (Vec<f32>, Vec<u32>, Vec<f32>) {
        let w = (0..g * q * n).map(|i| (i as f32 * 0.7).sin()).collect();
        let index = (0..g * q * n)
            .map(|i| ((i * 7 + i / 5) % t) as u32)
            .collect();
        let v = (0..g * t * c).map(|i| (i as f32 * 0.31).cos()).collect();
        (w, index, v)
    }

    /// The loops give the dense form's values and gradients (to rounding), recorded and not.
    #[test]
    fn flex_loops_match_the_dense_form_with_gradients() {
        let device = Default::default();
        let (g, q, n, t, c) = (3, 5, 8, 11, 4);
        let (w, index, v) = inputs(g, q, n, t, c);
        let leaf = |data: &[f32], shape: [usize; 3]| {
            Tensor::<Train, 3>::from_data(TensorData::new(data.to_vec(), shape), &device)
                .require_grad()
        };
        let probe = Tensor::<Train, 3>::random([g, q, c], Distribution::Default, &device);
        let run = |read: &dyn Fn(Tensor<Train, 3>, Tensor<Train, 3>) -> Tensor<Train, 3>| {
            let (w, v) = (leaf(&w, [g, q, n]), leaf(&v, [g, t, c]));
            let out = read(w.clone(), v.clone());
            let grads = (out.clone() * probe.clone()).sum().backward();
            let grad = |x: Tensor<Train, 3>| x.grad(&grads).expect("a gradient").into_data();
            (out.into_data(), grad(w), grad(v))
        };
        let sparse = run(&|w, v| weighted_rows(w, index.clone(), v));
        let reference = run(&|w, v| dense(w, index.clone(), v));
        let tolerance = burn::tensor::Tolerance::<f32>::absolute(1e-5);
        sparse.0.assert_approx_eq::<f32>(&reference.0, tolerance);
        sparse.1.assert_approx_eq::<f32>(&reference.1, tolerance);
        sparse.2.assert_approx_eq::<f32>(&reference.2, tolerance);
        let plain = weighted_rows(
            Tensor::<Flex, 3>::from_data(TensorData::new(w, [g, q, n]), &device),
            index,
            Tensor::<Flex, 3>::from_data(TensorData::new(v, [g, t, c]), &device),
        );
        plain.into_data().assert_eq(&sparse.0, true);
    }
}
