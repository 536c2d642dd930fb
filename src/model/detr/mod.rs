//! DETR, one model kind: the detector (learned anchor boxes and iterative box refinement, DAB-
//! / Deformable-DETR style, which converges in minutes rather than days; sigmoid focal
//! classification; per-layer outputs for auxiliary losses; query groups with a block-diagonal
//! self-attention mask), its typed outputs, set loss, denoising groups, post-processing, and its
//! training [`task`].

pub mod config;
pub mod denoising;
pub mod export;
pub mod instability;
pub mod loss;
pub mod output;
pub mod postprocess;
pub mod task;

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Initializer, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::{
    activation::sigmoid, backend::Backend, Bool, Distribution, Int, Tensor, TensorData,
};

use crate::model::backbone::Backbone;
use crate::model::detr::denoising::DenoisingConfig;
use crate::model::layers::deformable::LevelGrid;
use crate::model::layers::mlp::Mlp;
use crate::model::layers::position::{
    box_gaussian_prior, cell_centres, downsample_padding, padding_tensor, sine_box_embedding,
    sine_position_encoding, valid_extent,
};
use crate::model::layers::transformer::{
    group_attention_mask, DecoderContext, DecoderLayer, EncoderLayer,
};
pub use config::DetrConfig;
pub use output::{narrow_layers, DetrOutput, Encoded, InitialQueries, LayerPrediction, Proposals};
pub use postprocess::postprocess;

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
    /// Learned anchor boxes of all groups' queries in logit space `[G·Q, 4]` (none when the
    /// anchors come from the encoder's proposals).
    pub query_anchors: Option<Param<Tensor<B, 2>>>,
    /// Dense per-token head of two-stage models.
    pub proposal_head: Option<ProposalHead<B>>,
    /// Content embeddings of denoising queries by label `[K + 1, D]` (the last row marks a
    /// padding slot), when denoising is on.
    pub label_embed: Option<Param<Tensor<B, 2>>>,
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
    /// Whether the encoder reads each level, in `feature_strides` order.
    pub encoded_levels: Vec<bool>,
    /// σ of the cross-attention's spatial prior relative to the box size (0 = none).
    pub spatial_prior: f64,
    /// Denoising settings (training only).
    pub denoising: DenoisingConfig,
}

/// Two-stage models' per-token head on the encoder memory: class logits and a box refined
/// from the token's own anchor (its cell centre, two cells wide).
#[derive(Module, Debug)]
pub struct ProposalHead<B: Backend> {
    /// Projection of the memory before the heads (Deformable-DETR's `enc_output`).
    pub proj: Linear<B>,
    /// Its norm.
    pub norm: LayerNorm<B>,
    /// Class logits per token.
    pub class: Linear<B>,
    /// Box refinement of the token's anchor.
    pub boxes: Mlp<B>,
}

/// Focal-loss prior bias: every class starts at probability 0.01, so the many negatives don't
/// swamp the first steps.
fn focal_classifier<B: Backend>(d: usize, classes: usize, device: &B::Device) -> Linear<B> {
    let prior = -((1.0 - 0.01f64) / 0.01).ln();
    let mut head = LinearConfig::new(d, classes).init(device);
    // A fresh trainable parameter: `Param::map` would take `require_grad` from the new tensor,
    // which has none, and silently freeze the bias.
    head.bias = head
        .bias
        .map(|b| Param::from_tensor(b.val().full_like(prior)));
    head
}

/// A box-refinement MLP whose last layer starts at zero, so it first keeps its input anchor.
fn refinement_mlp<B: Backend>(d: usize, device: &B::Device) -> Mlp<B> {
    let mut mlp = Mlp::new(&[d, d, d], device);
    mlp.layers.push(
        LinearConfig::new(d, 4)
            .with_initializer(Initializer::Zeros)
            .init(device),
    );
    mlp
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
        self.denoising.validate()?;
        let backbone = self.backbone.init::<B>(device)?;
        let d = self.layer.d_model;
        let [c2, c3, c4, c5] = backbone.channels();
        if self.feature_strides.is_empty() {
            return Err(crate::Error::config(
                "detr.feature_strides",
                "needs at least one level",
            ));
        }
        if let Some(s) = self
            .encoder_strides
            .iter()
            .find(|s| !self.feature_strides.contains(s))
        {
            return Err(crate::Error::config(
                "detr.encoder_strides",
                format!(
                    "{s} is not one of feature_strides {:?}",
                    self.feature_strides
                ),
            ));
        }
        let input_proj = self
            .feature_strides
            .iter()
            .map(|&s| {
                let c_in = match s {
                    4 => c2,
                    8 => c3,
                    16 => c4,
                    32 => c5,
                    s => {
                        return Err(crate::Error::config(
                            "detr.feature_strides",
                            format!("{s} is not 4, 8, 16 or 32"),
                        ))
                    }
                };
                Ok(Conv2dConfig::new([c_in, d], [1, 1]).init(device))
            })
            .collect::<crate::Result<Vec<_>>>()?;
        let total = self.num_queries * self.groups;
        // Learned anchors start spread uniformly over the image with random sizes, in logit space.
        let query_anchors = (!self.two_stage).then(|| {
            Param::from_tensor(inverse_sigmoid(Tensor::<B, 2>::random(
                [total, 4],
                Distribution::Uniform(0.05, 0.95),
                device,
            )))
        });
        let proposal_head = (self.two_stage || self.dense_head).then(|| ProposalHead {
            proj: LinearConfig::new(d, d).init(device),
            norm: LayerNormConfig::new(d).init(device),
            class: focal_classifier(d, self.num_classes, device),
            boxes: refinement_mlp(d, device),
        });
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
                .map(|_| {
                    let deformable = (self.deformable_points > 0)
                        .then_some((self.feature_strides.len(), self.deformable_points));
                    DecoderLayer::new(&self.layer, deformable, device)
                })
                .collect(),
            decoder_norm: LayerNormConfig::new(d).init(device),
            query_content: Param::from_tensor(Tensor::random(
                [total, d],
                Distribution::Normal(0.0, 1.0),
                device,
            )),
            query_anchors,
            proposal_head,
            label_embed: (self.denoising.groups > 0).then(|| {
                Param::from_tensor(Tensor::random(
                    [self.num_classes + 1, d],
                    Distribution::Normal(0.0, 1.0),
                    device,
                ))
            }),
            anchor_pos: Mlp::new(&[2 * d, d, d], device),
            class_head: focal_classifier(d, self.num_classes, device),
            box_heads: (0..self.decoder_layers)
                .map(|_| refinement_mlp(d, device))
                .collect(),
            num_queries: self.num_queries,
            groups: self.groups,
            d_model: d,
            feature_strides: self.feature_strides.clone(),
            encoded_levels: self
                .feature_strides
                .iter()
                .map(|s| self.encoder_strides.is_empty() || self.encoder_strides.contains(s))
                .collect(),
            spatial_prior: self.spatial_prior,
            denoising: self.denoising,
        })
    }
}

/// Concatenates per-level host values (each level image-major, `B·n_l·c` values) into
/// image-major order over all levels, as the token axis is laid out.
fn image_major<T: Copy>(levels: &[Vec<T>], b: usize) -> Vec<T> {
    (0..b)
        .flat_map(|n| {
            levels.iter().flat_map(move |lvl| {
                let per = lvl.len() / b;
                lvl[n * per..(n + 1) * per].iter().copied()
            })
        })
        .collect()
}

/// Indices of the `k` highest of each row of `scores` (`rows × cols`), skipping entries marked
/// in `skip`; rows with fewer than `k` usable entries repeat their best ones.
fn top_k_rows(scores: &[f32], skip: &[bool], cols: usize, k: usize) -> Vec<usize> {
    scores
        .chunks(cols)
        .zip(skip.chunks(cols))
        .flat_map(|(row, skip)| {
            let mut order: Vec<usize> = (0..cols).filter(|&j| !skip[j]).collect();
            if order.is_empty() {
                order = (0..cols).collect();
            }
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            let n = order.len();
            (0..k).map(move |i| order[i % n])
        })
        .collect()
}

impl<B: Backend> Detr<B> {
    /// Number of object classes.
    pub fn num_classes(&self) -> usize {
        self.class_head.weight.dims()[1]
    }

    /// Runs the detector on normalised images `[B, 3, H, W]` with their padding mask (host
    /// booleans, `[B, H, W]`, true = padding). `groups` query groups are decoded (the training
    /// value, or 1 at inference).
    pub fn forward(&self, images: Tensor<B, 4>, padding: &[bool], groups: usize) -> DetrOutput<B> {
        self.forward_with_extra(images, padding, groups, Vec::new())
            .0
    }

    /// [`Detr::forward`] with `extra` sets of queries (each in groups of the given sizes, e.g.
    /// denoising groups) decoded after the main groups and masked from them. Returns the main
    /// groups' output and, per extra set, its per-layer predictions.
    pub fn forward_with_extra(
        &self,
        images: Tensor<B, 4>,
        padding: &[bool],
        groups: usize,
        extra: Vec<(InitialQueries<B>, Vec<usize>)>,
    ) -> (DetrOutput<B>, Vec<Vec<LayerPrediction<B>>>) {
        let encoded = self.encode(images, padding);
        let groups = groups.clamp(1, self.groups);
        let queries = self.initial_queries(&encoded, groups);
        let group_sizes = vec![self.num_queries; groups];
        let (layers, extra_layers) = if extra.is_empty() {
            (
                self.decode(&encoded, queries.clone(), &group_sizes),
                Vec::new(),
            )
        } else {
            let main = queries.len();
            let mut sizes = group_sizes.clone();
            let mut lens = Vec::with_capacity(extra.len());
            let mut all = vec![queries.clone()];
            for (q, s) in extra {
                lens.push(q.len());
                sizes.extend(s);
                all.push(q);
            }
            let decoded = self.decode(&encoded, InitialQueries::cat(all), &sizes);
            let mut start = main;
            let extra_layers = lens
                .into_iter()
                .map(|n| {
                    let l = narrow_layers(&decoded, start, n);
                    start += n;
                    l
                })
                .collect();
            (narrow_layers(&decoded, 0, main), extra_layers)
        };
        let output = DetrOutput {
            layers,
            group_sizes,
            queries,
            proposals: encoded.proposals,
            features: encoded.features,
        };
        (output, extra_layers)
    }

    /// Backbone, projections, encoder and (two-stage) the per-token proposals.
    pub fn encode(&self, images: Tensor<B, 4>, padding: &[bool]) -> Encoded<B> {
        let device = images.device();
        let [b, _, h, w] = images.dims();
        let features = self.backbone.features(images);
        let tokens = |t: Tensor<B, 4>| t.flatten::<3>(2, 3).swap_dims(1, 2);
        let (mut srcs, mut poss, mut pads, mut centres, mut anchors) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut host_pads: Vec<Vec<bool>> = Vec::new();
        let mut grids = Vec::new();
        for (l, (proj, &stride)) in self
            .input_proj
            .iter()
            .zip(&self.feature_strides)
            .enumerate()
        {
            let level = match stride {
                4 => &features.c2,
                8 => &features.c3,
                16 => &features.c4,
                _ => &features.c5,
            };
            let src = crate::model::layers::conv::conv2d(proj, level.clone());
            let [_, d, fh, fw] = src.dims();
            let mask = downsample_padding(padding, [b, h, w], (fh, fw));
            let pos = sine_position_encoding(&mask, [b, fh, fw], d);
            let pos = Tensor::<B, 4>::from_data(TensorData::new(pos, [b, d, fh, fw]), &device);
            let level_embed = self.level_embed.val().narrow(0, l, 1).unsqueeze_dim::<3>(0);
            srcs.push(tokens(src));
            poss.push(tokens(pos) + level_embed);
            let xy = cell_centres(&mask, [b, fh, fw]);
            // Proposal anchors: the cell centre, two cells wide, so coarser levels propose
            // larger boxes (Deformable-DETR's fixed 0.05·2^l sides suit 800 px images, not
            // small ones).
            let (sw, sh) = (2.0 / fw as f32, 2.0 / fh as f32);
            anchors.push(
                xy.chunks(2)
                    .flat_map(|c| [c[0], c[1], sw, sh])
                    .collect::<Vec<_>>(),
            );
            centres.push(Tensor::<B, 3>::from_data(
                TensorData::new(xy, [b, fh * fw, 2]),
                &device,
            ));
            grids.push(LevelGrid {
                h: fh,
                w: fw,
                start: grids.iter().map(|g: &LevelGrid| g.h * g.w).sum(),
                valid: valid_extent(&mask, [b, fh, fw]),
            });
            host_pads.push(mask.clone());
            pads.push(padding_tensor(mask, [b, fh, fw], &device));
        }
        // Without padding the encoder's mask would fill nothing: it is left out.
        let padded = host_pads.iter().flatten().any(|&p| p);
        let memory = self.encode_levels(srcs, &poss, padded.then_some(&pads[..]));
        let memory_pos = Tensor::cat(poss, 1);
        let memory_padding: Tensor<B, 2, Bool> = Tensor::cat(pads, 1);
        let t = memory.dims()[1];
        let padding = image_major(&host_pads, b);
        // A dense auxiliary head only feeds the training loss: skipped without autodiff.
        let needed = self.query_anchors.is_none() || B::ad_enabled(&device);
        let proposals = self.proposal_head.as_ref().filter(|_| needed).map(|head| {
            let host_anchors = image_major(&anchors, b);
            let anchors = Tensor::<B, 3>::from_data(
                TensorData::new(host_anchors.clone(), [b, t, 4]),
                &device,
            );
            let hidden = head.norm.forward(head.proj.forward(memory.clone()));
            let logits = head.class.forward(hidden.clone());
            let boxes = sigmoid(head.boxes.forward(hidden.clone()) + inverse_sigmoid(anchors));
            // Only two-stage models select queries; a dense auxiliary head skips the copy.
            let selected = self.query_anchors.is_none().then(|| {
                let best: Vec<f32> = logits
                    .clone()
                    .max_dim(2)
                    .into_data()
                    .convert::<f32>()
                    .to_vec()
                    .unwrap_or_default();
                top_k_rows(&best, &padding, t, self.num_queries)
            });
            Proposals {
                prediction: LayerPrediction {
                    logits,
                    boxes,
                    state: hidden.clone(),
                    hidden,
                },
                selected,
                anchors: host_anchors,
                padding: padding.clone(),
            }
        });
        Encoded {
            memory,
            memory_pos,
            memory_padding,
            padding,
            centres: Tensor::cat(centres, 1),
            grids,
            proposals,
            features,
        }
    }

    /// Runs the encoder over the tokens of the encoded levels and concatenates all levels.
    fn encode_levels(
        &self,
        mut srcs: Vec<Tensor<B, 3>>,
        poss: &[Tensor<B, 3>],
        pads: Option<&[Tensor<B, 2, Bool>]>,
    ) -> Tensor<B, 3> {
        let chosen: Vec<usize> = (0..srcs.len())
            .filter(|&l| self.encoded_levels.get(l).copied().unwrap_or(true))
            .collect();
        if self.encoder.is_empty() || chosen.is_empty() {
            return Tensor::cat(srcs, 1);
        }
        let pick =
            |v: &[Tensor<B, 3>]| Tensor::cat(chosen.iter().map(|&l| v[l].clone()).collect(), 1);
        let mut x = pick(&srcs);
        let pos = pick(poss);
        let pad: Option<Tensor<B, 2, Bool>> =
            pads.map(|pads| Tensor::cat(chosen.iter().map(|&l| pads[l].clone()).collect(), 1));
        for layer in &self.encoder {
            x = layer.forward(x, pos.clone(), pad.clone());
        }
        let mut start = 0;
        for &l in &chosen {
            let n = srcs[l].dims()[1];
            srcs[l] = x.clone().narrow(1, start, n);
            start += n;
        }
        Tensor::cat(srcs, 1)
    }

    /// The model's own initial queries for `groups` groups: the learned content embeddings with
    /// either the learned anchors or (two-stage) the selected tokens' boxes.
    pub fn initial_queries(&self, encoded: &Encoded<B>, groups: usize) -> InitialQueries<B> {
        let b = encoded.memory.dims()[0];
        let q = self.num_queries * groups;
        let batch = |t: Tensor<B, 2>| t.narrow(0, 0, q).unsqueeze_dim::<3>(0).repeat_dim(0, b);
        let content = batch(self.query_content.val());
        let selected = encoded.proposals.as_ref().and_then(|p| {
            let selected = p.selected.as_ref()?;
            Some((p, selected))
        });
        let reference = match (&self.query_anchors, selected) {
            (Some(anchors), _) => sigmoid(batch(anchors.val())),
            (None, Some((p, selected))) => {
                let t = encoded.memory.dims()[1];
                let rows: Vec<i64> = selected
                    .iter()
                    .enumerate()
                    .map(|(i, &tok)| ((i / self.num_queries) * t + tok) as i64)
                    .collect();
                let index = Tensor::<B, 1, Int>::from_data(
                    TensorData::new(rows, [b * self.num_queries]),
                    &encoded.memory.device(),
                );
                let boxes = p
                    .prediction
                    .boxes
                    .clone()
                    .reshape([b * t, 4])
                    .select(0, index)
                    .reshape([b, self.num_queries, 4])
                    .detach();
                boxes.repeat_dim(1, groups)
            }
            (None, None) => unreachable!("a DETR without learned anchors selects proposals"),
        };
        InitialQueries { content, reference }
    }

    /// Runs the decoder on `queries` (consecutive groups of `group_sizes`, masked apart) and
    /// returns every layer's predictions.
    pub fn decode(
        &self,
        encoded: &Encoded<B>,
        queries: InitialQueries<B>,
        group_sizes: &[usize],
    ) -> Vec<LayerPrediction<B>> {
        let b = encoded.memory.dims()[0];
        let device = encoded.memory.device();
        let ctx = DecoderContext {
            memory: encoded.memory.clone(),
            memory_pos: encoded.memory_pos.clone(),
            memory_padding: encoded.memory_padding.clone(),
            self_attn_mask: (group_sizes.len() > 1)
                .then(|| group_attention_mask(group_sizes, b, &device)),
            grids: encoded.grids.clone(),
        };
        let InitialQueries {
            content: mut tgt,
            mut reference,
        } = queries;
        let mut layers = Vec::with_capacity(self.decoder.len());
        for (layer, box_head) in self.decoder.iter().zip(&self.box_heads) {
            let query_pos = self
                .anchor_pos
                .forward(sine_box_embedding(reference.clone(), self.d_model / 2));
            let prior = (self.spatial_prior > 0.0 && layer.deformable.is_none()).then(|| {
                box_gaussian_prior(
                    reference.clone(),
                    encoded.centres.clone(),
                    self.spatial_prior,
                )
            });
            tgt = layer.forward(tgt, query_pos, reference.clone(), &ctx, prior);
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
                state: tgt.clone(),
            });
        }
        layers
    }
}
