//! FCOS (Tian et al., 2019): a backbone, a feature pyramid and a shared per-level head that
//! predicts, at every point, class scores, the distances to the four sides of its box and a
//! centerness. Parameter names follow torchvision's `fcos_resnet50_fpn` (`backbone.body`,
//! `backbone.fpn`, `head.classification_head`, `head.regression_head`), so its checkpoints load
//! by key rules.

pub mod config;
pub mod export;
pub mod loss;
pub mod postprocess;
pub mod targets;
pub mod task;

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{GroupNorm, GroupNormConfig, Initializer, PaddingConfig2d};
use burn::tensor::{activation::relu, backend::Backend, Tensor};

use crate::model::backbone::Backbone;
use crate::model::layers::conv::conv2d;
use crate::model::layers::norm::{group_norm, NormAct};
use crate::model::layers::resize::{resize, Sampling};
pub use config::FcosConfig;

/// A `k×k` convolution (stride `stride`, size-keeping padding) with weights drawn by `init`
/// and every bias set to `bias`, as torchvision initialises FPN and head convolutions.
fn conv_init<B: Backend>(
    [cin, cout]: [usize; 2],
    k: usize,
    stride: usize,
    init: Initializer,
    bias: f64,
    device: &B::Device,
) -> Conv2d<B> {
    let pad = k / 2;
    let mut conv = Conv2dConfig::new([cin, cout], [k, k])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
        .with_initializer(init)
        .init(device);
    conv.bias = Some(Param::from_tensor(Tensor::full([cout], bias, device)));
    conv
}

/// torchvision's FPN initialisation: `kaiming_uniform_(a=1)`, zero bias.
fn fpn_conv<B: Backend>(
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    device: &B::Device,
) -> Conv2d<B> {
    let init = Initializer::KaimingUniform {
        gain: 1.0,
        fan_out_only: false,
    };
    conv_init([cin, cout], k, stride, init, 0.0, device)
}

/// torchvision's head initialisation: normal with σ = 0.01 and the given bias.
fn head_conv<B: Backend>(cin: usize, cout: usize, bias: f64, device: &B::Device) -> Conv2d<B> {
    let init = Initializer::Normal {
        mean: 0.0,
        std: 0.01,
    };
    conv_init([cin, cout], 3, 1, init, bias, device)
}

/// torchvision's `FeaturePyramidNetwork` with `LastLevelP6P7` on P5: a 1×1 lateral and a 3×3
/// output convolution per backbone level, top-down nearest upsampling, then stride-2 P6 and P7.
#[derive(Module, Debug)]
pub struct Fpn<B: Backend> {
    /// Lateral 1×1 convolutions, C3 first (`inner_blocks.i.0`).
    pub inner_blocks: Vec<Conv2d<B>>,
    /// Output 3×3 convolutions, P3 first (`layer_blocks.i.0`).
    pub layer_blocks: Vec<Conv2d<B>>,
    /// P6 from P5 (`extra_blocks.p6`).
    pub p6: Option<Conv2d<B>>,
    /// P7 from ReLU(P6) (`extra_blocks.p7`).
    pub p7: Option<Conv2d<B>>,
}

impl<B: Backend> Fpn<B> {
    fn new(in_channels: &[usize], ch: usize, levels: usize, device: &B::Device) -> Self {
        Fpn {
            inner_blocks: in_channels
                .iter()
                .map(|&c| fpn_conv(c, ch, 1, 1, device))
                .collect(),
            layer_blocks: in_channels
                .iter()
                .map(|_| fpn_conv(ch, ch, 3, 1, device))
                .collect(),
            p6: (levels > 3).then(|| fpn_conv(ch, ch, 3, 2, device)),
            p7: (levels > 4).then(|| fpn_conv(ch, ch, 3, 2, device)),
        }
    }

    /// The pyramid, finest level first, from backbone stages (finest first).
    pub fn forward(&self, stages: Vec<Tensor<B, 4>>) -> Vec<Tensor<B, 4>> {
        let n = stages.len();
        let mut stages = stages.into_iter().rev();
        let Some(top) = stages.next() else {
            return Vec::new();
        };
        let mut last_inner = conv2d(&self.inner_blocks[n - 1], top);
        let mut out = vec![self.layer_blocks[n - 1].forward(last_inner.clone())];
        for (i, stage) in (0..n - 1).rev().zip(stages) {
            let lateral = conv2d(&self.inner_blocks[i], stage);
            let [_, _, h, w] = lateral.dims();
            let top_down = resize(last_inner, [h, w], Sampling::Nearest);
            last_inner = lateral + top_down;
            out.push(self.layer_blocks[i].forward(last_inner.clone()));
        }
        out.reverse();
        if let Some(p6) = &self.p6 {
            let x6 = p6.forward(out[n - 1].clone());
            if let Some(p7) = &self.p7 {
                let x7 = p7.forward(relu(x6.clone()));
                out.push(x6);
                out.push(x7);
            } else {
                out.push(x6);
            }
        }
        out
    }
}

/// Conv → GroupNorm → ReLU, one block of a head tower.
#[derive(Module, Debug)]
pub struct ConvGn<B: Backend> {
    /// 3×3 convolution with bias.
    pub conv: Conv2d<B>,
    /// Group normalisation.
    pub norm: GroupNorm<B>,
}

impl<B: Backend> ConvGn<B> {
    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        group_norm(&self.norm, self.conv.forward(x), NormAct::Relu)
    }
}

/// A tower of `cfg.head_convs` blocks.
fn tower<B: Backend>(cfg: &FcosConfig, device: &B::Device) -> Vec<ConvGn<B>> {
    let ch = cfg.channels;
    (0..cfg.head_convs)
        .map(|_| ConvGn {
            conv: head_conv(ch, ch, 0.0, device),
            norm: GroupNormConfig::new(cfg.norm_groups, ch).init(device),
        })
        .collect()
}

fn run_tower<B: Backend>(tower: &[ConvGn<B>], x: Tensor<B, 4>) -> Tensor<B, 4> {
    tower.iter().fold(x, |x, block| block.forward(x))
}

/// torchvision's `FCOSClassificationHead`.
#[derive(Module, Debug)]
pub struct ClassificationHead<B: Backend> {
    /// The tower (`conv.{3i}` / `conv.{3i+1}`).
    pub conv: Vec<ConvGn<B>>,
    /// Per-class logits.
    pub cls_logits: Conv2d<B>,
}

/// torchvision's `FCOSRegressionHead`: box distances and centerness from one tower.
#[derive(Module, Debug)]
pub struct RegressionHead<B: Backend> {
    /// The tower.
    pub conv: Vec<ConvGn<B>>,
    /// Distances to the box sides (l, t, r, b) in anchor sizes, before ReLU.
    pub bbox_reg: Conv2d<B>,
    /// Centerness logit.
    pub bbox_ctrness: Conv2d<B>,
}

/// The head shared by every level.
#[derive(Module, Debug)]
pub struct FcosHead<B: Backend> {
    /// Classification branch.
    pub classification_head: ClassificationHead<B>,
    /// Box and centerness branch.
    pub regression_head: RegressionHead<B>,
}

/// One level's head outputs.
#[derive(Debug, Clone)]
pub struct LevelOutput<B: Backend> {
    /// Class logits `[N, K, H, W]`.
    pub cls_logits: Tensor<B, 4>,
    /// Non-negative distances (l, t, r, b) in anchor sizes `[N, 4, H, W]`.
    pub bbox_reg: Tensor<B, 4>,
    /// Centerness logits `[N, 1, H, W]`.
    pub centerness: Tensor<B, 4>,
}

/// Head outputs of all levels flattened to points, in torchvision's order (level, row,
/// column).
#[derive(Debug, Clone)]
pub struct FlatOutput<B: Backend> {
    /// `[N, A, K]`.
    pub cls_logits: Tensor<B, 3>,
    /// `[N, A, 4]`.
    pub bbox_reg: Tensor<B, 3>,
    /// `[N, A]`.
    pub centerness: Tensor<B, 2>,
    /// `(H, W)` of each level.
    pub level_shapes: Vec<(usize, usize)>,
}

/// `[N, C, H, W]` → `[N, H·W, C]`.
fn points_last<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 3> {
    let [n, c, h, w] = x.dims();
    x.reshape([n, c, h * w]).swap_dims(1, 2)
}

impl<B: Backend> LevelOutput<B> {
    /// Flattens per-level outputs into points.
    pub fn flatten(levels: &[LevelOutput<B>]) -> FlatOutput<B> {
        let cat3 = |f: &dyn Fn(&LevelOutput<B>) -> Tensor<B, 4>| {
            Tensor::cat(levels.iter().map(|l| points_last(f(l))).collect(), 1)
        };
        let centerness = cat3(&|l| l.centerness.clone());
        let [n, a, _] = centerness.dims();
        FlatOutput {
            cls_logits: cat3(&|l| l.cls_logits.clone()),
            bbox_reg: cat3(&|l| l.bbox_reg.clone()),
            centerness: centerness.reshape([n, a]),
            level_shapes: levels
                .iter()
                .map(|l| {
                    let [_, _, h, w] = l.centerness.dims();
                    (h, w)
                })
                .collect(),
        }
    }
}

/// An FCOS detector.
#[derive(Module, Debug)]
pub struct Fcos<B: Backend> {
    /// The backbone (torchvision `backbone.body`).
    pub backbone: Backbone<B>,
    /// The feature pyramid (torchvision `backbone.fpn`).
    pub fpn: Fpn<B>,
    /// The shared head.
    pub head: FcosHead<B>,
    /// Learned scale of each level's box distances (FCOS paper; 1 = torchvision).
    pub scales: Param<Tensor<B, 1>>,
}

/// Everything one forward pass computes, for the loss and the distillers.
#[derive(Debug, Clone)]
pub struct FcosOutput<B: Backend> {
    /// FPN levels, finest first `[N, C, H_l, W_l]`.
    pub fpn: Vec<Tensor<B, 4>>,
    /// The head's outputs on each level.
    pub levels: Vec<LevelOutput<B>>,
}

impl FcosConfig {
    /// Builds the model with fresh weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> crate::Result<Fcos<B>> {
        self.validate()?;
        let backbone = self.backbone.init::<B>(device)?;
        let [_, c3, c4, c5] = backbone.channels();
        let levels = self.strides.len();
        let inputs = [c3, c4, c5];
        let ch = self.channels;
        let prior = -((1.0 - self.prior_prob) / self.prior_prob).ln();
        Ok(Fcos {
            fpn: Fpn::new(&inputs[..levels.min(3)], ch, levels, device),
            backbone,
            head: FcosHead {
                classification_head: ClassificationHead {
                    conv: tower(self, device),
                    cls_logits: head_conv(ch, self.num_classes, prior, device),
                },
                regression_head: RegressionHead {
                    conv: tower(self, device),
                    bbox_reg: head_conv(ch, 4, 0.0, device),
                    bbox_ctrness: head_conv(ch, 1, 0.0, device),
                },
            },
            scales: Param::from_tensor(Tensor::ones([levels], device)),
        })
    }
}

impl<B: Backend> Fcos<B> {
    /// The forward pass of a normalised image batch `[N, 3, H, W]`.
    pub fn forward(&self, images: Tensor<B, 4>) -> FcosOutput<B> {
        self.forward_with(images, false)
    }

    /// The forward pass, with the backbone's features detached when `freeze_backbone` is set
    /// (no gradient reaches the backbone; LGD's first phase).
    pub fn forward_with(&self, images: Tensor<B, 4>, freeze_backbone: bool) -> FcosOutput<B> {
        let f = self.backbone.features(images);
        let levels = self.fpn.inner_blocks.len();
        let stages: Vec<Tensor<B, 4>> = [f.c3, f.c4, f.c5]
            .into_iter()
            .take(levels)
            .map(|t| if freeze_backbone { t.detach() } else { t })
            .collect();
        let fpn = self.fpn.forward(stages);
        let levels = self.head(&fpn);
        FcosOutput { fpn, levels }
    }

    /// The shared head on each of `fpn`'s levels (also run on an implicit teacher's maps).
    pub fn head(&self, fpn: &[Tensor<B, 4>]) -> Vec<LevelOutput<B>> {
        let (cls, reg) = (&self.head.classification_head, &self.head.regression_head);
        let scales = self.scales.val();
        fpn.iter()
            .enumerate()
            .map(|(l, x)| {
                let c = run_tower(&cls.conv, x.clone());
                let r = run_tower(&reg.conv, x.clone());
                let scale = scales.clone().narrow(0, l, 1).reshape([1, 1, 1, 1]);
                LevelOutput {
                    cls_logits: cls.cls_logits.forward(c),
                    bbox_reg: relu(reg.bbox_reg.forward(r.clone()) * scale),
                    centerness: reg.bbox_ctrness.forward(r),
                }
            })
            .collect()
    }

    /// Number of object classes.
    pub fn num_classes(&self) -> usize {
        self.head.classification_head.cls_logits.weight.dims()[0]
    }

    /// Regex rules from torchvision's `fcos_*` state-dict keys to this module's paths.
    pub fn torchvision_key_rules(&self) -> Vec<(String, String)> {
        let mut rules = vec![(r"^backbone\.body\.".to_string(), "backbone.".to_string())];
        rules.extend(
            self.backbone
                .torchvision_key_rules()
                .into_iter()
                .map(|(from, to)| match from.strip_prefix('^') {
                    Some(rest) => (format!(r"^backbone\.{rest}"), format!("backbone.{to}")),
                    None => (from, to),
                }),
        );
        let fixed = [
            (
                r"^backbone\.fpn\.inner_blocks\.(\d+)\.0\.",
                "fpn.inner_blocks.$1.",
            ),
            (
                r"^backbone\.fpn\.layer_blocks\.(\d+)\.0\.",
                "fpn.layer_blocks.$1.",
            ),
            (r"^backbone\.fpn\.extra_blocks\.(p6|p7)\.", "fpn.$1."),
            (
                r"^head\.classification_head\.cls_logits\.",
                "head.classification_head.cls_logits.",
            ),
            (
                r"^head\.regression_head\.(bbox_reg|bbox_ctrness)\.",
                "head.regression_head.$1.",
            ),
        ];
        rules.extend(fixed.iter().map(|(a, b)| (a.to_string(), b.to_string())));
        // torchvision's towers are `Sequential(conv, GroupNorm, ReLU) × n`: index 3i is the
        // i-th conv, 3i + 1 its norm.
        for branch in ["classification_head", "regression_head"] {
            for i in 0..self.head.classification_head.conv.len() {
                for (offset, part) in [(0, "conv"), (1, "norm")] {
                    rules.push((
                        format!(r"^head\.{branch}\.conv\.{}\.", 3 * i + offset),
                        format!("head.{branch}.conv.{i}.{part}."),
                    ));
                }
            }
        }
        // burn's GroupNorm names its affine `gamma` / `beta`.
        rules.push((
            r"^(head\.\w+\.conv\.\d+\.norm)\.weight$".to_string(),
            "$1.gamma".to_string(),
        ));
        rules.push((
            r"^(head\.\w+\.conv\.\d+\.norm)\.bias$".to_string(),
            "$1.beta".to_string(),
        ));
        rules
    }
}
