//! DETR with learned anchor boxes and iterative box refinement (DAB-DETR / Deformable-DETR
//! style, which converges in minutes rather than days), sigmoid focal classification, per-layer
//! outputs for auxiliary losses, and query groups (Group-DETR) with a block-diagonal
//! self-attention mask.

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::{
    activation::{relu, sigmoid},
    backend::Backend,
    Bool, Distribution, Tensor, TensorData,
};
use serde::{Deserialize, Serialize};

use crate::model::backbone::{Backbone, BackboneConfig, BackboneFeatures};
use crate::model::position::{
    box_gaussian_prior, cell_centres, downsample_padding, padding_tensor, sine_box_embedding,
    sine_position_encoding,
};
use crate::model::transformer::{
    group_attention_mask, DecoderContext, DecoderLayer, EncoderLayer, LayerConfig,
};

/// DETR settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetrConfig {
    /// The backbone.
    pub backbone: BackboneConfig,
    /// Backbone levels fed to the transformer, by stride: any of 8 (C3), 16 (C4) and 32 (C5).
    /// Each level gets its own 1×1 projection and a learned level embedding; their tokens are
    /// concatenated into one memory. Fine levels matter for localising small objects. Older
    /// configs with a single `feature_stride` number still load.
    #[serde(
        default = "stride32",
        alias = "feature_stride",
        deserialize_with = "one_or_many"
    )]
    pub feature_strides: Vec<usize>,
    /// Number of object classes.
    pub num_classes: usize,
    /// Queries per group.
    pub num_queries: usize,
    /// Query groups used in training (1 = plain DETR; Group-DETR uses e.g. 11); inference uses
    /// the first group only.
    #[serde(default = "one")]
    pub groups: usize,
    /// Spatial prior of the decoder's cross-attention: each query's attention logits get a
    /// Gaussian around its current box, of standard deviation `spatial_prior` × the box size
    /// (SMCA-style; 0 disables it, giving DETR's plain cross-attention). It lets queries pool
    /// their own region from the first step, which is what makes DETR learn in minutes.
    #[serde(default)]
    pub spatial_prior: f64,
    /// Transformer layer sizes.
    pub layer: LayerConfig,
    /// Encoder layers (may be 0).
    pub encoder_layers: usize,
    /// Decoder layers.
    pub decoder_layers: usize,
}

fn one() -> usize {
    1
}

fn stride32() -> Vec<usize> {
    vec![32]
}

/// Accepts a single stride (the former `feature_stride`) or a list.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<usize>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(usize),
        Many(Vec<usize>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// A small MLP (ReLU between layers), as DETR's box head.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// The layers.
    pub layers: Vec<Linear<B>>,
}

impl<B: Backend> Mlp<B> {
    fn new(dims: &[usize], device: &B::Device) -> Self {
        Mlp {
            layers: dims
                .windows(2)
                .map(|d| LinearConfig::new(d[0], d[1]).init(device))
                .collect(),
        }
    }

    fn forward(&self, mut x: Tensor<B, 3>) -> Tensor<B, 3> {
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(x);
            if i < last {
                x = relu(x);
            }
        }
        x
    }
}

/// Predictions of one decoder layer.
#[derive(Debug, Clone)]
pub struct LayerPrediction<B: Backend> {
    /// Class logits `[B, Q, K]` (sigmoid, no background class).
    pub logits: Tensor<B, 3>,
    /// Boxes `[B, Q, 4]`, normalised `cx, cy, w, h`.
    pub boxes: Tensor<B, 3>,
    /// Decoder states `[B, Q, D]` (for distillation).
    pub hidden: Tensor<B, 3>,
}

/// All decoder layers' predictions; the last entry is the final output.
#[derive(Debug, Clone)]
pub struct DetrOutput<B: Backend> {
    /// One per decoder layer, first to last.
    pub layers: Vec<LayerPrediction<B>>,
    /// Sizes of the query groups, in query order.
    pub group_sizes: Vec<usize>,
    /// The backbone's features.
    pub features: BackboneFeatures<B>,
}

impl<B: Backend> DetrOutput<B> {
    /// The final layer's predictions.
    pub fn last(&self) -> &LayerPrediction<B> {
        self.layers
            .last()
            .unwrap_or_else(|| unreachable!("a DETR has at least one decoder layer"))
    }
}

/// The DETR detector.
#[derive(Module, Debug)]
pub struct Detr<B: Backend> {
    /// Feature extractor.
    pub backbone: Backbone<B>,
    /// 1×1 projection of each level to the model width, in `feature_strides` order.
    pub input_proj: Vec<Conv2d<B>>,
    /// Learned embedding of each level `[L, D]`, added to its sine position.
    pub level_embed: Param<Tensor<B, 2>>,
    /// Encoder layers.
    pub encoder: Vec<EncoderLayer<B>>,
    /// Decoder layers.
    pub decoder: Vec<DecoderLayer<B>>,
    /// Norm applied to every decoder layer's output.
    pub decoder_norm: LayerNorm<B>,
    /// Content embeddings of all groups' queries `[G·Q, D]`.
    pub query_content: Param<Tensor<B, 2>>,
    /// Anchor boxes of all groups' queries in logit space `[G·Q, 4]`.
    pub query_anchors: Param<Tensor<B, 2>>,
    /// Query position from the sine embedding of the current anchor.
    pub anchor_pos: Mlp<B>,
    /// Shared classifier.
    pub class_head: Linear<B>,
    /// Per-layer box refinement heads.
    pub box_heads: Vec<Mlp<B>>,
    /// Queries per group.
    pub num_queries: usize,
    /// Groups used in training.
    pub groups: usize,
    /// Model width.
    pub d_model: usize,
    /// Strides of the backbone levels the transformer reads.
    pub feature_strides: Vec<usize>,
    /// σ of the cross-attention's spatial prior relative to the box size (0 = none).
    pub spatial_prior: f64,
}

/// `log(x / (1 − x))`, clamped as Deformable-DETR does.
fn inverse_sigmoid<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let x = x.clamp(0.0, 1.0);
    let eps = 1e-5;
    let a = x.clone().clamp_min(eps);
    let b = x.neg().add_scalar(1.0).clamp_min(eps);
    (a / b).log()
}

impl DetrConfig {
    /// Builds the model with fresh weights (the backbone can then be loaded from torchvision).
    pub fn init<B: Backend>(&self, device: &B::Device) -> crate::Result<Detr<B>> {
        if self.decoder_layers == 0
            || self.num_queries == 0
            || self.groups == 0
            || self.num_classes == 0
        {
            return Err(crate::Error::config(
                "detr",
                "decoder_layers, num_queries, groups and num_classes must all be at least 1",
            ));
        }
        if self.layer.heads == 0
            || !self.layer.d_model.is_multiple_of(self.layer.heads)
            || !self.layer.d_model.is_multiple_of(8)
        {
            return Err(crate::Error::config(
                "detr.layer.d_model",
                "must be a multiple of 8 and of heads",
            ));
        }
        if !(self.spatial_prior.is_finite() && self.spatial_prior >= 0.0) {
            return Err(crate::Error::config(
                "detr.spatial_prior",
                format!("must be ≥ 0, got {}", self.spatial_prior),
            ));
        }
        let backbone = self.backbone.init::<B>(device)?;
        let d = self.layer.d_model;
        let [c3, c4, c5] = backbone.channels();
        if self.feature_strides.is_empty() {
            return Err(crate::Error::config(
                "detr.feature_strides",
                "needs at least one level",
            ));
        }
        let input_proj = self
            .feature_strides
            .iter()
            .map(|&s| {
                let c_in = match s {
                    8 => c3,
                    16 => c4,
                    32 => c5,
                    s => {
                        return Err(crate::Error::config(
                            "detr.feature_strides",
                            format!("{s} is not 8, 16 or 32"),
                        ))
                    }
                };
                Ok(Conv2dConfig::new([c_in, d], [1, 1]).init(device))
            })
            .collect::<crate::Result<Vec<_>>>()?;
        let total = self.num_queries * self.groups;
        // Anchors start spread uniformly over the image with random sizes, in logit space.
        let anchors = inverse_sigmoid(Tensor::<B, 2>::random(
            [total, 4],
            Distribution::Uniform(0.05, 0.95),
            device,
        ));
        // Focal-loss prior: every class starts at probability 0.01, so the many negatives don't
        // swamp the first steps.
        let prior = -((1.0 - 0.01f64) / 0.01).ln();
        let mut class_head = LinearConfig::new(d, self.num_classes).init(device);
        if let Some(bias) = class_head.bias.take() {
            class_head.bias = Some(bias.map(|b| b.zeros_like().add_scalar(prior)));
        }
        let box_heads = (0..self.decoder_layers)
            .map(|_| {
                let mut mlp = Mlp::new(&[d, d, d, 4], device);
                // Zero last layer: each layer starts by keeping its input anchor.
                if let Some(last) = mlp.layers.last_mut() {
                    last.weight = last.weight.clone().map(|w| w.zeros_like());
                    if let Some(bias) = last.bias.take() {
                        last.bias = Some(bias.map(|b| b.zeros_like()));
                    }
                }
                mlp
            })
            .collect();
        Ok(Detr {
            backbone,
            input_proj,
            level_embed: Param::from_tensor(Tensor::random(
                [self.feature_strides.len(), d],
                Distribution::Normal(0.0, 1.0),
                device,
            )),
            encoder: (0..self.encoder_layers)
                .map(|_| EncoderLayer::new(&self.layer, device))
                .collect(),
            decoder: (0..self.decoder_layers)
                .map(|_| DecoderLayer::new(&self.layer, device))
                .collect(),
            decoder_norm: LayerNormConfig::new(d).init(device),
            query_content: Param::from_tensor(Tensor::random(
                [total, d],
                Distribution::Normal(0.0, 1.0),
                device,
            )),
            query_anchors: Param::from_tensor(anchors),
            anchor_pos: Mlp::new(&[2 * d, d, d], device),
            class_head,
            box_heads,
            num_queries: self.num_queries,
            groups: self.groups,
            d_model: d,
            feature_strides: self.feature_strides.clone(),
            spatial_prior: self.spatial_prior,
        })
    }
}

impl<B: Backend> Detr<B> {
    /// Runs the detector on normalised images `[B, 3, H, W]` with their padding mask (host
    /// booleans, `[B, H, W]`, true = padding). `groups` query groups are decoded (the training
    /// value, or 1 at inference).
    pub fn forward(&self, images: Tensor<B, 4>, padding: &[bool], groups: usize) -> DetrOutput<B> {
        let device = images.device();
        let [b, _, h, w] = images.dims();
        let features = self.backbone.features(images);
        let tokens = |t: Tensor<B, 4>| t.flatten::<3>(2, 3).swap_dims(1, 2);
        let (mut srcs, mut poss, mut pads, mut centres) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (l, (proj, &stride)) in self
            .input_proj
            .iter()
            .zip(&self.feature_strides)
            .enumerate()
        {
            let level = match stride {
                8 => &features.c3,
                16 => &features.c4,
                _ => &features.c5,
            };
            let src = proj.forward(level.clone());
            let [_, d, fh, fw] = src.dims();
            let mask = downsample_padding(padding, [b, h, w], (fh, fw));
            let pos = sine_position_encoding(&mask, [b, fh, fw], d);
            let pos = Tensor::<B, 4>::from_data(TensorData::new(pos, [b, d, fh, fw]), &device);
            let level_embed = self.level_embed.val().narrow(0, l, 1).unsqueeze_dim::<3>(0);
            srcs.push(tokens(src));
            poss.push(tokens(pos) + level_embed);
            if self.spatial_prior > 0.0 {
                let xy = cell_centres(&mask, [b, fh, fw]);
                centres.push(Tensor::<B, 3>::from_data(
                    TensorData::new(xy, [b, fh * fw, 2]),
                    &device,
                ));
            }
            pads.push(padding_tensor(mask, [b, fh, fw], &device));
        }
        let centres = (!centres.is_empty()).then(|| Tensor::cat(centres, 1));
        let mut memory = Tensor::cat(srcs, 1);
        let memory_pos = Tensor::cat(poss, 1);
        let memory_padding: Tensor<B, 2, Bool> = Tensor::cat(pads, 1);
        for layer in &self.encoder {
            memory = layer.forward(memory, memory_pos.clone(), memory_padding.clone());
        }

        let groups = groups.clamp(1, self.groups);
        let q = self.num_queries * groups;
        let group_sizes = vec![self.num_queries; groups];
        let ctx = DecoderContext {
            memory,
            memory_pos,
            memory_padding,
            self_attn_mask: (groups > 1).then(|| group_attention_mask(&group_sizes, b, &device)),
        };
        let batch = |t: Tensor<B, 2>| t.narrow(0, 0, q).unsqueeze_dim::<3>(0).repeat_dim(0, b);
        let mut tgt = batch(self.query_content.val());
        let mut reference = sigmoid(batch(self.query_anchors.val()));
        let mut layers = Vec::with_capacity(self.decoder.len());
        for (layer, box_head) in self.decoder.iter().zip(&self.box_heads) {
            let query_pos = self
                .anchor_pos
                .forward(sine_box_embedding(reference.clone(), self.d_model / 2));
            let prior = centres
                .as_ref()
                .map(|c| box_gaussian_prior(reference.clone(), c.clone(), self.spatial_prior));
            tgt = layer.forward(tgt, query_pos, &ctx, prior);
            let hidden = self.decoder_norm.forward(tgt.clone());
            let boxes =
                sigmoid(box_head.forward(hidden.clone()) + inverse_sigmoid(reference.clone()));
            // Each layer refines the previous layer's boxes; gradients do not flow back through
            // the reference (Deformable-DETR's iterative refinement).
            reference = boxes.clone().detach();
            layers.push(LayerPrediction {
                logits: self.class_head.forward(hidden.clone()),
                boxes,
                hidden,
            });
        }
        DetrOutput {
            layers,
            group_sizes,
            features,
        }
    }
}

/// Turns the first query group's final predictions into detections in original-image pixels:
/// the `max_dets` highest (query, class) sigmoid scores over all queries and classes
/// (Deformable-DETR's post-processing). `orig_sizes` are `(width, height)` per image; boxes are
/// normalised to each image's unpadded extent, which scales uniformly to the original.
pub fn postprocess<B: Backend>(
    prediction: &LayerPrediction<B>,
    num_queries: usize,
    orig_sizes: &[(u32, u32)],
    max_dets: usize,
) -> Vec<Vec<crate::eval::coco::Detection>> {
    let [b, _, k] = prediction.logits.dims();
    let host = |t: Tensor<B, 3>| -> Vec<f32> {
        t.into_data().convert::<f32>().to_vec().unwrap_or_default()
    };
    let scores = host(sigmoid(prediction.logits.clone().narrow(1, 0, num_queries)));
    let boxes = host(prediction.boxes.clone().narrow(1, 0, num_queries));
    (0..b.min(orig_sizes.len()))
        .map(|i| {
            let (w, h) = (orig_sizes[i].0 as f64, orig_sizes[i].1 as f64);
            let s = &scores[i * num_queries * k..(i + 1) * num_queries * k];
            let mut order: Vec<usize> = (0..s.len()).collect();
            order.sort_by(|&a, &c| s[c].total_cmp(&s[a]));
            order
                .into_iter()
                .take(max_dets)
                .map(|j| {
                    let q = j / k;
                    let bx = &boxes[(i * num_queries + q) * 4..][..4];
                    let (cx, cy, bw, bh) = (
                        bx[0] as f64 * w,
                        bx[1] as f64 * h,
                        bx[2] as f64 * w,
                        bx[3] as f64 * h,
                    );
                    crate::eval::coco::Detection {
                        class: j % k,
                        bbox: [cx - bw / 2.0, cy - bh / 2.0, bw, bh],
                        score: s[j] as f64,
                    }
                })
                .collect()
        })
        .collect()
}
