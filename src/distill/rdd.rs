//! Relative difficulty distillation (RDD, Liang et al., 2024) re-weights the student's own
//! pixel loss by how hard each pixel is, judged first by the teacher alone, then by teacher and
//! student together (`../shared/docs/methods/rdd.md` §3–4, following the official code):
//! - **TFE** (the first `tfe_fraction` of the steps): every pixel's cross-entropy is weighted by
//!   `exp(−KL(q_aux ‖ p_main))` of the teacher's auxiliary and main heads, the same map for the
//!   student's main and auxiliary heads, averaged over all pixels (ignored ones count as 0).
//! - **TSE** (the rest): per network, the pixels whose ground-truth-class probability is at most
//!   τ are hard (τ = `threshold`, raised so that at least `min_kept` pixels are); the student's
//!   cross-entropy is averaged (class-weighted) over the pixels where the two hard masks differ,
//!   separately for the main heads and for the auxiliary heads.
//!
//! RDD only replaces the task loss; KD terms are added beside it by the distiller.

use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::layers::resize::{resize, Sampling};
use crate::ops::pixel::{hard_pixels, pixel_cross_entropy, weighted_mean, PixelLabels};

/// Which of RDD's stages run (the ablations "TFE only" and "TSE only" run one throughout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RddStages {
    /// TFE for the first `tfe_fraction` of the steps, then TSE (the method).
    Both,
    /// TFE throughout.
    Tfe,
    /// TSE throughout.
    Tse,
}

/// The direction of TFE's divergence between the teacher's heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TfeDivergence {
    /// `KL(q_aux ‖ p_main)`, as the official code computes it.
    AuxMain,
    /// `KL(p_main ‖ q_aux)`, as the paper writes it.
    MainAux,
}

/// How TSE combines the student's and the teacher's hard-pixel masks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TseMask {
    /// Hard for exactly one of them (the method).
    Xor,
    /// Hard for both.
    And,
    /// Hard for either.
    Or,
    /// Hard for the student (plain OHEM).
    Ohem,
    /// Hard for the student and easy for the teacher (the paper's wording of XOR).
    TeacherMastered,
}

impl TseMask {
    fn keep(self, student_hard: bool, teacher_hard: bool) -> bool {
        match self {
            TseMask::Xor => student_hard != teacher_hard,
            TseMask::And => student_hard && teacher_hard,
            TseMask::Or => student_hard || teacher_hard,
            TseMask::Ohem => student_hard,
            TseMask::TeacherMastered => student_hard && !teacher_hard,
        }
    }
}

/// `min_kept` of the official scripts (100,000 pixels of 4 crops of 512×1024 per GPU) as a
/// fraction of a batch's pixels, so that other batch and crop sizes keep the same share.
pub const MIN_KEPT_FRACTION: f64 = 100_000.0 / (4.0 * 512.0 * 1024.0);

/// `[distill.rdd]`: the defaults are the official code's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RddConfig {
    /// Which stages run.
    pub stages: RddStages,
    /// Share of the steps spent in TFE when both stages run (paper: 10 %).
    pub tfe_fraction: f64,
    /// TFE's divergence direction.
    pub tfe_divergence: TfeDivergence,
    /// TSE's confidence threshold t (0.7).
    pub threshold: f64,
    /// TSE keeps at least this fraction of a batch's pixels hard per network.
    pub min_kept_fraction: f64,
    /// TSE's mask combination.
    pub mask: TseMask,
}

impl Default for RddConfig {
    fn default() -> Self {
        RddConfig {
            stages: RddStages::Both,
            tfe_fraction: 0.1,
            tfe_divergence: TfeDivergence::AuxMain,
            threshold: 0.7,
            min_kept_fraction: MIN_KEPT_FRACTION,
            mask: TseMask::Xor,
        }
    }
}

/// The stage a step trains in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RddStage {
    /// Teacher-full evaluated.
    Tfe,
    /// Teacher-student evaluated.
    Tse,
}

impl RddConfig {
    /// Checks the settings, naming `distill.rdd.<key>`.
    pub fn validate(&self) -> Result<()> {
        for (key, v) in [
            ("distill.rdd.tfe_fraction", self.tfe_fraction),
            ("distill.rdd.threshold", self.threshold),
            ("distill.rdd.min_kept_fraction", self.min_kept_fraction),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(Error::config(key, format!("must be in [0, 1], got {v}")));
            }
        }
        Ok(())
    }

    /// The stage of step `step` (0-based) of `total`.
    pub fn stage(&self, step: usize, total: usize) -> RddStage {
        match self.stages {
            RddStages::Tfe => RddStage::Tfe,
            RddStages::Tse => RddStage::Tse,
            RddStages::Both if (step as f64) < self.tfe_fraction * total as f64 => RddStage::Tfe,
            RddStages::Both => RddStage::Tse,
        }
    }

    /// `min_kept` for a batch of `pixels` pixels.
    pub fn min_kept(&self, pixels: usize) -> usize {
        (self.min_kept_fraction * pixels as f64).round() as usize
    }
}

/// TFE's per-pixel weight `exp(−D)` `[N, H, W]` from the teacher's main and auxiliary logits
/// `[N, K, h, w]`, upsampled bilinearly (corners aligned, as the official code) to `[H, W]`.
pub fn tfe_weights<B: Backend>(
    main: Tensor<B, 4>,
    aux: Tensor<B, 4>,
    divergence: TfeDivergence,
    [h, w]: [usize; 2],
) -> Tensor<B, 3> {
    let (from, to) = match divergence {
        TfeDivergence::AuxMain => (aux, main),
        TfeDivergence::MainAux => (main, aux),
    };
    let log_from = log_softmax(from.clone(), 1);
    let kl = (softmax(from, 1) * (log_from - log_softmax(to, 1))).sum_dim(1);
    let rd = kl.neg().exp();
    let [_, _, lh, lw] = rd.dims();
    let rd = if (lh, lw) == (h, w) {
        rd
    } else {
        interpolate(
            rd,
            [h, w],
            InterpolateOptions::new(InterpolateMode::Bilinear).with_align_corners(true),
        )
    };
    rd.squeeze_dim::<3>(1)
}

/// TFE's loss of one student head: `Σ rd·CE / (N·H·W)` over labelled pixels.
pub fn tfe_head_loss<B: Backend>(
    logits: Tensor<B, 4>,
    labels: &PixelLabels<B>,
    rd: Tensor<B, 3>,
) -> Tensor<B, 1> {
    let [_, h, w] = labels.shape;
    let ce = pixel_cross_entropy(resize(logits, [h, w], Sampling::Bilinear), labels);
    let valid = labels.tensor(labels.valid(), &rd.device());
    (ce * rd * valid).mean()
}

/// TSE's pixel mask from each network's ground-truth-class probabilities (row-major over the
/// batch): both hard sets, combined by `mask`.
pub fn tse_mask(
    student_prob: &[f32],
    teacher_prob: &[f32],
    valid: &[f32],
    config: &RddConfig,
) -> Vec<bool> {
    let (t, kept) = (config.threshold as f32, config.min_kept(valid.len()));
    let student = hard_pixels(student_prob, valid, t, kept);
    let teacher = hard_pixels(teacher_prob, valid, t, kept);
    student
        .into_iter()
        .zip(teacher)
        .zip(valid)
        .map(|((s, t), &v)| v > 0.0 && config.mask.keep(s, t))
        .collect()
}

/// TSE's loss of one student head against the teacher's matching head, both `[N, K, h, w]`:
/// the student's cross-entropy, class-weighted, averaged over the TSE mask. Returns the loss
/// and the share of labelled pixels in the mask.
pub fn tse_head_loss<B: Backend>(
    student: Tensor<B, 4>,
    teacher: Tensor<B, 4>,
    labels: &PixelLabels<B>,
    class_weights: Option<&[f64]>,
    config: &RddConfig,
) -> (Tensor<B, 1>, f64) {
    let [_, h, w] = labels.shape;
    let ce = pixel_cross_entropy(resize(student, [h, w], Sampling::Bilinear), labels);
    let teacher_ce = pixel_cross_entropy(resize(teacher, [h, w], Sampling::Bilinear), labels);
    let prob = |ce: Tensor<B, 3>| -> Vec<f32> {
        ce.detach()
            .neg()
            .exp()
            .into_data()
            .to_vec::<f32>()
            .unwrap_or_default()
    };
    let valid = labels.valid();
    let mask = tse_mask(&prob(ce.clone()), &prob(teacher_ce), &valid, config);
    let kept = mask.iter().filter(|&&m| m).count();
    let labelled = valid.iter().filter(|&&v| v > 0.0).count().max(1);
    let weights: Vec<f32> = labels
        .class_weights(class_weights)
        .into_iter()
        .zip(&mask)
        .map(|(w, &m)| if m { w } else { 0.0 })
        .collect();
    let device = ce.device();
    (
        weighted_mean(ce, labels.tensor(weights, &device)),
        kept as f64 / labelled as f64,
    )
}
