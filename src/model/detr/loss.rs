//! DETR's set criterion with sigmoid focal classification (Deformable-DETR convention): after
//! Hungarian matching, focal loss against one-hot targets of the matched queries, L1 and GIoU on
//! the matched boxes, each summed and divided by the number of target boxes.

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::data::detection::DetTarget;
use crate::error::{Error, Result};
use crate::model::detr::{DetrOutput, Proposals};
use crate::ops::boxes::{box_cxcywh_to_xyxy, iou_cxcywh, paired_generalized_box_iou};
use crate::ops::losses::{quality_focal_loss, sigmoid_focal_loss};
use crate::ops::matcher::{match_queries, Assignment, MatchCosts};

/// Loss weights and focal parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SetLossWeights {
    /// Weight of the focal classification loss.
    pub class: f64,
    /// Weight of the L1 box loss.
    pub bbox: f64,
    /// Weight of the GIoU loss.
    pub giou: f64,
    /// Focal α.
    pub alpha: f64,
    /// Focal γ.
    pub gamma: f64,
    /// Classification target of a matched query.
    pub class_target: ClassTarget,
    /// Two-stage models: how the dense head's tokens get their targets.
    pub proposal_assignment: ProposalAssignment,
    /// `hungarian` assignment: each target is matched to this many encoder proposals (one-to-many
    /// supervision of the dense head, as H-DETR's hybrid matching; 1 = DINO's one-to-one).
    pub proposal_repeats: usize,
    /// `centre` assignment: tokens within this many cells of a target's centre (and inside it)
    /// are its positives, FCOS's centre sampling.
    pub centre_radius: f64,
}

/// What a matched query's classification is trained toward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClassTarget {
    /// 1 for the target's class, by sigmoid focal loss (Deformable DETR).
    #[default]
    Onehot,
    /// The IoU of the query's box with its target, by quality focal loss (Stable-DINO's
    /// position-supervised loss): scores rank well-localised boxes above loose ones, which is
    /// what AP at high IoU thresholds rewards.
    Iou,
}

/// How a two-stage model's per-token proposals are assigned to targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProposalAssignment {
    /// Hungarian matching against the targets repeated `proposal_repeats` times: learned, so
    /// it starts from random matches.
    #[default]
    Hungarian,
    /// Geometric (FCOS centre sampling on the level whose anchor size suits the target): fixed
    /// from the first step, as dense detectors train.
    Centre,
}

impl Default for SetLossWeights {
    fn default() -> Self {
        SetLossWeights {
            class: 2.0,
            bbox: 5.0,
            giou: 2.0,
            alpha: 0.25,
            gamma: 2.0,
            class_target: ClassTarget::Onehot,
            proposal_assignment: ProposalAssignment::Hungarian,
            proposal_repeats: 4,
            centre_radius: 1.5,
        }
    }
}

/// The three terms of one decoder layer's loss (unweighted).
#[derive(Debug, Clone)]
pub struct SetLosses<B: Backend> {
    /// Focal classification loss.
    pub class: Tensor<B, 1>,
    /// L1 loss on matched boxes.
    pub bbox: Tensor<B, 1>,
    /// 1 − GIoU on matched boxes.
    pub giou: Tensor<B, 1>,
}

impl<B: Backend> SetLosses<B> {
    /// `class·w_class + bbox·w_bbox + giou·w_giou`.
    pub fn weighted(&self, w: &SetLossWeights) -> Tensor<B, 1> {
        self.class.clone().mul_scalar(w.class)
            + self.bbox.clone().mul_scalar(w.bbox)
            + self.giou.clone().mul_scalar(w.giou)
    }
}

/// Matches every image of a batch: `logits [B, Q, K]`, `boxes [B, Q, 4]` (normalised cxcywh).
pub fn match_batch<B: Backend>(
    logits: &Tensor<B, 3>,
    boxes: &Tensor<B, 3>,
    targets: &[DetTarget],
    costs: &MatchCosts,
) -> Result<Vec<Assignment>> {
    let [b, q, k] = logits.dims();
    if targets.len() != b {
        return Err(Error::config(
            "targets",
            format!("{} targets for a batch of {b}", targets.len()),
        ));
    }
    let host = |t: Tensor<B, 3>| -> Result<Vec<f32>> {
        t.into_data()
            .convert::<f32>()
            .to_vec()
            .map_err(|e| Error::config("predictions", format!("{e:?}")))
    };
    let (logits, boxes) = (host(logits.clone())?, host(boxes.clone())?);
    targets
        .iter()
        .enumerate()
        .map(|(i, t)| {
            match_queries(
                &logits[i * q * k..(i + 1) * q * k],
                &boxes[i * q * 4..(i + 1) * q * 4],
                k,
                &t.classes,
                &t.boxes,
                costs,
            )
        })
        .collect()
}

/// The set losses of one decoder layer given its matches; `num_boxes` is the normaliser (the
/// number of target boxes in the batch, at least 1).
pub fn set_losses<B: Backend>(
    logits: Tensor<B, 3>,
    boxes: Tensor<B, 3>,
    targets: &[DetTarget],
    matches: &[Assignment],
    num_boxes: f64,
    weights: &SetLossWeights,
) -> SetLosses<B> {
    let [b, q, k] = logits.dims();
    let device = logits.device();
    let predicted: Vec<f32> = match weights.class_target {
        ClassTarget::Onehot => Vec::new(),
        ClassTarget::Iou => boxes
            .clone()
            .into_data()
            .convert::<f32>()
            .to_vec()
            .unwrap_or_default(),
    };
    let (mut target, mut positive) = (vec![0f32; b * q * k], vec![0f32; b * q * k]);
    let (mut rows, mut target_boxes) = (Vec::new(), Vec::new());
    for (i, (t, m)) in targets.iter().zip(matches).enumerate() {
        for &(query, gt) in &m.pairs {
            let row = i * q + query;
            let cell = row * k + t.classes[gt];
            positive[cell] = 1.0;
            target[cell] = match predicted.get(row * 4..row * 4 + 4) {
                Some(p) => iou_cxcywh(
                    [p[0], p[1], p[2], p[3]].map(f64::from),
                    t.boxes[gt].map(f64::from),
                ) as f32,
                None => 1.0,
            };
            rows.push(row as i64);
            target_boxes.extend_from_slice(&t.boxes[gt]);
        }
    }
    let tensor = |v: Vec<f32>| Tensor::<B, 3>::from_data(TensorData::new(v, [b, q, k]), &device);
    let norm = num_boxes.max(1.0);
    let class = match weights.class_target {
        ClassTarget::Onehot => {
            sigmoid_focal_loss(logits, tensor(target), weights.alpha, weights.gamma).sum()
        }
        ClassTarget::Iou => quality_focal_loss(
            logits,
            tensor(target),
            tensor(positive),
            weights.alpha,
            weights.gamma,
        ),
    }
    .div_scalar(norm);
    let (bbox, giou) = matched_box_losses(boxes, rows, target_boxes, norm);
    SetLosses { class, bbox, giou }
}

/// Summed L1 and 1 − GIoU of rows `rows` (flat over batch × queries) of `boxes` `[B, Q, 4]`
/// against `target_boxes` (4 values per row), divided by `norm`.
pub fn matched_box_losses<B: Backend>(
    boxes: Tensor<B, 3>,
    rows: Vec<i64>,
    target_boxes: Vec<f32>,
    norm: f64,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    if rows.is_empty() {
        // Keep the boxes in the graph so every parameter still receives a (zero) gradient.
        let zero = boxes.sum().mul_scalar(0.0);
        return (zero.clone(), zero);
    }
    let device = boxes.device();
    let [b, q, _] = boxes.dims();
    let m = rows.len();
    let index = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [m]), &device);
    let src = boxes.reshape([b * q, 4]).select(0, index);
    let tgt = Tensor::<B, 2>::from_data(TensorData::new(target_boxes, [m, 4]), &device);
    let bbox = (src.clone() - tgt.clone()).abs().sum().div_scalar(norm);
    let giou = paired_generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt))
        .neg()
        .add_scalar(1.0)
        .sum()
        .div_scalar(norm);
    (bbox, giou)
}

/// The dense loss of a two-stage model's encoder proposals, normalised by the number of
/// positive tokens. With `hungarian` assignment every target is repeated `proposal_repeats`
/// times and matched to the tokens; with `centre` assignment, see [`centre_assignment`].
pub fn proposal_losses<B: Backend>(
    proposals: &Proposals<B>,
    targets: &[DetTarget],
    weights: &SetLossWeights,
    costs: &MatchCosts,
) -> Result<SetLosses<B>> {
    let prediction = &proposals.prediction;
    let matches = match weights.proposal_assignment {
        ProposalAssignment::Hungarian => {
            let r = weights.proposal_repeats.max(1);
            let repeated: Vec<DetTarget> = targets
                .iter()
                .map(|t| DetTarget {
                    classes: t.classes.repeat(r),
                    boxes: t.boxes.repeat(r),
                    ..t.clone()
                })
                .collect();
            let mut matches = match_batch(&prediction.logits, &prediction.boxes, &repeated, costs)?;
            for (m, t) in matches.iter_mut().zip(targets) {
                for pair in &mut m.pairs {
                    pair.1 %= t.boxes.len().max(1);
                }
            }
            matches
        }
        ProposalAssignment::Centre => {
            centre_assignment(&proposals.anchors, &proposals.padding, targets, weights)
        }
    };
    let num = matches.iter().map(|m| m.pairs.len()).sum::<usize>() as f64;
    Ok(set_losses(
        prediction.logits.clone(),
        prediction.boxes.clone(),
        targets,
        &matches,
        num,
        weights,
    ))
}

/// FCOS-style geometric assignment of tokens to targets. Each target belongs to the level whose
/// anchor side (two cells) is closest to its longer side in log scale; on that level, the
/// unpadded tokens whose centres lie inside the box and within `centre_radius` cells of its
/// centre are positives, and the token containing the centre always is. A token claimed by
/// several targets keeps the smallest. `anchors` are `B·T·4` (cell centre, two cells wide).
pub fn centre_assignment(
    anchors: &[f32],
    padding: &[bool],
    targets: &[DetTarget],
    weights: &SetLossWeights,
) -> Vec<Assignment> {
    let tokens = anchors.len() / 4 / targets.len().max(1);
    let r = weights.centre_radius as f32;
    targets
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let anchors = &anchors[i * tokens * 4..(i + 1) * tokens * 4];
            let padding = &padding[i * tokens..(i + 1) * tokens];
            let mut levels: Vec<f32> = anchors.chunks(4).map(|a| a[2]).collect();
            levels.sort_by(f32::total_cmp);
            levels.dedup();
            let mut owner: Vec<Option<(f32, usize)>> = vec![None; tokens];
            for (g, b) in t.boxes.iter().enumerate() {
                let side = b[2].max(b[3]).max(1e-6);
                let level = levels
                    .iter()
                    .copied()
                    .min_by(|x, y| (x / side).ln().abs().total_cmp(&(y / side).ln().abs()));
                let area = b[2] * b[3];
                for (k, a) in anchors.chunks(4).enumerate() {
                    if padding[k] || Some(a[2]) != level {
                        continue;
                    }
                    let (cw, ch) = (a[2] / 2.0, a[3] / 2.0);
                    let (dx, dy) = ((a[0] - b[0]).abs(), (a[1] - b[1]).abs());
                    let contains_centre = dx <= cw / 2.0 && dy <= ch / 2.0;
                    let near = dx <= (r * cw).min(b[2] / 2.0) && dy <= (r * ch).min(b[3] / 2.0);
                    if (contains_centre || near) && owner[k].is_none_or(|(o, _)| area < o) {
                        owner[k] = Some((area, g));
                    }
                }
            }
            Assignment {
                pairs: owner
                    .iter()
                    .enumerate()
                    .filter_map(|(k, o)| o.map(|(_, g)| (k, g)))
                    .collect(),
                total_cost: 0.0,
            }
        })
        .collect()
}

/// One main group's loss on one decoder layer, replacing the plain set loss: called with the
/// group index, the layer's logits and boxes for that group, the group's own matching and the
/// normaliser (OD-DETR's guided matching supervises group 0 this way).
pub type GroupLoss<'a, B> =
    dyn Fn(usize, Tensor<B, 3>, Tensor<B, 3>, &[Assignment], f64) -> SetLosses<B> + 'a;

/// DETR's loss on every decoder layer (auxiliary losses) and every query group, unweighted
/// terms summed: each group of each layer is matched to the targets on its own (one-to-one
/// within a group, one-to-many across groups, as Group-DETR), normalised by the number of
/// target boxes; two-stage proposals and the dense head add their own term.
pub fn detr_loss<B: Backend>(
    output: &DetrOutput<B>,
    targets: &[DetTarget],
    weights: &SetLossWeights,
    costs: &MatchCosts,
) -> Result<SetLosses<B>> {
    detr_loss_with(output, targets, weights, costs, None)
}

/// [`detr_loss`] with `group_loss` in place of the set loss of the main groups.
pub fn detr_loss_with<B: Backend>(
    output: &DetrOutput<B>,
    targets: &[DetTarget],
    weights: &SetLossWeights,
    costs: &MatchCosts,
    group_loss: Option<&GroupLoss<'_, B>>,
) -> Result<SetLosses<B>> {
    let num_boxes = targets.iter().map(|t| t.boxes.len()).sum::<usize>() as f64;
    let mut sum: Option<SetLosses<B>> = None;
    let mut add = |l: SetLosses<B>| {
        sum = Some(match sum.take() {
            None => l,
            Some(s) => SetLosses {
                class: s.class + l.class,
                bbox: s.bbox + l.bbox,
                giou: s.giou + l.giou,
            },
        });
    };
    for layer in &output.layers {
        let mut start = 0;
        for (group, &size) in output.group_sizes.iter().enumerate() {
            let logits = layer.logits.clone().narrow(1, start, size);
            let boxes = layer.boxes.clone().narrow(1, start, size);
            start += size;
            let matches = match_batch(&logits, &boxes, targets, costs)?;
            add(match group_loss {
                Some(f) => f(group, logits, boxes, &matches, num_boxes),
                None => set_losses(logits, boxes, targets, &matches, num_boxes, weights),
            });
        }
    }
    if let Some(p) = &output.proposals {
        add(proposal_losses(p, targets, weights, costs)?);
    }
    sum.ok_or_else(|| Error::config("detr_loss", "the output has no decoder layers"))
}
