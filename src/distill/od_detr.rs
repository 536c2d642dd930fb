//! OD-DETR (online distillation for DETR, IJCAI-24): an EMA copy of the student is the
//! teacher, run without gradients on the same batch. Three switchable mechanisms
//! (`../shared/docs/methods/od-detr.md` §3):
//! (a) teacher-guided matching: each main query is also supervised with the target its
//!     teacher counterpart was matched to, classification by a multi-target quality focal loss
//!     with IoU targets;
//! (b) prediction distillation: the teacher's initial queries run as an extra group through the
//!     student decoder and are pulled toward the teacher's layer-aligned outputs;
//! (c) an auxiliary group: per target, the teacher's two stage-queries with the least matching
//!     cost, with a fixed one-to-two assignment.
//! Extra groups are masked from each other; nothing changes at inference.

use std::marker::PhantomData;

use burn::module::{AutodiffModule, Module};
use burn::tensor::activation::{log_sigmoid, sigmoid};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::data::detection::{DetBatch, DetTarget};
use crate::distill::ema::{Ema, EmaConfig};
use crate::distill::Distiller;
use crate::error::{Error, Result};
use crate::model::detr::loss::{
    match_batch, matched_box_losses, set_losses, SetLossWeights, SetLosses,
};
use crate::model::detr::task::DetrTask;
use crate::model::detr::{Detr, DetrRecord, InitialQueries, LayerPrediction, Proposals};
use crate::ops::boxes::{box_cxcywh_to_xyxy, iou_cxcywh, paired_generalized_box_iou};
use crate::ops::losses::quality_focal_loss;
use crate::ops::matcher::{match_cost_matrix, Assignment, MatchCosts};
use crate::task::{InnerModel, Losses, Task};

/// The label of the EMA teacher in logs, reports and `model-ema.safetensors`.
pub const EMA_LABEL: &str = "ema";

/// OD-DETR settings; the EMA alone (all three mechanisms off) is the "EMA only" baseline.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OdDetrConfig {
    /// The teacher's moving average.
    pub ema: EmaConfig,
    /// (a) Teacher-guided matching.
    pub guided_matching: bool,
    /// (a) Use the teacher's target only for queries the student's own matching left
    /// unmatched (ablation switch; the method uses both).
    pub teacher_target_only_unmatched: bool,
    /// (b) Prediction distillation through the teacher's initial queries.
    pub pd: bool,
    /// (c) The auxiliary one-to-many group from the teacher's stage queries.
    pub aux: bool,
    /// Weight λ_pd of (b).
    pub pd_weight: f64,
    /// Weight of (b)'s classification term relative to its box terms.
    pub pd_class_weight: f64,
    /// Weight λ_aux of (c).
    pub aux_weight: f64,
    /// Queries per target in (c).
    pub aux_per_target: usize,
    /// Steps over which λ_pd and λ_aux ramp linearly from 0 (0 = no ramp): the early teacher
    /// is nearly random.
    pub ramp_steps: usize,
    /// The optimiser step from which (a), (b) and (c) are off, if any: the student finishes on
    /// its own loss while the EMA keeps following it.
    pub distill_stop_step: Option<usize>,
}

impl Default for OdDetrConfig {
    fn default() -> Self {
        OdDetrConfig {
            ema: EmaConfig::default(),
            guided_matching: true,
            teacher_target_only_unmatched: false,
            pd: true,
            aux: true,
            pd_weight: 1.0,
            pd_class_weight: 1.0,
            aux_weight: 1.0,
            aux_per_target: 2,
            ramp_steps: 0,
            distill_stop_step: None,
        }
    }
}

impl OdDetrConfig {
    /// Checks the ranges, naming the key.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.ema.decay) {
            return Err(Error::config(
                "distill.ema.decay",
                format!("must be in [0, 1), got {}", self.ema.decay),
            ));
        }
        for (key, v) in [
            ("distill.pd_weight", self.pd_weight),
            ("distill.pd_class_weight", self.pd_class_weight),
            ("distill.aux_weight", self.aux_weight),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::config(key, format!("must be ≥ 0, got {v}")));
            }
        }
        Ok(())
    }
}

/// The OD-DETR distiller: the EMA teacher and the settings.
pub struct OdDetr<B: AutodiffBackend> {
    config: OdDetrConfig,
    ema: Ema<Detr<B::InnerBackend>>,
}

impl<B: AutodiffBackend> OdDetr<B> {
    /// Starts the teacher as a copy of `student`.
    pub fn new(student: &Detr<B>, config: OdDetrConfig) -> Self {
        OdDetr {
            config,
            ema: Ema::new(student.valid(), config.ema),
        }
    }

    fn ramp(&self) -> f64 {
        match self.config.ramp_steps {
            0 => 1.0,
            n => ((self.ema.updates + 1) as f64 / n as f64).min(1.0),
        }
    }
}

/// Host copy of a tensor.
fn host<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Vec<f32> {
    t.clone()
        .into_data()
        .convert::<f32>()
        .to_vec()
        .unwrap_or_default()
}

/// A tensor of the inner backend lifted into the autodiff graph as a constant.
fn constant<B: AutodiffBackend, const D: usize>(t: Tensor<B::InnerBackend, D>) -> Tensor<B, D> {
    Tensor::from_inner(t)
}

/// Rows `index` (flat over batch × rows) of `[B, R, C]`, as `[B, index.len() / B, C]`.
fn gather_rows<B: Backend>(t: Tensor<B, 3>, rows: Vec<i64>) -> Tensor<B, 3> {
    let [b, r, c] = t.dims();
    let n = rows.len();
    let index = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [n]), &t.device());
    t.reshape([b * r, c])
        .select(0, index)
        .reshape([b, n / b, c])
}

/// (a)'s loss of one layer's main-group predictions: every query is supervised by its own
/// match and by its teacher counterpart's (`teacher[i][q]`, a target index), with IoU quality
/// targets for classification and L1 + GIoU to each target.
#[allow(clippy::too_many_arguments)]
fn guided_losses<B: Backend>(
    logits: Tensor<B, 3>,
    boxes: Tensor<B, 3>,
    targets: &[DetTarget],
    own: &[Assignment],
    teacher: &[Vec<Option<usize>>],
    only_unmatched: bool,
    norm: f64,
    w: &SetLossWeights,
) -> SetLosses<B> {
    let [b, q, k] = logits.dims();
    let device = logits.device();
    let pred = host(&boxes);
    let (mut quality, mut pos) = (vec![0f32; b * q * k], vec![0f32; b * q * k]);
    let (mut rows, mut target_boxes) = (Vec::new(), Vec::new());
    for (i, t) in targets.iter().enumerate() {
        let mut sets: Vec<Vec<usize>> = vec![Vec::new(); q];
        for &(query, target) in &own[i].pairs {
            sets[query].push(target);
        }
        for (query, set) in sets.iter_mut().enumerate() {
            if let Some(target) = teacher[i][query] {
                if !set.contains(&target) && (!only_unmatched || set.is_empty()) {
                    set.push(target);
                }
            }
        }
        for (query, set) in sets.iter().enumerate() {
            let row = i * q + query;
            let pb = [0, 1, 2, 3].map(|c| pred[row * 4 + c] as f64);
            for &target in set {
                let cell = row * k + t.classes[target];
                let iou = iou_cxcywh(pb, t.boxes[target].map(|v| v as f64)) as f32;
                quality[cell] = quality[cell].max(iou);
                pos[cell] = 1.0;
                rows.push(row as i64);
                target_boxes.extend_from_slice(&t.boxes[target]);
            }
        }
    }
    let tensor = |v: Vec<f32>| Tensor::<B, 3>::from_data(TensorData::new(v, [b, q, k]), &device);
    let class =
        quality_focal_loss(logits, tensor(quality), tensor(pos), w.alpha, w.gamma).div_scalar(norm);
    let (bbox, giou) = matched_box_losses(boxes, rows, target_boxes, norm);
    SetLosses { class, bbox, giou }
}

/// (b)'s loss of one layer: the student's predictions for the teacher's queries against the
/// teacher's same-layer predictions, weighted per query by the teacher's final confidence.
fn pd_loss<B: AutodiffBackend>(
    student: &LayerPrediction<B>,
    teacher: &LayerPrediction<B::InnerBackend>,
    weight: Tensor<B, 2>,
    class_weight: f64,
    w: &SetLossWeights,
) -> Tensor<B, 1> {
    let [b, q, _] = student.logits.dims();
    let t_prob = sigmoid(constant::<B, 3>(teacher.logits.clone()));
    let x = student.logits.clone();
    let bce = (t_prob.clone() * log_sigmoid(x.clone())
        + t_prob.neg().add_scalar(1.0) * log_sigmoid(x.neg()))
    .neg()
    .sum_dim(2)
    .reshape([b, q]);
    let t_boxes = constant::<B, 3>(teacher.boxes.clone());
    let l1 = (student.boxes.clone() - t_boxes.clone())
        .abs()
        .sum_dim(2)
        .reshape([b, q]);
    let giou = paired_generalized_box_iou(
        box_cxcywh_to_xyxy(student.boxes.clone().reshape([b * q, 4])),
        box_cxcywh_to_xyxy(t_boxes.reshape([b * q, 4])),
    )
    .neg()
    .add_scalar(1.0)
    .reshape([b, q]);
    let per_query = bce.mul_scalar(class_weight) + l1.mul_scalar(w.bbox) + giou.mul_scalar(w.giou);
    let total = weight.clone().sum().add_scalar(1e-6);
    (per_query * weight).sum() / total
}

/// For each student query of group 0, the teacher query on the same encoder token (two-stage)
/// or in the same slot (learned queries), if any.
fn correspondence<B: Backend, C: Backend>(
    student: Option<&Proposals<B>>,
    teacher: Option<&Proposals<C>>,
    batch: usize,
    queries: usize,
) -> Vec<Vec<Option<usize>>> {
    let student = student.and_then(|p| p.selected.as_ref());
    let teacher = teacher.and_then(|p| p.selected.as_ref());
    match (student, teacher) {
        (Some(s), Some(t)) => (0..batch)
            .map(|i| {
                let t_rows = &t[i * queries..(i + 1) * queries];
                s[i * queries..(i + 1) * queries]
                    .iter()
                    .map(|tok| t_rows.iter().position(|x| x == tok))
                    .collect()
            })
            .collect(),
        _ => (0..batch)
            .map(|_| (0..queries).map(Some).collect())
            .collect(),
    }
}

/// (c)'s group: for every target, the `per_target` teacher stage-outputs (each stage's output
/// is the next stage's input query) with the least matching cost. Returns the queries (padded
/// to the batch's largest count with the pool's least confident entry, which gets no target)
/// and the `(slot, target)` pairs per image; `None` when the batch has no targets.
fn aux_group<B: AutodiffBackend>(
    teacher: &[LayerPrediction<B::InnerBackend>],
    targets: &[DetTarget],
    per_target: usize,
    costs: &MatchCosts,
) -> Result<Option<(InitialQueries<B>, Vec<Assignment>)>> {
    let largest = targets.iter().map(|t| t.boxes.len()).max().unwrap_or(0);
    if largest == 0 || per_target == 0 || teacher.is_empty() {
        return Ok(None);
    }
    let [b, q, k] = teacher[0].logits.dims();
    let slots = largest * per_target;
    let pool = teacher.len() * q;
    let logits: Vec<Vec<f32>> = teacher.iter().map(|l| host(&l.logits)).collect();
    let boxes: Vec<Vec<f32>> = teacher.iter().map(|l| host(&l.boxes)).collect();
    let (mut rows, mut assignments) = (Vec::with_capacity(b * slots), Vec::with_capacity(b));
    for (i, t) in targets.iter().enumerate() {
        // The pool of image i, stage-major: entry l·Q + j is query j after stage l.
        let mut pool_logits = Vec::with_capacity(pool * k);
        let mut pool_boxes = Vec::with_capacity(pool * 4);
        for (lg, bx) in logits.iter().zip(&boxes) {
            pool_logits.extend_from_slice(&lg[i * q * k..(i + 1) * q * k]);
            pool_boxes.extend_from_slice(&bx[i * q * 4..(i + 1) * q * 4]);
        }
        let m = t.boxes.len();
        let cost = match_cost_matrix(&pool_logits, &pool_boxes, k, &t.classes, &t.boxes, costs)?;
        let mut pairs = Vec::with_capacity(m * per_target);
        let mut chosen = Vec::with_capacity(slots);
        for target in 0..m {
            let mut order: Vec<usize> = (0..pool).collect();
            order.sort_by(|&a, &c| cost[a * m + target].total_cmp(&cost[c * m + target]));
            for &entry in order.iter().take(per_target) {
                pairs.push((chosen.len(), target));
                chosen.push(entry);
            }
        }
        let filler = (0..pool)
            .min_by(|&a, &c| {
                let best = |e: usize| {
                    pool_logits[e * k..(e + 1) * k]
                        .iter()
                        .fold(f32::MIN, |x, &y| x.max(y))
                };
                best(a).total_cmp(&best(c))
            })
            .unwrap_or(0);
        chosen.resize(slots, filler);
        rows.extend(chosen.iter().map(|&e| (i * pool + e) as i64));
        assignments.push(Assignment {
            pairs,
            total_cost: 0.0,
        });
    }
    let stack = |f: fn(&LayerPrediction<B::InnerBackend>) -> Tensor<B::InnerBackend, 3>| {
        Tensor::cat(teacher.iter().map(f).collect(), 1)
    };
    let content = gather_rows(stack(|l| l.state.clone()), rows.clone());
    let reference = gather_rows(stack(|l| l.boxes.clone()), rows);
    Ok(Some((
        InitialQueries {
            content: constant::<B, 3>(content),
            reference: constant::<B, 3>(reference),
        },
        assignments,
    )))
}

impl<B: AutodiffBackend> OdDetr<B> {
    /// Which target the teacher counterpart of each of the student's group-0 queries was matched
    /// to, per image (mechanism (a)).
    fn teacher_targets(
        &self,
        student: Option<&Proposals<B>>,
        teacher: &crate::model::detr::DetrOutput<B::InnerBackend>,
        targets: &[DetTarget],
        costs: &MatchCosts,
        queries: usize,
    ) -> Result<Vec<Vec<Option<usize>>>> {
        let last = teacher.last();
        let t_match = match_batch(&last.logits, &last.boxes, targets, costs)?;
        let corr = correspondence(student, teacher.proposals.as_ref(), targets.len(), queries);
        Ok(corr
            .iter()
            .zip(&t_match)
            .map(|(corr, m)| {
                let mut of_teacher = vec![None; queries];
                for &(query, target) in &m.pairs {
                    of_teacher[query] = Some(target);
                }
                corr.iter().map(|t| t.and_then(|t| of_teacher[t])).collect()
            })
            .collect())
    }
}

impl<B: AutodiffBackend> Distiller<B, DetrTask> for OdDetr<B> {
    type Trainable = PhantomData<B>;
    type State = (DetrRecord<B::InnerBackend>, usize);

    fn init_trainable(&self, _device: &B::Device) -> Result<PhantomData<B>> {
        Ok(PhantomData)
    }

    fn loss(
        &self,
        task: &DetrTask,
        student: &Detr<B>,
        _trainable: &PhantomData<B>,
        batch: &DetBatch,
    ) -> Result<Losses<B>> {
        let c = self.config;
        let stopped = c.distill_stop_step.is_some_and(|s| self.ema.updates >= s);
        if stopped || !(c.guided_matching || c.pd || c.aux) {
            return task.loss(&task.forward(student, batch)?, batch);
        }
        let section = task.section();
        let (w, costs) = (&section.loss, &section.matcher);
        let targets = &batch.targets;
        let norm = (targets.iter().map(|t| t.boxes.len()).sum::<usize>() as f64).max(1.0);
        let device = student.query_content.device();
        let q = student.num_queries;

        let teacher = self.ema.model.forward(
            batch.images_tensor::<B::InnerBackend>(&device),
            &batch.padding,
            1,
        );
        let t_last = teacher.last();

        // The student decodes the teacher's initial queries (b) and its stage queries (c) as
        // extra groups after its own.
        let mut extra = Vec::new();
        if c.pd {
            extra.push(InitialQueries {
                content: constant::<B, 3>(teacher.queries.content.clone()),
                reference: constant::<B, 3>(teacher.queries.reference.clone()),
            });
        }
        let aux = if c.aux {
            aux_group::<B>(&teacher.layers, targets, c.aux_per_target, costs)?
        } else {
            None
        };
        if let Some((queries, _)) = &aux {
            extra.push(queries.clone());
        }
        let forward = task.forward_with(student, batch, extra);

        // (a): group 0 is supervised by its own matching and its teacher counterparts'.
        let teacher_targets = match c.guided_matching {
            true => Some(self.teacher_targets(
                forward.output.proposals.as_ref(),
                &teacher,
                targets,
                costs,
                q,
            )?),
            false => None,
        };
        let guided = teacher_targets.as_ref().map(|teacher_targets| {
            move |group: usize, logits, boxes, own: &[Assignment], n: f64| match group {
                0 => guided_losses(
                    logits,
                    boxes,
                    targets,
                    own,
                    teacher_targets,
                    c.teacher_target_only_unmatched,
                    n.max(1.0),
                    w,
                ),
                _ => set_losses(logits, boxes, targets, own, n, w),
            }
        });
        let group_loss = guided
            .as_ref()
            .map(|f| f as &crate::model::detr::loss::GroupLoss<'_, B>);
        let mut losses = task.main_losses(&forward, targets, group_loss)?;

        let ramp = self.ramp();
        let mut extra_layers = forward.extra.iter();
        if c.pd {
            let b = targets.len();
            let confidence = constant::<B, 2>(
                sigmoid(t_last.logits.clone())
                    .max_dim(2)
                    .reshape([b, q])
                    .detach(),
            );
            let pd = extra_layers
                .next()
                .into_iter()
                .flatten()
                .zip(&teacher.layers)
                .map(|(s, t)| pd_loss(s, t, confidence.clone(), c.pd_class_weight, w))
                .reduce(|x, y| x + y)
                .unwrap_or_else(|| losses.total.zeros_like());
            losses.add("loss_pd", pd, c.pd_weight * ramp);
        }
        if let Some((_, pairs)) = &aux {
            let aux_loss = extra_layers
                .next()
                .into_iter()
                .flatten()
                .map(|l| {
                    let (logits, boxes) = (l.logits.clone(), l.boxes.clone());
                    set_losses(logits, boxes, targets, pairs, norm, w).weighted(w)
                })
                .reduce(|x, y| x + y)
                .unwrap_or_else(|| losses.total.zeros_like());
            losses.add("loss_aux", aux_loss, c.aux_weight * ramp);
        }
        task.add_denoising(&mut losses, &forward, targets);
        Ok(losses)
    }

    fn after_step(&mut self, student: &Detr<B>, _step: usize) {
        self.ema.update(&student.valid());
    }

    fn extra_models(&self) -> Vec<(String, InnerModel<B, DetrTask>)> {
        vec![(EMA_LABEL.to_string(), self.ema.model.clone())]
    }

    fn state(&self) -> Self::State {
        (self.ema.model.clone().into_record(), self.ema.updates)
    }

    fn load_state(&mut self, (record, updates): Self::State) {
        self.ema.model = self.ema.model.clone().load_record(record);
        self.ema.updates = updates;
    }
}
