//! Trainable convolutions with fast backward passes on CPU backends.
//!
//! burn derives a convolution's weight gradient from another convolution whose kernel is the
//! output gradient, which flex runs as one matrix-vector product per input channel. For a
//! pointwise (1×1) convolution, written as a batched matrix product, both gradients are gemms
//! instead (measurements: `docs/performance.md`). Convolutions whose weight takes no
//! gradient (frozen, inference) keep burn's kernel; on flex, one with a bias and an activation
//! after it that nothing differentiates applies the activation as the bias is added.

use std::any::Any;

use burn::backend::{Autodiff, Flex};
use burn::module::{Param, ParamId};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::PaddingConfig2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{backend::Backend, DType, Tensor, TensorPrimitive};
use burn_flex::ops::conv2d_gemm::conv2d_act;

use crate::model::layers::activation::activate;
use crate::model::layers::norm::NormAct;

/// A bias-free `k×k` convolution padded to keep the size at stride 1 (`dilation · (k / 2)`).
pub fn conv(
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    dilation: usize,
    groups: usize,
) -> Conv2dConfig {
    let pad = dilation * (k / 2);
    Conv2dConfig::new([cin, cout], [k, k])
        .with_stride([stride, stride])
        .with_dilation([dilation, dilation])
        .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
        .with_groups(groups)
        .with_bias(false)
}

/// `conv.forward(x)`, as a batched matrix product when `conv` is a trained pointwise
/// convolution (1×1, stride 1, no padding, dilation or groups).
pub fn conv2d<B: Backend>(conv: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    if !trained_pointwise(conv) {
        return conv.forward(x);
    }
    let bias = conv.bias.as_ref().map(|b| b.val());
    pointwise(conv.weight.val(), bias, x)
}

/// [`conv2d`] with `weight` and `bias` (computed from `conv`'s, e.g. with a norm folded in) in
/// place of `conv`'s own; `conv`'s geometry and whether its weight trains choose the kernel.
pub fn conv2d_with<B: Backend>(
    conv: &Conv2d<B>,
    weight: Tensor<B, 4>,
    bias: Option<Tensor<B, 1>>,
    x: Tensor<B, 4>,
) -> Tensor<B, 4> {
    if trained_pointwise(conv) {
        return pointwise(weight, bias, x);
    }
    let mut replaced = conv.clone();
    replaced.weight = Param::initialized(conv.weight.id, weight);
    replaced.bias = bias.map(|b| Param::initialized(ParamId::new(), b));
    replaced.forward(x)
}

/// [`conv2d_with`] with a bias, then `act`. On flex, when nothing in it takes a gradient (a
/// frozen layer, inference), `act` is applied as the bias is added: one pass over the output
/// fewer, the same values.
pub fn conv2d_with_act<B: Backend>(
    conv: &Conv2d<B>,
    weight: Tensor<B, 4>,
    bias: Tensor<B, 1>,
    x: Tensor<B, 4>,
    act: NormAct,
) -> Tensor<B, 4> {
    let options = conv_options(conv).filter(|_| act != NormAct::Identity);
    let (weight, bias, x) = match options {
        Some(options) => match flex_conv_act((weight, bias, x), &options, act) {
            Ok(y) => return y,
            Err(inputs) => inputs,
        },
        None => (weight, bias, x),
    };
    activate(conv2d_with(conv, weight, Some(bias), x), act)
}

/// `weight`, `bias`, `x` on backend `B`.
type ConvInputs<B> = (Tensor<B, 4>, Tensor<B, 1>, Tensor<B, 4>);

/// `conv2d_act` on flex, or on the autodiff flex backend when none of the inputs is in the
/// graph (the result is not either); the inputs back otherwise.
fn flex_conv_act<B: Backend>(
    inputs: ConvInputs<B>,
    options: &ConvOptions<2>,
    act: NormAct,
) -> Result<Tensor<B, 4>, ConvInputs<B>> {
    if inputs.2.dtype() != DType::F32 {
        return Err(inputs);
    }
    let run = |(w, b, x): ConvInputs<Flex>| {
        let y = conv2d_act(
            x.into_primitive().tensor(),
            w.into_primitive().tensor(),
            b.into_primitive().tensor(),
            options,
            act,
        )
        .expect("an f32 input");
        Tensor::<Flex, 4>::from_primitive(TensorPrimitive::Float(y))
    };
    let as_b = |y: Box<dyn Any>| *y.downcast::<Tensor<B, 4>>().expect("B is that backend");
    // Rust has no specialisation: the two flex backends are recognised by type at run time.
    let boxed: Box<dyn Any> = Box::new(inputs);
    let boxed = match boxed.downcast::<ConvInputs<Flex>>() {
        Ok(flex) => return Ok(as_b(Box::new(run(*flex)))),
        Err(boxed) => boxed,
    };
    match boxed.downcast::<ConvInputs<Autodiff<Flex>>>() {
        Ok(ad) if !in_graph(&ad.0) && !in_graph(&ad.1) && !in_graph(&ad.2) => {
            let (w, b, x) = *ad;
            let y = run((w.inner(), b.inner(), x.inner()));
            Ok(as_b(Box::new(Tensor::<Autodiff<Flex>, 4>::from_inner(y))))
        }
        Ok(ad) => Err(*(ad as Box<dyn Any>)
            .downcast()
            .expect("B is Autodiff<Flex>")),
        Err(boxed) => Err(*boxed.downcast().expect("the type it was boxed as")),
    }
}

/// Whether an autodiff tensor is recorded in the graph (a parameter or computed from one).
fn in_graph<const D: usize>(t: &Tensor<Autodiff<Flex>, D>) -> bool {
    !t.clone()
        .into_primitive()
        .tensor()
        .node
        .requirement
        .is_none()
}

/// `conv`'s stride, symmetric padding, dilation and groups; `None` for padding burn computes
/// from the input size or applies unevenly.
fn conv_options<B: Backend>(conv: &Conv2d<B>) -> Option<ConvOptions<2>> {
    let padding = match conv.padding {
        PaddingConfig2d::Valid => [0, 0],
        PaddingConfig2d::Explicit(top, left, bottom, right) if top == bottom && left == right => {
            [top, left]
        }
        _ => return None,
    };
    Some(ConvOptions::new(
        conv.stride,
        padding,
        conv.dilation,
        conv.groups,
    ))
}

/// Whether `conv` is 1×1, stride 1, unpadded, undilated, ungrouped, with a trained weight.
fn trained_pointwise<B: Backend>(conv: &Conv2d<B>) -> bool {
    let unpadded = matches!(
        conv.padding,
        PaddingConfig2d::Valid | PaddingConfig2d::Explicit(0, 0, 0, 0)
    );
    conv.kernel_size == [1, 1]
        && conv.stride == [1, 1]
        && conv.dilation == [1, 1]
        && conv.groups == 1
        && unpadded
        && conv.weight.val().is_require_grad()
}

/// A pointwise convolution as the batched product `weight · x`, plus `bias`.
fn pointwise<B: Backend>(
    weight: Tensor<B, 4>,
    bias: Option<Tensor<B, 1>>,
    x: Tensor<B, 4>,
) -> Tensor<B, 4> {
    let [b, c_in, h, w] = x.dims();
    let c_out = weight.dims()[0];
    let y = weight
        .reshape([1, c_out, c_in])
        .matmul(x.reshape([b, c_in, h * w]));
    // The bias as one value per row of the contiguous product (flex's fast broadcast).
    let y = match bias {
        Some(bias) => y + bias.reshape([1, c_out, 1]).repeat_dim(0, b),
        None => y,
    };
    y.reshape([b, c_out, h, w])
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Autodiff;
    use burn::module::{AutodiffModule, Param};
    use burn::nn::conv::Conv2dConfig;
    use burn::tensor::Distribution;

    type B = Autodiff<crate::backend::Inference>;

    /// Output, input gradient and weight gradient of `conv` on `x` through `f`, with `probe` as
    /// the output's gradient.
    fn run(
        conv: &Conv2d<B>,
        x: &Tensor<B, 4>,
        probe: &Tensor<B, 4>,
        f: fn(&Conv2d<B>, Tensor<B, 4>) -> Tensor<B, 4>,
    ) -> [Vec<f32>; 3] {
        let x = x.clone().detach().require_grad();
        let y = f(conv, x.clone());
        let grads = (y.clone() * probe.clone()).sum().backward();
        let host = |t: Tensor<crate::backend::Inference, 4>| t.into_data().to_vec::<f32>().unwrap();
        [
            host(y.inner()),
            host(x.grad(&grads).unwrap()),
            host(conv.weight.val().grad(&grads).unwrap()),
        ]
    }

    #[test]
    fn pointwise_matches_burn_conv() {
        let device = Default::default();
        B::seed(&device, 7);
        for padding in [
            PaddingConfig2d::Valid,
            PaddingConfig2d::Explicit(0, 0, 0, 0),
        ] {
            let mut conv: Conv2d<B> = Conv2dConfig::new([6, 5], [1, 1])
                .with_padding(padding)
                .init(&device);
            conv.weight = Param::from_tensor(conv.weight.val().require_grad());
            let x = Tensor::<B, 4>::random([2, 6, 9, 10], Distribution::Default, &device);
            // A non-uniform output gradient, so that misplaced pixels or channels show up.
            let probe = Tensor::<B, 4>::random([2, 5, 9, 10], Distribution::Default, &device);
            let fast = run(&conv, &x, &probe, conv2d);
            let reference = run(&conv, &x, &probe, |c, x| c.forward(x));
            for (what, (a, b)) in ["output", "input grad", "weight grad"]
                .iter()
                .zip(fast.iter().zip(&reference))
            {
                assert_eq!(a.len(), b.len(), "{what}");
                let err = a
                    .iter()
                    .zip(b)
                    .map(|(p, q)| (p - q).abs())
                    .fold(0.0, f32::max);
                assert!(err < 1e-4, "{what}: max |difference| {err}");
            }
        }
    }

    /// The activation fused into a convolution's bias (flex, and autodiff flex with nothing in
    /// the graph) gives the bits of the convolution and then the activation; an input in the
    /// graph takes the two nodes and keeps its gradient.
    #[test]
    fn an_activation_fused_into_a_frozen_convolution_changes_no_bits() {
        let device = Default::default();
        B::seed(&device, 8);
        let host = |t: Tensor<crate::backend::Inference, 4>| t.into_data().to_vec::<f32>().unwrap();
        // A strided dense 3×3, a depthwise 3×3 and a pointwise convolution.
        for (cin, cout, k, stride, groups) in [(3, 8, 3, 2, 1), (8, 8, 3, 1, 8), (8, 6, 1, 1, 1)] {
            let c: Conv2d<B> = conv(cin, cout, k, stride, 1, groups).init(&device);
            // Outputs of a few units either side of 0, so both clips show.
            let weight = c.weight.val().mul_scalar(4.0);
            let bias = Tensor::<B, 1>::random([cout], Distribution::Uniform(-1.0, 3.0), &device);
            let x =
                Tensor::<B, 4>::random([2, cin, 9, 10], Distribution::Uniform(-2.0, 2.0), &device);
            for act in [NormAct::Relu, NormAct::Relu6] {
                let separate = host(
                    activate(
                        conv2d_with(&c, weight.clone(), Some(bias.clone()), x.clone()),
                        act,
                    )
                    .inner(),
                );
                assert!(
                    separate.contains(&0.0) && (act == NormAct::Relu || separate.contains(&6.0))
                );
                let fused = conv2d_with_act(&c, weight.clone(), bias.clone(), x.clone(), act);
                assert_eq!(host(fused.inner()), separate, "{act:?}");
                let inference = conv2d_with_act(
                    &c.valid(),
                    weight.clone().inner(),
                    bias.clone().inner(),
                    x.clone().inner(),
                    act,
                );
                assert_eq!(host(inference), separate, "{act:?}");
                let tracked = x.clone().require_grad();
                let y = conv2d_with_act(&c, weight.clone(), bias.clone(), tracked.clone(), act);
                assert_eq!(host(y.clone().inner()), separate, "{act:?}");
                let grads = y.sum().backward();
                assert!(tracked.grad(&grads).is_some(), "{act:?}");
            }
        }
    }
}
