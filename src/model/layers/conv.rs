//! Trainable convolutions with fast backward passes on CPU backends.
//!
//! burn derives a convolution's weight gradient from another convolution whose kernel is the
//! output gradient, which flex runs as one matrix-vector product per input channel. For a
//! pointwise (1×1) convolution, written as a batched matrix product, both gradients are gemms
//! instead (measurements: `docs/performance.md`). Convolutions whose weight takes no
//! gradient (frozen, inference) keep burn's kernel.

use burn::module::{Param, ParamId};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::PaddingConfig2d;
use burn::tensor::{backend::Backend, Tensor};

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
    use burn::module::Param;
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
}
