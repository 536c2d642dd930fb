//! MobileNetV2 (Sandler et al., 2018) with torchvision's layout and width multiplier rule.

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{backend::Backend, Tensor};

use super::{BackboneConfig, BackboneFeatures};
use crate::model::layers::conv::conv;
use crate::model::layers::norm::{Norm2d, NormAct, NormKind};

/// torchvision's `_make_divisible`: round to a multiple of `divisor` without losing > 10 %.
fn make_divisible(v: f64, divisor: usize) -> usize {
    let d = divisor as f64;
    let mut new_v = (((v + d / 2.0) as usize) / divisor * divisor).max(divisor);
    if (new_v as f64) < 0.9 * v {
        new_v += divisor;
    }
    new_v
}

/// Conv → norm → ReLU6 (torchvision's `Conv2dNormActivation`).
#[derive(Module, Debug)]
pub struct ConvNormAct<B: Backend> {
    /// Bias-free convolution.
    pub conv: Conv2d<B>,
    /// Normalisation.
    pub bn: Norm2d<B>,
}

impl<B: Backend> ConvNormAct<B> {
    // torchvision's `Conv2dNormActivation` arguments, one for one.
    #[allow(clippy::too_many_arguments)]
    fn new(
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        dilation: usize,
        groups: usize,
        norm: NormKind,
        device: &B::Device,
    ) -> Self {
        ConvNormAct {
            conv: conv(cin, cout, k, stride, dilation, groups).init(device),
            bn: Norm2d::new(norm, cout, device),
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.bn.after_conv(&self.conv, x, NormAct::Relu6)
    }
}

/// Inverted residual: optional 1×1 expansion, 3×3 depthwise, linear 1×1 projection.
#[derive(Module, Debug)]
pub struct InvertedResidual<B: Backend> {
    /// 1×1 expansion (absent when the expand ratio is 1).
    pub expand: Option<ConvNormAct<B>>,
    /// 3×3 depthwise conv.
    pub depthwise: ConvNormAct<B>,
    /// Linear 1×1 projection.
    pub project: Conv2d<B>,
    /// Projection norm.
    pub project_bn: Norm2d<B>,
    /// Whether the input is added back (stride 1, same channels).
    residual: bool,
}

impl<B: Backend> InvertedResidual<B> {
    fn new(
        cin: usize,
        cout: usize,
        stride: usize,
        dilation: usize,
        expand_ratio: usize,
        norm: NormKind,
        device: &B::Device,
    ) -> Self {
        let hidden = cin * expand_ratio;
        InvertedResidual {
            expand: (expand_ratio != 1)
                .then(|| ConvNormAct::new(cin, hidden, 1, 1, 1, 1, norm, device)),
            depthwise: ConvNormAct::new(hidden, hidden, 3, stride, dilation, hidden, norm, device),
            project: conv(hidden, cout, 1, 1, 1, 1).init(device),
            project_bn: Norm2d::new(norm, cout, device),
            residual: stride == 1 && cin == cout,
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut y = x.clone();
        if let Some(e) = &self.expand {
            y = e.forward(y);
        }
        y = self
            .project_bn
            .after_conv(&self.project, self.depthwise.forward(y), NormAct::Identity);
        if self.residual {
            y + x
        } else {
            y
        }
    }
}

/// `(expand ratio, channels, repeats, stride)` per stage, as torchvision.
const SETTINGS: [(usize, usize, usize, usize); 7] = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
];
/// Blocks after which the stride-4, stride-8 and stride-16 features are tapped (torchvision
/// `features[3]`, `features[6]` and `features[13]`).
const TAPS: [usize; 3] = [2, 5, 12];

/// MobileNetV2. torchvision's `features.0` is `stem`, `features.1..=17` are `blocks`,
/// `features.18` is `head`, `classifier.1` is `classifier`.
#[derive(Module, Debug)]
pub struct MobileNetV2<B: Backend> {
    /// 3×3 stride-2 stem.
    pub stem: ConvNormAct<B>,
    /// The 17 inverted residual blocks.
    pub blocks: Vec<InvertedResidual<B>>,
    /// 1×1 conv to the last channel count (absent without `last_conv`).
    pub head: Option<ConvNormAct<B>>,
    /// ImageNet classifier (dropout is a no-op at inference).
    pub classifier: Option<Linear<B>>,
    /// Channels of `(c2, c3, c4, c5)`.
    channels: [usize; 4],
}

impl<B: Backend> MobileNetV2<B> {
    /// Builds the network with `cfg.width` as torchvision's `width_mult`.
    pub fn new(cfg: &BackboneConfig, device: &B::Device) -> Self {
        let norm = cfg.norm;
        let mut cin = make_divisible(32.0 * cfg.width, 8);
        let last = make_divisible(1280.0 * cfg.width.max(1.0), 8);
        let mut stem = ConvNormAct::new(3, cin, 3, 2, 1, 1, norm, device);
        if cfg.frozen_stages >= 1 {
            stem = stem.no_grad();
        }
        let mut blocks = Vec::new();
        let mut tapped = Vec::new();
        let (mut reached, mut dilation) = (2, 1);
        // Stages for freezing: the stem, then each SETTINGS row.
        for (stage, &(t, c, n, s)) in SETTINGS.iter().enumerate() {
            let cout = make_divisible(c as f64 * cfg.width, 8);
            // As torchvision's dilated MobileNetV3: past the output stride a stage keeps the
            // resolution and dilates every depthwise conv instead.
            let s = if s == 1 || reached < cfg.output_stride {
                reached *= s;
                s
            } else {
                dilation *= s;
                1
            };
            for i in 0..n {
                let stride = if i == 0 { s } else { 1 };
                let mut block = InvertedResidual::new(cin, cout, stride, dilation, t, norm, device);
                if cfg.frozen_stages >= stage + 2 {
                    block = block.no_grad();
                }
                if TAPS.contains(&blocks.len()) {
                    tapped.push(cout);
                }
                blocks.push(block);
                cin = cout;
            }
        }
        let c5 = if cfg.last_conv { last } else { cin };
        MobileNetV2 {
            stem,
            blocks,
            head: cfg
                .last_conv
                .then(|| ConvNormAct::new(cin, last, 1, 1, 1, 1, norm, device)),
            classifier: cfg
                .num_classes
                .map(|k| LinearConfig::new(c5, k).init(device)),
            channels: [tapped[0], tapped[1], tapped[2], c5],
        }
    }

    /// Channels of `(c2, c3, c4, c5)`.
    pub fn channels(&self) -> [usize; 4] {
        self.channels
    }

    /// Stride-4/8/16/32 features (8/8/8 or 16/16 past the output stride).
    pub fn features(&self, x: Tensor<B, 4>) -> BackboneFeatures<B> {
        let mut x = self.stem.forward(x);
        let mut taps = Vec::with_capacity(TAPS.len());
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(x);
            if TAPS.contains(&i) {
                taps.push(x.clone());
            }
        }
        let c5 = match &self.head {
            Some(head) => head.forward(x),
            None => x,
        };
        let mut taps = taps.into_iter();
        let (Some(c2), Some(c3), Some(c4)) = (taps.next(), taps.next(), taps.next()) else {
            unreachable!("MobileNetV2 always has 17 blocks, so every tap exists")
        };
        BackboneFeatures { c2, c3, c4, c5 }
    }

    /// ImageNet logits (global average pool + classifier), if the head exists.
    pub fn classify(&self, x: Tensor<B, 4>) -> Option<Tensor<B, 2>> {
        let fc = self.classifier.as_ref()?;
        let pooled = self.features(x).c5.mean_dim(3).mean_dim(2).flatten(1, 3);
        Some(fc.forward(pooled))
    }

    /// Regex rules from torchvision's `features.*` keys to this module's paths.
    pub fn torchvision_key_rules(&self) -> Vec<(String, String)> {
        let mut rules = vec![
            (r"^features\.0\.0\.".to_string(), "stem.conv.".to_string()),
            (r"^features\.0\.1\.".to_string(), "stem.bn.".to_string()),
            (
                format!(r"^features\.{}\.0\.", self.blocks.len() + 1),
                "head.conv.".to_string(),
            ),
            (
                format!(r"^features\.{}\.1\.", self.blocks.len() + 1),
                "head.bn.".to_string(),
            ),
            (r"^classifier\.1\.".to_string(), "classifier.".to_string()),
        ];
        for (i, block) in self.blocks.iter().enumerate() {
            let (src, dst) = (
                format!(r"^features\.{}\.conv\.", i + 1),
                format!("blocks.{i}."),
            );
            // Sub-layer order inside torchvision's `conv` Sequential.
            let parts: &[(&str, &str)] = if block.expand.is_some() {
                &[
                    ("0.0.", "expand.conv."),
                    ("0.1.", "expand.bn."),
                    ("1.0.", "depthwise.conv."),
                    ("1.1.", "depthwise.bn."),
                    ("2.", "project."),
                    ("3.", "project_bn."),
                ]
            } else {
                &[
                    ("0.0.", "depthwise.conv."),
                    ("0.1.", "depthwise.bn."),
                    ("1.", "project."),
                    ("2.", "project_bn."),
                ]
            };
            for (from, to) in parts {
                rules.push((
                    format!("{src}{}", from.replace('.', r"\.")),
                    format!("{dst}{to}"),
                ));
            }
        }
        rules
    }
}
