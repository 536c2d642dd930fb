//! Batch normalisation for backbones: frozen (statistics and affine fixed, as DETR and mmdet's
//! `norm_eval` use) or trainable.

use burn::module::{Module, Param, ParamId};
use burn::nn::{BatchNorm, BatchNormConfig};
use burn::tensor::{backend::Backend, Tensor};
use serde::{Deserialize, Serialize};

/// How a backbone normalises activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NormKind {
    /// Fixed statistics and affine parameters (torchvision's `FrozenBatchNorm2d`).
    #[default]
    Frozen,
    /// Trainable batch normalisation with running statistics.
    Batch,
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
        // torchvision uses eps = 1e-5 and folds the statistics into one scale and shift.
        let scale = self.weight.val() * self.running_var.val().add_scalar(1e-5).sqrt().recip();
        let shift = self.bias.val() - self.running_mean.val() * scale.clone();
        let c = scale.dims()[0];
        x * scale.reshape([1, c, 1, 1]) + shift.reshape([1, c, 1, 1])
    }
}

/// A backbone normalisation layer of either kind.
#[derive(Module, Debug)]
pub enum Norm2d<B: Backend> {
    /// Frozen statistics.
    Frozen(FrozenBatchNorm2d<B>),
    /// Trainable batch norm.
    Batch(BatchNorm<B>),
}

impl<B: Backend> Norm2d<B> {
    /// A layer of `kind` over `channels`.
    pub fn new(kind: NormKind, channels: usize, device: &B::Device) -> Self {
        match kind {
            NormKind::Frozen => Norm2d::Frozen(FrozenBatchNorm2d::new(channels, device)),
            NormKind::Batch => Norm2d::Batch(BatchNormConfig::new(channels).init(device)),
        }
    }

    /// Normalises `[N, C, H, W]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        match self {
            Norm2d::Frozen(n) => n.forward(x),
            Norm2d::Batch(n) => n.forward(x),
        }
    }
}
