//! ResNet (He et al., 2016) with torchvision's layout (v1.5: the stride sits on the 3×3 conv).

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::{activation::relu, backend::Backend, Tensor};

use super::{Arch, BackboneConfig, BackboneFeatures};
use crate::model::layers::conv::conv;
use crate::model::layers::norm::{Norm2d, NormAct, NormKind};

/// torchvision's `downsample`: a strided 1×1 conv and a norm (keys `downsample.0/1` map here).
#[derive(Module, Debug)]
pub struct Downsample<B: Backend> {
    /// 1×1 projection.
    pub conv: Conv2d<B>,
    /// Its normalisation.
    pub bn: Norm2d<B>,
}

/// A basic block (two 3×3 convs) or a bottleneck (1×1, 3×3, 1×1), as torchvision names them.
#[derive(Module, Debug)]
pub struct ResBlock<B: Backend> {
    /// First conv.
    pub conv1: Conv2d<B>,
    /// First norm.
    pub bn1: Norm2d<B>,
    /// Second conv.
    pub conv2: Conv2d<B>,
    /// Second norm.
    pub bn2: Norm2d<B>,
    /// Third conv (bottleneck only).
    pub conv3: Option<Conv2d<B>>,
    /// Third norm (bottleneck only).
    pub bn3: Option<Norm2d<B>>,
    /// Shortcut projection when the shape changes.
    pub downsample: Option<Downsample<B>>,
}

impl<B: Backend> ResBlock<B> {
    /// `dilations`: of the 3×3 conv that would carry the stride, and of the basic block's
    /// second 3×3 conv.
    fn new(
        cin: usize,
        width: usize,
        stride: usize,
        dilations: [usize; 2],
        bottleneck: bool,
        norm: NormKind,
        device: &B::Device,
    ) -> Self {
        let expansion = if bottleneck { 4 } else { 1 };
        let cout = width * expansion;
        let downsample = (stride != 1 || cin != cout).then(|| Downsample {
            conv: conv(cin, cout, 1, stride, 1, 1).init(device),
            bn: Norm2d::new(norm, cout, device),
        });
        if bottleneck {
            ResBlock {
                conv1: conv(cin, width, 1, 1, 1, 1).init(device),
                bn1: Norm2d::new(norm, width, device),
                conv2: conv(width, width, 3, stride, dilations[0], 1).init(device),
                bn2: Norm2d::new(norm, width, device),
                conv3: Some(conv(width, cout, 1, 1, 1, 1).init(device)),
                bn3: Some(Norm2d::new(norm, cout, device)),
                downsample,
            }
        } else {
            ResBlock {
                conv1: conv(cin, width, 3, stride, dilations[0], 1).init(device),
                bn1: Norm2d::new(norm, width, device),
                conv2: conv(width, width, 3, 1, dilations[1], 1).init(device),
                bn2: Norm2d::new(norm, width, device),
                conv3: None,
                bn3: None,
                downsample,
            }
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let identity = match &self.downsample {
            Some(d) => d.bn.after_conv(&d.conv, x.clone(), NormAct::Identity),
            None => x.clone(),
        };
        let y = self.bn1.after_conv(&self.conv1, x, NormAct::Relu);
        let y = match (&self.conv3, &self.bn3) {
            (Some(conv3), Some(bn3)) => {
                let y = self.bn2.after_conv(&self.conv2, y, NormAct::Relu);
                bn3.after_conv(conv3, y, NormAct::Identity)
            }
            _ => self.bn2.after_conv(&self.conv2, y, NormAct::Identity),
        };
        relu(y + identity)
    }
}

/// ResNet-18/34/50 with torchvision's parameter names.
#[derive(Module, Debug)]
pub struct ResNet<B: Backend> {
    /// 7×7 stride-2 stem conv.
    pub conv1: Conv2d<B>,
    /// Stem norm.
    pub bn1: Norm2d<B>,
    /// 3×3 stride-2 max pool.
    pub maxpool: MaxPool2d,
    /// Stage 1 (stride 4).
    pub layer1: Vec<ResBlock<B>>,
    /// Stage 2 (stride 8).
    pub layer2: Vec<ResBlock<B>>,
    /// Stage 3 (stride 16).
    pub layer3: Vec<ResBlock<B>>,
    /// Stage 4 (stride 32).
    pub layer4: Vec<ResBlock<B>>,
    /// ImageNet classifier.
    pub fc: Option<Linear<B>>,
    /// Output channels of stages 1–4.
    channels: [usize; 4],
}

/// Scales a channel count by `width`, at least 1.
fn scaled(channels: usize, width: f64) -> usize {
    ((channels as f64 * width).round() as usize).max(1)
}

impl<B: Backend> ResNet<B> {
    /// Builds the network described by `cfg` (`cfg.arch` must be a ResNet).
    pub fn new(cfg: &BackboneConfig, device: &B::Device) -> Self {
        let (depths, bottleneck) = match cfg.arch {
            Arch::Resnet18 => ([2, 2, 2, 2], false),
            Arch::Resnet50 => ([3, 4, 6, 3], true),
            _ => ([3, 4, 6, 3], false),
        };
        let depths = cfg.blocks.unwrap_or(depths);
        let expansion = if bottleneck { 4 } else { 1 };
        let widths = [64, 128, 256, 512].map(|c| scaled(c, cfg.width));
        let stem = widths[0];
        let mut cin = stem;
        let mut stages: Vec<Vec<ResBlock<B>>> = Vec::with_capacity(4);
        let (mut reached, mut dilation) = (4, 1);
        for (s, (&width, &depth)) in widths.iter().zip(&depths).enumerate() {
            // torchvision's `replace_stride_with_dilation`: past the output stride a stage keeps
            // the resolution and dilates instead, its first strided conv at the old dilation.
            let (stride, previous) = if s == 0 {
                (1, dilation)
            } else if reached < cfg.output_stride {
                reached *= 2;
                (2, dilation)
            } else {
                dilation *= 2;
                (1, dilation / 2)
            };
            let blocks = (0..depth)
                .map(|i| {
                    let (stride, dilations) = if i == 0 {
                        (stride, [previous, dilation])
                    } else {
                        (1, [dilation, dilation])
                    };
                    let block =
                        ResBlock::new(cin, width, stride, dilations, bottleneck, cfg.norm, device);
                    cin = width * expansion;
                    block
                })
                .collect();
            stages.push(blocks);
        }
        let mut stages = stages.into_iter().enumerate().map(|(s, blocks)| {
            // Stage s + 2 of the frozen count (the stem is stage 1).
            if cfg.frozen_stages >= s + 2 {
                blocks.into_iter().map(Module::no_grad).collect()
            } else {
                blocks
            }
        });
        let mut next = || stages.next().unwrap_or_default();
        let (layer1, layer2, layer3, layer4) = (next(), next(), next(), next());
        let mut conv1 = conv(3, stem, 7, 2, 1, 1).init(device);
        let mut bn1 = Norm2d::new(cfg.norm, stem, device);
        if cfg.frozen_stages >= 1 {
            conv1 = conv1.no_grad();
            bn1 = bn1.no_grad();
        }
        ResNet {
            conv1,
            bn1,
            maxpool: MaxPool2dConfig::new([3, 3])
                .with_strides([2, 2])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(),
            layer1,
            layer2,
            layer3,
            layer4,
            fc: cfg
                .num_classes
                .map(|k| LinearConfig::new(cin, k).init(device)),
            channels: [
                widths[0] * expansion,
                widths[1] * expansion,
                widths[2] * expansion,
                widths[3] * expansion,
            ],
        }
    }

    /// Channels of `(c2, c3, c4, c5)`.
    pub fn channels(&self) -> [usize; 4] {
        self.channels
    }

    /// Stride-4/8/16/32 features (8/8/8 or 16/16 past the output stride).
    pub fn features(&self, x: Tensor<B, 4>) -> BackboneFeatures<B> {
        let stage = |blocks: &[ResBlock<B>], x| blocks.iter().fold(x, |x, b| b.forward(x));
        let x = self
            .maxpool
            .forward(self.bn1.after_conv(&self.conv1, x, NormAct::Relu));
        let c2 = stage(&self.layer1, x);
        let c3 = stage(&self.layer2, c2.clone());
        let c4 = stage(&self.layer3, c3.clone());
        let c5 = stage(&self.layer4, c4.clone());
        BackboneFeatures { c2, c3, c4, c5 }
    }

    /// ImageNet logits (global average pool + `fc`), if the head exists.
    pub fn classify(&self, x: Tensor<B, 4>) -> Option<Tensor<B, 2>> {
        let fc = self.fc.as_ref()?;
        let c5 = self.features(x).c5;
        let pooled = c5.mean_dim(3).mean_dim(2).flatten(1, 3);
        Some(fc.forward(pooled))
    }
}

/// torchvision names the shortcut `downsample.0` (conv) and `downsample.1` (norm).
pub fn torchvision_key_rules() -> Vec<(String, String)> {
    vec![
        (
            r"\.downsample\.0\.".to_string(),
            ".downsample.conv.".to_string(),
        ),
        (
            r"\.downsample\.1\.".to_string(),
            ".downsample.bn.".to_string(),
        ),
    ]
}
