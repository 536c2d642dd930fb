//! Normalisation layers: batch norm frozen (statistics and affine fixed, as DETR and mmdet's
//! `norm_eval` use) or trainable, and group norm (independent of the batch, so safe with
//! data-parallel replicas and batches of one).

use burn::module::{Module, Param, ParamId};
use burn::nn::conv::Conv2d;
use burn::nn::{BatchNorm, BatchNormConfig, GroupNorm, GroupNormConfig};
use burn::tensor::{backend::Backend, Tensor};
use serde::{Deserialize, Serialize};

use crate::model::layers::activation::activate;
use crate::model::layers::conv::{conv2d, conv2d_with_act};
use crate::model::layers::fused_norm;
pub use crate::model::layers::fused_norm::{NormAct, NormGroups};

/// How a backbone normalises activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NormKind {
    /// Fixed statistics and affine parameters (torchvision's `FrozenBatchNorm2d`).
    #[default]
    Frozen,
    /// Trainable batch normalisation with running statistics.
    Batch,
    /// Group normalisation with gcd(32, channels) groups (torchvision's FCOS head uses 32).
    Group,
}

/// torchvision's `FrozenBatchNorm2d`: `y = (x − mean) / √(var + ε) · weight + bias` with all four
/// tensors fixed. Field names match PyTorch's, so checkpoints load without renaming.
#[derive(Module, Debug)]
pub struct FrozenBatchNorm2d<B: Backend> {
    /// Scale γ.
    pub weight: Param<Tensor<B, 1>>,
    /// Shift β.
    pub bias: Param<Tensor<B, 1>>,
    /// Running mean.
    pub running_mean: Param<Tensor<B, 1>>,
    /// Running variance.
    pub running_var: Param<Tensor<B, 1>>,
}

/// A fixed, non-trainable parameter.
fn fixed<B: Backend>(t: Tensor<B, 1>) -> Param<Tensor<B, 1>> {
    Param::initialized(ParamId::new(), t).set_require_grad(false)
}

impl<B: Backend> FrozenBatchNorm2d<B> {
    /// Identity normalisation over `channels` (weights are expected to be loaded).
    pub fn new(channels: usize, device: &B::Device) -> Self {
        FrozenBatchNorm2d {
            weight: fixed(Tensor::ones([channels], device)),
            bias: fixed(Tensor::zeros([channels], device)),
            running_mean: fixed(Tensor::zeros([channels], device)),
            running_var: fixed(Tensor::ones([channels], device)),
        }
    }

    /// Normalises `[N, C, H, W]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let (scale, shift) = self.scale_shift();
        channel_affine(x, scale, shift)
    }

    /// The per-channel scale and shift the layer applies.
    fn scale_shift(&self) -> (Tensor<B, 1>, Tensor<B, 1>) {
        // torchvision uses eps = 1e-5 and folds the statistics into one scale and shift.
        let scale = self.weight.val() * self.running_var.val().add_scalar(1e-5).sqrt().recip();
        let shift = self.bias.val() - self.running_mean.val() * scale.clone();
        (scale, shift)
    }
}

/// `x · scale[c] + shift[c]` over `[N, C, H, W]`. flex runs element-wise ops fast only when
/// the broadcast operand is a per-row scalar of a contiguous tensor, so the per-channel values
/// are laid out as `[N, C, 1]` against `x` viewed as `[N, C, H·W]` (burn's `[1, C, 1, 1]`
/// broadcast takes flex's element-by-element path and dominated the step time).
fn channel_affine<B: Backend>(
    x: Tensor<B, 4>,
    scale: Tensor<B, 1>,
    shift: Tensor<B, 1>,
) -> Tensor<B, 4> {
    let [n, c, h, w] = x.dims();
    let per_row = |t: Tensor<B, 1>| t.reshape([1, c, 1]).repeat_dim(0, n);
    (x.reshape([n, c, h * w]) * per_row(scale) + per_row(shift)).reshape([n, c, h, w])
}

/// A normalised `[N, C, H, W]` tensor and each statistics group's mean and biased variance
/// (per channel for batch norm, per image and group for group norm; not tracked).
pub struct Normalised<B: Backend> {
    /// `(x − mean) / √(var + ε) · gamma[c] + beta[c]`.
    pub output: Tensor<B, 4>,
    /// Group means.
    pub mean: Tensor<B, 1>,
    /// Group variances (biased).
    pub var: Tensor<B, 1>,
}

/// Normalises `x` by the statistics of `groups`, applies the per-channel affine, then `act`:
/// flex's fused kernels ([`fused_norm`]), burn's ops on other backends.
pub fn normalise<B: Backend>(
    x: Tensor<B, 4>,
    groups: NormGroups,
    gamma: Tensor<B, 1>,
    beta: Tensor<B, 1>,
    eps: f64,
    act: NormAct,
) -> Normalised<B> {
    fused_norm::fused(x.clone(), groups, gamma.clone(), beta.clone(), eps, act).unwrap_or_else(
        || {
            let y = composed(x, groups, gamma, beta, eps);
            Normalised {
                output: activate(y.output, act),
                ..y
            }
        },
    )
}

/// [`normalise`] as burn's `GroupNorm` and `BatchNorm` compute it (biased variance, ε inside
/// the root), with the channel broadcasts laid out as [`channel_affine`].
fn composed<B: Backend>(
    x: Tensor<B, 4>,
    groups: NormGroups,
    gamma: Tensor<B, 1>,
    beta: Tensor<B, 1>,
    eps: f64,
) -> Normalised<B> {
    let [n, c, h, w] = x.dims();
    match groups {
        NormGroups::Image(g) => {
            let x = x.reshape([n, g, (c / g) * h * w]);
            let mean = x.clone().mean_dim(2);
            let centred = x - mean.clone();
            let var = centred.clone().square().mean_dim(2);
            let normalised = centred / var.clone().add_scalar(eps).sqrt();
            Normalised {
                output: channel_affine(normalised.reshape([n, c, h, w]), gamma, beta),
                mean: mean.detach().reshape([n * g]),
                var: var.detach().reshape([n * g]),
            }
        }
        NormGroups::Channel => {
            let x = x.reshape([n, c, h * w]);
            let per_row = |t: Tensor<B, 3>| t.repeat_dim(0, n);
            let mean = x.clone().mean_dim(2).mean_dim(0);
            let centred = x - per_row(mean.clone());
            let var = centred.clone().square().mean_dim(2).mean_dim(0);
            let scale = gamma.reshape([1, c, 1]) * var.clone().add_scalar(eps).sqrt().recip();
            let output = centred * per_row(scale) + per_row(beta.reshape([1, c, 1]));
            Normalised {
                output: output.reshape([n, c, h, w]),
                mean: mean.detach().reshape([c]),
                var: var.detach().reshape([c]),
            }
        }
    }
}

/// burn's `GroupNorm` forward, then `act`.
pub(crate) fn group_norm<B: Backend>(
    gn: &GroupNorm<B>,
    x: Tensor<B, 4>,
    act: NormAct,
) -> Tensor<B, 4> {
    let (gamma, beta) = match (&gn.gamma, &gn.beta) {
        (Some(gamma), Some(beta)) => (gamma.val(), beta.val()),
        _ => unit_affine(x.dims()[1], &x.device()),
    };
    normalise(
        x,
        NormGroups::Image(gn.num_groups),
        gamma,
        beta,
        gn.epsilon,
        act,
    )
    .output
}

/// The identity affine over `c` channels: scale 1, shift 0.
pub(crate) fn unit_affine<B: Backend>(
    c: usize,
    device: &B::Device,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    (Tensor::ones([c], device), Tensor::zeros([c], device))
}

/// burn's `BatchNorm` forward (the same statistics, running-average update and result), then
/// `act`.
fn batch_norm<B: Backend>(bn: &BatchNorm<B>, x: Tensor<B, 4>, act: NormAct) -> Tensor<B, 4> {
    if !B::ad_enabled(&x.device()) {
        let scale = bn.gamma.val() * bn.running_var.value().add_scalar(bn.epsilon).sqrt().recip();
        let shift = bn.beta.val() - bn.running_mean.value() * scale.clone();
        return activate(channel_affine(x, scale, shift), act);
    }
    let y = normalise(
        x,
        NormGroups::Channel,
        bn.gamma.val(),
        bn.beta.val(),
        bn.epsilon,
        act,
    );
    let m = bn.momentum;
    bn.running_mean
        .update(bn.running_mean.value_sync().mul_scalar(1.0 - m) + y.mean.mul_scalar(m));
    bn.running_var
        .update(bn.running_var.value_sync().mul_scalar(1.0 - m) + y.var.mul_scalar(m));
    y.output
}

/// A backbone normalisation layer of either kind.
#[derive(Module, Debug)]
pub enum Norm2d<B: Backend> {
    /// Frozen statistics.
    Frozen(FrozenBatchNorm2d<B>),
    /// Trainable batch norm.
    Batch(BatchNorm<B>),
    /// Group norm.
    Group(GroupNorm<B>),
}

/// Greatest common divisor.
fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl<B: Backend> Norm2d<B> {
    /// A layer of `kind` over `channels`.
    pub fn new(kind: NormKind, channels: usize, device: &B::Device) -> Self {
        match kind {
            NormKind::Frozen => Norm2d::Frozen(FrozenBatchNorm2d::new(channels, device)),
            NormKind::Batch => Norm2d::Batch(BatchNormConfig::new(channels).init(device)),
            NormKind::Group => {
                Norm2d::Group(GroupNormConfig::new(gcd(32, channels), channels).init(device))
            }
        }
    }

    /// `self.forward_act(conv2d(conv, x), act)`. A frozen layer is folded into the convolution
    /// instead (weight × scale, bias × scale + shift): two passes over the output fewer each way.
    pub fn after_conv(&self, conv: &Conv2d<B>, x: Tensor<B, 4>, act: NormAct) -> Tensor<B, 4> {
        let Norm2d::Frozen(n) = self else {
            return self.forward_act(conv2d(conv, x), act);
        };
        let (scale, shift) = n.scale_shift();
        let c = scale.dims()[0];
        let bias = match &conv.bias {
            Some(b) => b.val() * scale.clone() + shift,
            None => shift,
        };
        // One scale per row of the weight viewed as a matrix (flex's fast broadcast).
        let weight = conv.weight.val();
        let dims = weight.dims();
        let weight = (weight.reshape([c as i32, -1]) * scale.reshape([c, 1])).reshape(dims);
        conv2d_with_act(conv, weight, bias, x, act)
    }

    /// Normalises `[N, C, H, W]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.forward_act(x, NormAct::Identity)
    }

    /// Normalises `[N, C, H, W]`, then applies `act` (in the same kernels where flex fuses them).
    pub fn forward_act(&self, x: Tensor<B, 4>, act: NormAct) -> Tensor<B, 4> {
        match self {
            Norm2d::Frozen(n) => activate(n.forward(x), act),
            Norm2d::Batch(n) => batch_norm(n, x, act),
            Norm2d::Group(n) => group_norm(n, x, act),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::layers::conv::conv;
    use burn::backend::Autodiff;
    use burn::tensor::Distribution;

    type B = Autodiff<crate::backend::Inference>;

    /// flex's fused kernels against burn's composed ops: outputs, statistics and the gradients
    /// of input, scale and shift, for batch norm and group norm (several groups, one group).
    /// With each activation: the fused kernels against burn's ops (to rounding), and against
    /// the same kernels with the activation as a node of its own (bit for bit).
    #[test]
    fn fused_normalisation_matches_the_composed_ops_with_gradients() {
        let device = Default::default();
        B::seed(&device, 5);
        let uniform = |lo: f64, hi: f64| Distribution::Uniform(lo, hi);
        let acts = [NormAct::Identity, NormAct::Relu, NormAct::Relu6];
        for ((groups, shape), act) in [
            (NormGroups::Channel, [3, 5, 7, 6]),
            (NormGroups::Image(2), [2, 6, 5, 9]),
            (NormGroups::Image(1), [2, 4, 3, 3]),
        ]
        .into_iter()
        .flat_map(|case| acts.map(|act| (case, act)))
        {
            let c = shape[1];
            let x = Tensor::<B, 4>::random(shape, uniform(-2.0, 3.0), &device);
            // Scales of 3–4 and shifts of −1 to 2 take outputs past 0 and 6 in every case.
            let ramp = |base: f32, step: f32, period: usize| {
                let v: Vec<f32> = (0..c).map(|i| base + step * (i % period) as f32).collect();
                Tensor::<B, 1>::from_floats(v.as_slice(), &device)
            };
            let (gamma, beta) = (ramp(3.0, 0.5, 3), ramp(-1.0, 1.0, 4));
            let probe = Tensor::<B, 4>::random(shape, Distribution::Default, &device);
            let run = |how: &str| {
                let leaf = |t: &Tensor<B, 1>| t.clone().detach().require_grad();
                let (x, gamma, beta) =
                    (x.clone().detach().require_grad(), leaf(&gamma), leaf(&beta));
                let (g, b) = (gamma.clone(), beta.clone());
                let fused = |act| {
                    fused_norm::fused(x.clone(), groups, g.clone(), b.clone(), 1e-5, act)
                        .expect("flex runs the fused kernels")
                };
                let y = match how {
                    "fused" => fused(act),
                    "separate" => {
                        let y = fused(NormAct::Identity);
                        Normalised {
                            output: activate(y.output, act),
                            ..y
                        }
                    }
                    _ => {
                        let y = composed(x.clone(), groups, g, b, 1e-5);
                        Normalised {
                            output: activate(y.output, act),
                            ..y
                        }
                    }
                };
                let grads = (y.output.clone() * probe.clone()).sum().backward();
                let host = |t: Tensor<crate::backend::Inference, 1>| {
                    t.into_data().to_vec::<f32>().expect("f32")
                };
                let flat = |t: Tensor<B, 4>| host(t.inner().flatten(0, 3));
                [
                    flat(y.output),
                    host(y.mean.inner()),
                    host(y.var.inner()),
                    host(x.grad(&grads).expect("x grad").flatten(0, 3)),
                    host(gamma.grad(&grads).expect("gamma grad")),
                    host(beta.grad(&grads).expect("beta grad")),
                ]
            };
            let (fused, separate, plain) = (run("fused"), run("separate"), run("composed"));
            assert_eq!(fused, separate, "{groups:?} {act:?}");
            let clipped = fused[0].iter().filter(|&&v| v == 0.0 || v == 6.0).count();
            match act {
                NormAct::Identity => assert_eq!(clipped, 0),
                NormAct::Relu => assert!(clipped > 0),
                NormAct::Relu6 => assert!(fused[0].contains(&6.0) && fused[0].contains(&0.0)),
            }
            let what = ["output", "mean", "var", "x grad", "gamma grad", "beta grad"];
            for (what, (a, b)) in what.iter().zip(fused.iter().zip(&plain)) {
                assert_eq!(a.len(), b.len(), "{groups:?} {what}");
                let err = a
                    .iter()
                    .zip(b)
                    .map(|(p, q)| (p - q).abs())
                    .fold(0.0, f32::max);
                assert!(
                    err < 1e-4,
                    "{groups:?} {act:?} {what}: max |difference| {err}"
                );
            }
        }
    }

    /// The fused kernels give the same bits with one thread and with several.
    #[test]
    fn fused_normalisation_does_not_depend_on_the_thread_count() {
        let device = Default::default();
        B::seed(&device, 6);
        // Large enough (4.2 M elements) for the kernels to split their rows.
        let x = Tensor::<B, 4>::random([4, 64, 128, 128], Distribution::Default, &device);
        let probe = Tensor::<B, 4>::random([4, 64, 128, 128], Distribution::Default, &device);
        for groups in [NormGroups::Channel, NormGroups::Image(8)] {
            let run = |threads: usize| {
                crate::backend::with_op_threads(threads, || {
                    let x = x.clone().detach().require_grad();
                    let (gamma, beta) = unit_affine::<B>(64, &device);
                    let y = normalise(x.clone(), groups, gamma, beta, 1e-5, NormAct::Relu6).output;
                    let grads = (y.clone() * probe.clone()).sum().backward();
                    let grad = x.grad(&grads).expect("x grad");
                    (y.inner().into_data(), grad.into_data())
                })
            };
            assert_eq!(run(1), run(3), "{groups:?}");
        }
    }

    #[test]
    fn a_folded_frozen_norm_matches_conv_then_norm_with_gradients() {
        let device = Default::default();
        B::seed(&device, 3);
        let random = |c: usize, lo: f64, hi: f64| {
            fixed(Tensor::<B, 1>::random(
                [c],
                Distribution::Uniform(lo, hi),
                &device,
            ))
        };
        // Pointwise (the matrix-product path), depthwise, and a dense 3×3 with a bias.
        for (cin, cout, k, groups, bias) in
            [(6, 5, 1, 1, false), (6, 6, 3, 6, false), (4, 5, 3, 1, true)]
        {
            let mut c = conv(cin, cout, k, 1, 1, groups)
                .with_bias(bias)
                .init::<B>(&device);
            c.weight = Param::from_tensor(c.weight.val().require_grad());
            let norm = Norm2d::Frozen(FrozenBatchNorm2d {
                weight: random(cout, 0.5, 2.0),
                bias: random(cout, -1.0, 1.0),
                running_mean: random(cout, -1.0, 1.0),
                running_var: random(cout, 0.1, 3.0),
            });
            let x = Tensor::<B, 4>::random([2, cin, 7, 6], Distribution::Default, &device);
            let probe = Tensor::<B, 4>::random([2, cout, 7, 6], Distribution::Default, &device);
            let run = |folded: bool| {
                let x = x.clone().detach().require_grad();
                let y = match folded {
                    true => norm.after_conv(&c, x.clone(), NormAct::Identity),
                    false => norm.forward(conv2d(&c, x.clone())),
                };
                let grads = (y.clone() * probe.clone()).sum().backward();
                let host = |t: Tensor<crate::backend::Inference, 4>| {
                    t.into_data().to_vec::<f32>().expect("f32")
                };
                [
                    host(y.inner()),
                    host(x.grad(&grads).expect("x grad")),
                    host(c.weight.val().grad(&grads).expect("weight grad")),
                ]
            };
            let (folded, plain) = (run(true), run(false));
            for (what, (a, b)) in ["output", "input grad", "weight grad"]
                .iter()
                .zip(folded.iter().zip(&plain))
            {
                let err = a
                    .iter()
                    .zip(b)
                    .map(|(p, q)| (p - q).abs())
                    .fold(0.0, f32::max);
                assert!(
                    err < 1e-4,
                    "k {k}, groups {groups}, {what}: max |difference| {err}"
                );
            }
        }
    }
}
