//! Denoising query groups (DN-DETR): noised copies of the ground-truth boxes enter the decoder
//! as extra queries, each assigned to the box it was made from. They teach the decoder to
//! refine a box it already roughly knows, without waiting for the Hungarian matching to settle,
//! which is what makes DN-DETR and DINO converge several times faster. Training only: the groups
//! are masked from the matching queries and inference never builds them.

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::detection::DetTarget;
use crate::model::detr::loss::{set_losses, SetLossWeights};
use crate::model::detr::{Detr, InitialQueries, LayerPrediction};
use crate::ops::matcher::Assignment;

/// Denoising settings (DN-DETR's defaults, without DINO's negative queries).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DenoisingConfig {
    /// Noised copies of each image's boxes, each its own masked query group (0 = off).
    pub groups: usize,
    /// Box noise λ: centres move by up to λ/2 of the box size, sizes scale by up to 1 ± λ.
    pub box_noise: f64,
    /// Probability that a copy's label is replaced by a uniformly drawn class.
    pub label_noise: f64,
    /// Weight of the denoising loss relative to the matching queries' loss.
    pub weight: f64,
}

impl Default for DenoisingConfig {
    fn default() -> Self {
        DenoisingConfig {
            groups: 0,
            box_noise: 0.4,
            label_noise: 0.2,
            weight: 1.0,
        }
    }
}

impl DenoisingConfig {
    /// Checks the ranges, naming the offending key.
    pub fn validate(&self) -> crate::Result<()> {
        let bad = |key: &str, v: f64| {
            crate::Error::config(
                format!("model.denoising.{key}"),
                format!("must be in [0, 1], got {v}"),
            )
        };
        if !(0.0..=1.0).contains(&self.box_noise) {
            return Err(bad("box_noise", self.box_noise));
        }
        if !(0.0..=1.0).contains(&self.label_noise) {
            return Err(bad("label_noise", self.label_noise));
        }
        if !(self.weight.is_finite() && self.weight >= 0.0) {
            return Err(crate::Error::config(
                "model.denoising.weight",
                format!("must be ≥ 0, got {}", self.weight),
            ));
        }
        Ok(())
    }
}

/// The denoising queries of one batch: `copies` groups of `slots` queries each (the batch's
/// largest box count); slot `j` of every copy is image box `j`. Slots past an image's own boxes
/// hold a "no object" label and get no target, so they train as negatives.
#[derive(Debug, Clone)]
pub struct DenoisingGroups<B: Backend> {
    /// Label embeddings and noised boxes `[B, copies·slots, ·]`.
    pub queries: InitialQueries<B>,
    /// Queries per group.
    pub slots: usize,
    /// Number of groups.
    pub copies: usize,
    /// `(query, target)` pairs per image over all copies.
    pub pairs: Vec<Assignment>,
}

impl<B: Backend> DenoisingGroups<B> {
    /// The group sizes to append to the decoder's `group_sizes`.
    pub fn group_sizes(&self) -> Vec<usize> {
        vec![self.slots; self.copies]
    }

    /// Focal + L1 + GIoU of every layer's denoising queries against the boxes they were made
    /// from, weighted as the matching loss and normalised by the number of noised boxes.
    pub fn loss(
        &self,
        layers: &[LayerPrediction<B>],
        targets: &[DetTarget],
        weights: &SetLossWeights,
    ) -> Option<Tensor<B, 1>> {
        let boxes = targets.iter().map(|t| t.boxes.len()).sum::<usize>() * self.copies;
        layers
            .iter()
            .map(|l| {
                set_losses(
                    l.logits.clone(),
                    l.boxes.clone(),
                    targets,
                    &self.pairs,
                    boxes as f64,
                    weights,
                )
                .weighted(weights)
            })
            .reduce(|a, b| a + b)
    }
}

/// Builds the batch's denoising queries, or `None` when denoising is off or there are no boxes.
/// The noise is drawn on the host from `seed` (the batch's), so that data-parallel shards draw
/// independently of thread timing and resumed runs draw the same noise.
pub fn denoising_groups<B: Backend>(
    model: &Detr<B>,
    targets: &[DetTarget],
    seed: u64,
) -> Option<DenoisingGroups<B>> {
    let cfg = model.denoising;
    let embed = model.label_embed.as_ref()?;
    let slots = targets.iter().map(|t| t.boxes.len()).max().unwrap_or(0);
    if cfg.groups == 0 || slots == 0 {
        return None;
    }
    let device = embed.val().device();
    let (b, copies) = (targets.len(), cfg.groups);
    let n = b * copies * slots;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut draw = |cols: usize, lo: f32| -> Vec<f32> {
        (0..n * cols).map(|_| rng.random_range(lo..1.0)).collect()
    };
    let (shift, flip) = (draw(4, -1.0), draw(2, 0.0));
    let no_object = model.num_classes();
    let lambda = cfg.box_noise as f32;
    let (mut labels, mut boxes) = (Vec::with_capacity(n), Vec::with_capacity(n * 4));
    let mut pairs = vec![Vec::new(); b];
    for (i, t) in targets.iter().enumerate() {
        for c in 0..copies {
            for j in 0..slots {
                let row = (i * copies + c) * slots + j;
                let Some(&[cx, cy, w, h]) = t.boxes.get(j) else {
                    labels.push(no_object as i64);
                    boxes.extend_from_slice(&[0.5, 0.5, 0.2, 0.2]);
                    continue;
                };
                pairs[i].push((c * slots + j, j));
                let [u0, u1, u2, u3] = [0, 1, 2, 3].map(|k| shift[row * 4 + k]);
                boxes.extend_from_slice(&[
                    (cx + u0 * lambda * w / 2.0).clamp(0.0, 1.0),
                    (cy + u1 * lambda * h / 2.0).clamp(0.0, 1.0),
                    (w * (1.0 + u2 * lambda)).clamp(1e-3, 1.0),
                    (h * (1.0 + u3 * lambda)).clamp(1e-3, 1.0),
                ]);
                let label = if f64::from(flip[row * 2]) < cfg.label_noise {
                    ((flip[row * 2 + 1] * no_object as f32) as usize).min(no_object - 1)
                } else {
                    t.classes[j]
                };
                labels.push(label as i64);
            }
        }
    }
    let index = Tensor::<B, 1, Int>::from_data(TensorData::new(labels, [n]), &device);
    let content = embed
        .val()
        .select(0, index)
        .reshape([b, copies * slots, model.d_model]);
    let reference = Tensor::from_data(TensorData::new(boxes, [b, copies * slots, 4]), &device);
    Some(DenoisingGroups {
        queries: InitialQueries { content, reference },
        slots,
        copies,
        pairs: pairs
            .into_iter()
            .map(|pairs| Assignment {
                pairs,
                total_cost: 0.0,
            })
            .collect(),
    })
}
