//! DeepLabV3 (Chen et al., 2017) for semantic segmentation: a dilated backbone, an ASPP head and
//! an auxiliary FCN head on the third stage, with torchvision's `deeplabv3_*` parameter layout
//! (`backbone`, `classifier`, `aux_classifier`) so its checkpoints load by key rules; optionally
//! DeepLabV3+'s decoder (Chen et al., 2018) on the stride-4 stage.

pub mod config;
pub mod export;
pub mod loss;
pub mod task;

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::{backend::Backend, Tensor};

use crate::model::backbone::{Backbone, BackboneFeatures};
use crate::model::layers::conv::{conv, conv2d};
use crate::model::layers::norm::{Norm2d, NormAct, NormKind};
use crate::model::layers::resize::{resize, Sampling};
pub use config::DeepLabV3Config;

/// Conv → norm → ReLU (torchvision's `Conv2d, BatchNorm2d, ReLU` triples).
#[derive(Module, Debug)]
pub struct ConvNormRelu<B: Backend> {
    /// Bias-free convolution.
    pub conv: Conv2d<B>,
    /// Its normalisation.
    pub bn: Norm2d<B>,
}

impl<B: Backend> ConvNormRelu<B> {
    fn new(
        cin: usize,
        cout: usize,
        k: usize,
        dilation: usize,
        norm: NormKind,
        device: &B::Device,
    ) -> Self {
        Self::grouped(cin, cout, k, dilation, 1, norm, device)
    }

    fn grouped(
        cin: usize,
        cout: usize,
        k: usize,
        dilation: usize,
        groups: usize,
        norm: NormKind,
        device: &B::Device,
    ) -> Self {
        ConvNormRelu {
            conv: conv(cin, cout, k, 1, dilation, groups).init(device),
            bn: Norm2d::new(norm, cout, device),
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.bn.forward_act(conv2d(&self.conv, x), NormAct::Relu)
    }
}

/// Atrous spatial pyramid pooling: a 1×1 branch, one dilated 3×3 branch per rate and an
/// image-pooling branch, concatenated and projected.
#[derive(Module, Debug)]
pub struct Aspp<B: Backend> {
    /// The 1×1 branch, then the dense 3×3 branches in rate order (torchvision `convs.0..=n`).
    pub convs: Vec<ConvNormRelu<B>>,
    /// The 3×3 branches as depthwise-separable convolutions, in rate order, with
    /// `separable_aspp` (mmseg's `DepthwiseSeparableASPPModule`; then `convs` holds the 1×1 only).
    pub separable: Vec<SeparableConv<B>>,
    /// The image-pooling branch's 1×1 conv (torchvision `convs.{n+1}`).
    pub pooling: ConvNormRelu<B>,
    /// 1×1 projection of the concatenated branches.
    pub project: ConvNormRelu<B>,
    /// Dropout after the projection.
    pub dropout: Dropout,
}

impl<B: Backend> Aspp<B> {
    fn new(cin: usize, cfg: &DeepLabV3Config, device: &B::Device) -> Self {
        let (ch, norm) = (cfg.channels, cfg.norm);
        let mut convs = vec![ConvNormRelu::new(cin, ch, 1, 1, norm, device)];
        let mut separable = Vec::new();
        for &rate in &cfg.aspp_rates {
            if cfg.separable_aspp {
                separable.push(SeparableConv::new(cin, ch, rate, norm, device));
            } else {
                convs.push(ConvNormRelu::new(cin, ch, 3, rate, norm, device));
            }
        }
        Aspp {
            pooling: ConvNormRelu::new(cin, ch, 1, 1, norm, device),
            project: ConvNormRelu::new(ch * (cfg.aspp_rates.len() + 2), ch, 1, 1, norm, device),
            convs,
            separable,
            dropout: DropoutConfig::new(cfg.aspp_dropout).init(),
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [n, _, h, w] = x.dims();
        let mut branches: Vec<Tensor<B, 4>> = self
            .convs
            .iter()
            .map(|c| c.forward(x.clone()))
            .chain(self.separable.iter().map(|c| c.forward(x.clone())))
            .collect();
        // Bilinear upsampling of a 1×1 map is a broadcast.
        let pooled = self.pooling.forward(x.mean_dim(3).mean_dim(2));
        let c = pooled.dims()[1];
        branches.push(
            pooled
                .reshape([n, c, 1])
                .repeat_dim(2, h * w)
                .reshape([n, c, h, w]),
        );
        self.dropout
            .forward(self.project.forward(Tensor::cat(branches, 1)))
    }
}

/// mmcv's `DepthwiseSeparableConvModule`: a depthwise 3×3 and a pointwise 1×1, each normalised
/// and rectified.
#[derive(Module, Debug)]
pub struct SeparableConv<B: Backend> {
    /// Depthwise 3×3.
    pub depthwise: ConvNormRelu<B>,
    /// Pointwise 1×1.
    pub pointwise: ConvNormRelu<B>,
}

impl<B: Backend> SeparableConv<B> {
    fn new(cin: usize, cout: usize, dilation: usize, norm: NormKind, device: &B::Device) -> Self {
        SeparableConv {
            depthwise: ConvNormRelu::grouped(cin, cin, 3, dilation, cin, norm, device),
            pointwise: ConvNormRelu::new(cin, cout, 1, 1, norm, device),
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.pointwise.forward(self.depthwise.forward(x))
    }
}

/// DeepLabV3+'s decoder (mmseg's `DepthwiseSeparableASPPHead`): the head's features upsampled to
/// the backbone's stride-4 stage, concatenated with a 1×1 projection of that stage, refined by
/// two depthwise-separable 3×3 convolutions. Small objects, a cell or two wide at the output
/// stride, get the stride-4 stage's detail back.
#[derive(Module, Debug)]
pub struct Decoder<B: Backend> {
    /// 1×1 projection of the stride-4 stage (mmseg `c1_bottleneck`).
    pub low_level: ConvNormRelu<B>,
    /// The two refinements (mmseg `sep_bottleneck`).
    pub refine: Vec<SeparableConv<B>>,
}

impl<B: Backend> Decoder<B> {
    fn new(c2: usize, cfg: &DeepLabV3Config, low: usize, device: &B::Device) -> Self {
        let (ch, norm) = (cfg.channels, cfg.norm);
        let separable = |cin: usize| SeparableConv::new(cin, ch, 1, norm, device);
        Decoder {
            low_level: ConvNormRelu::new(c2, low, 1, 1, norm, device),
            refine: vec![separable(ch + low), separable(ch)],
        }
    }

    fn forward(&self, head: Tensor<B, 4>, c2: Tensor<B, 4>) -> Tensor<B, 4> {
        let low = self.low_level.forward(c2);
        let [_, _, h, w] = low.dims();
        let up = resize(head, [h, w], Sampling::Bilinear);
        self.refine
            .iter()
            .fold(Tensor::cat(vec![up, low], 1), |x, conv| conv.forward(x))
    }
}

/// torchvision's `DeepLabHead`: ASPP, a 3×3 conv, and the 1×1 classifier; with DeepLabV3+'s
/// decoder between the conv and the classifier if configured.
#[derive(Module, Debug)]
pub struct DeepLabHead<B: Backend> {
    /// `classifier.0`.
    pub aspp: Aspp<B>,
    /// `classifier.1` / `.2` (conv, norm).
    pub conv: ConvNormRelu<B>,
    /// DeepLabV3+'s decoder (no torchvision counterpart).
    pub decoder: Option<Decoder<B>>,
    /// `classifier.4`: per-class logits.
    pub out: Conv2d<B>,
}

/// torchvision's `FCNHead` (the auxiliary classifier): 3×3 conv to a quarter of the channels,
/// dropout, 1×1 classifier.
#[derive(Module, Debug)]
pub struct FcnHead<B: Backend> {
    /// `aux_classifier.0` / `.1`.
    pub conv: ConvNormRelu<B>,
    /// `aux_classifier.3`.
    pub dropout: Dropout,
    /// `aux_classifier.4`.
    pub out: Conv2d<B>,
}

impl<B: Backend> FcnHead<B> {
    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        conv2d(&self.out, self.dropout.forward(self.conv.forward(x)))
    }
}

/// A DeepLabV3 segmenter.
#[derive(Module, Debug)]
pub struct DeepLabV3<B: Backend> {
    /// Dilated backbone.
    pub backbone: Backbone<B>,
    /// The ASPP head.
    pub classifier: DeepLabHead<B>,
    /// The auxiliary FCN head on the third stage (C4), if configured.
    pub aux_classifier: Option<FcnHead<B>>,
    /// Resize factor of the input images.
    pub input_scale: f64,
}

/// Everything one forward pass computes, for the loss and the distillers.
#[derive(Debug, Clone)]
pub struct SegOutput<B: Backend> {
    /// Backbone stages.
    pub backbone: BackboneFeatures<B>,
    /// The head's features before its classifier `[N, channels, h, w]` (CWD/feature KD).
    pub features: Tensor<B, 4>,
    /// Class logits at the output stride (stride 4 with the decoder) `[N, K, h, w]`.
    pub logits: Tensor<B, 4>,
    /// Auxiliary-head logits `[N, K, h, w]`.
    pub aux_logits: Option<Tensor<B, 4>>,
}

/// A `1×1` convolution with bias (the classifiers).
fn classifier<B: Backend>(cin: usize, classes: usize, device: &B::Device) -> Conv2d<B> {
    Conv2dConfig::new([cin, classes], [1, 1]).init(device)
}

impl DeepLabV3Config {
    /// Builds the model with fresh weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> crate::Result<DeepLabV3<B>> {
        self.validate()?;
        let backbone = self.backbone.init::<B>(device)?;
        let [c2, _, c4, c5] = backbone.channels();
        let (ch, norm, aux) = (self.channels, self.norm, (c4 / 4).max(1));
        Ok(DeepLabV3 {
            backbone,
            classifier: DeepLabHead {
                aspp: Aspp::new(c5, self, device),
                conv: ConvNormRelu::new(ch, ch, 3, 1, norm, device),
                decoder: self
                    .decoder
                    .as_ref()
                    .map(|d| Decoder::new(c2, self, d.low_level_channels, device)),
                out: classifier(ch, self.num_classes, device),
            },
            aux_classifier: self.aux_head.then(|| FcnHead {
                conv: ConvNormRelu::new(c4, aux, 3, 1, norm, device),
                dropout: DropoutConfig::new(self.aux_dropout).init(),
                out: classifier(aux, self.num_classes, device),
            }),
            input_scale: self.input_scale,
        })
    }
}

impl<B: Backend> DeepLabV3<B> {
    /// The forward pass of a normalised image batch `[N, 3, H, W]`.
    pub fn forward(&self, images: Tensor<B, 4>) -> SegOutput<B> {
        let [_, _, h, w] = images.dims();
        let scaled = |x: usize| ((x as f64 * self.input_scale).round() as usize).max(1);
        let backbone =
            self.backbone
                .features(resize(images, [scaled(h), scaled(w)], Sampling::Bilinear));
        let head = &self.classifier;
        let mut features = head.conv.forward(head.aspp.forward(backbone.c5.clone()));
        if let Some(decoder) = &head.decoder {
            features = decoder.forward(features, backbone.c2.clone());
        }
        let logits = conv2d(&head.out, features.clone());
        let aux_logits = self
            .aux_classifier
            .as_ref()
            .map(|aux| aux.forward(backbone.c4.clone()));
        SegOutput {
            backbone,
            features,
            logits,
            aux_logits,
        }
    }

    /// Number of classes (background included).
    pub fn num_classes(&self) -> usize {
        self.classifier.out.weight.dims()[0]
    }

    /// Regex rules from torchvision's `deeplabv3_*` state-dict keys to this module's paths.
    pub fn torchvision_key_rules(&self) -> Vec<(String, String)> {
        let aspp = &self.classifier.aspp;
        let pooling = aspp.convs.len() + aspp.separable.len();
        let mut rules: Vec<(String, String)> = self
            .backbone
            .torchvision_key_rules()
            .into_iter()
            .map(|(from, to)| match from.strip_prefix('^') {
                Some(rest) => (format!(r"^backbone\.{rest}"), format!("backbone.{to}")),
                None => (from, to),
            })
            .collect();
        let head = [
            (
                format!(r"^classifier\.0\.convs\.{pooling}\.1\."),
                "classifier.aspp.pooling.conv.".to_string(),
            ),
            (
                format!(r"^classifier\.0\.convs\.{pooling}\.2\."),
                "classifier.aspp.pooling.bn.".to_string(),
            ),
            (
                r"^classifier\.0\.convs\.(\d+)\.0\.".to_string(),
                "classifier.aspp.convs.$1.conv.".to_string(),
            ),
            (
                r"^classifier\.0\.convs\.(\d+)\.1\.".to_string(),
                "classifier.aspp.convs.$1.bn.".to_string(),
            ),
            (
                r"^classifier\.0\.project\.0\.".to_string(),
                "classifier.aspp.project.conv.".to_string(),
            ),
            (
                r"^classifier\.0\.project\.1\.".to_string(),
                "classifier.aspp.project.bn.".to_string(),
            ),
            (
                r"^classifier\.1\.".to_string(),
                "classifier.conv.conv.".to_string(),
            ),
            (
                r"^classifier\.2\.".to_string(),
                "classifier.conv.bn.".to_string(),
            ),
            (
                r"^classifier\.4\.".to_string(),
                "classifier.out.".to_string(),
            ),
            (
                r"^aux_classifier\.0\.".to_string(),
                "aux_classifier.conv.conv.".to_string(),
            ),
            (
                r"^aux_classifier\.1\.".to_string(),
                "aux_classifier.conv.bn.".to_string(),
            ),
            (
                r"^aux_classifier\.4\.".to_string(),
                "aux_classifier.out.".to_string(),
            ),
        ];
        rules.extend(head);
        rules
    }
}
