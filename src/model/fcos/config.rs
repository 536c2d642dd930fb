//! FCOS's config section (`[fcos]`): the architecture (also recorded in exported weights), the
//! target assignment and loss, and the decoding of detections.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::backbone::BackboneConfig;

/// FCOS architecture settings (`[fcos.model]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FcosConfig {
    /// The backbone (output stride 32).
    pub backbone: BackboneConfig,
    /// Object classes (no background class: classification is per-class sigmoid).
    pub num_classes: usize,
    /// Strides of the FPN levels, ascending powers of two: 8, 16 and 32 come from C3–C5 and
    /// 64 and 128 are torchvision's extra P6 / P7 (stride-2 convolutions on P5). Each level's
    /// anchor size is its stride.
    #[serde(default = "default_strides")]
    pub strides: Vec<usize>,
    /// Channels of the FPN and the head (torchvision 256).
    #[serde(default = "default_channels")]
    pub channels: usize,
    /// Conv → GroupNorm → ReLU blocks in each of the two head towers (torchvision 4).
    #[serde(default = "default_head_convs")]
    pub head_convs: usize,
    /// Groups of the head's GroupNorm (torchvision 32); must divide `channels`.
    #[serde(default = "default_norm_groups")]
    pub norm_groups: usize,
    /// Initial foreground probability of the classifier (sets its bias; torchvision 0.01).
    #[serde(default = "default_prior")]
    pub prior_prob: f64,
}

fn default_strides() -> Vec<usize> {
    vec![8, 16, 32, 64, 128]
}

fn default_channels() -> usize {
    256
}

fn default_head_convs() -> usize {
    4
}

fn default_norm_groups() -> usize {
    32
}

fn default_prior() -> f64 {
    0.01
}

impl FcosConfig {
    /// Checks the settings, naming the key at fault.
    pub fn validate(&self) -> Result<()> {
        let key = |k: &str| format!("fcos.model.{k}");
        if self.num_classes == 0 {
            return Err(Error::config(key("num_classes"), "must be at least 1"));
        }
        let expected: Vec<usize> = (0..self.strides.len()).map(|i| 8 << i).collect();
        if self.strides.is_empty() || self.strides.len() > 5 || self.strides != expected {
            return Err(Error::config(
                key("strides"),
                format!(
                    "{:?}: must be 8, 16, 32 and optionally 64, 128, in that order",
                    self.strides
                ),
            ));
        }
        if self.backbone.output_stride != 32 {
            return Err(Error::config(
                key("backbone.output_stride"),
                format!("is {}: FCOS needs 32", self.backbone.output_stride),
            ));
        }
        if self.channels == 0
            || self.norm_groups == 0
            || !self.channels.is_multiple_of(self.norm_groups)
        {
            return Err(Error::config(
                key("norm_groups"),
                format!(
                    "{} does not divide channels = {}",
                    self.norm_groups, self.channels
                ),
            ));
        }
        if !(self.prior_prob > 0.0 && self.prior_prob < 1.0) {
            return Err(Error::config(
                key("prior_prob"),
                format!("{} is not in (0, 1)", self.prior_prob),
            ));
        }
        Ok(())
    }
}

/// Target assignment and loss weights (`[fcos.loss]`); torchvision's FCOS by default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FcosLossConfig {
    /// A point is a positive of a box only within this many anchor sizes (strides) of the
    /// box centre, in both directions (centre sampling).
    pub center_sampling_radius: f64,
    /// Focal loss α.
    pub focal_alpha: f64,
    /// Focal loss γ.
    pub focal_gamma: f64,
    /// Weight of the classification loss.
    pub class_weight: f64,
    /// Weight of the GIoU box loss.
    pub box_weight: f64,
    /// Weight of the centerness loss.
    pub centerness_weight: f64,
}

impl Default for FcosLossConfig {
    fn default() -> Self {
        FcosLossConfig {
            center_sampling_radius: 1.5,
            focal_alpha: 0.25,
            focal_gamma: 2.0,
            class_weight: 1.0,
            box_weight: 1.0,
            centerness_weight: 1.0,
        }
    }
}

/// How detections are decoded (`[fcos.eval]`, also recorded in exported weights).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FcosDecodeConfig {
    /// Candidates scoring `√(class · centerness)` below this are dropped (torchvision 0.2;
    /// COCO evaluation rewards the low-scoring tail, mmdet uses 0.05).
    pub score_threshold: f64,
    /// Best candidates kept per level before NMS.
    pub topk_candidates: usize,
    /// Class-aware NMS suppresses a box whose IoU with a better one of its class exceeds this.
    pub nms_threshold: f64,
    /// Detections kept per image after NMS.
    pub max_dets: usize,
}

impl Default for FcosDecodeConfig {
    fn default() -> Self {
        FcosDecodeConfig {
            score_threshold: 0.05,
            topk_candidates: 1000,
            nms_threshold: 0.6,
            max_dets: 100,
        }
    }
}

/// The `[fcos]` config section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FcosSection {
    /// The architecture.
    pub model: FcosConfig,
    /// Targets and loss.
    #[serde(default)]
    pub loss: FcosLossConfig,
    /// Decoding for evaluation and export.
    #[serde(default)]
    pub eval: FcosDecodeConfig,
}

impl FcosSection {
    /// Checks what serde cannot, naming the key; `replicas` is the run's data-parallel count.
    pub fn validate(&self, replicas: usize) -> Result<()> {
        self.model.validate()?;
        let l = &self.loss;
        for (k, v) in [
            ("center_sampling_radius", l.center_sampling_radius),
            ("focal_gamma", l.focal_gamma),
            ("class_weight", l.class_weight),
            ("box_weight", l.box_weight),
            ("centerness_weight", l.centerness_weight),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::config(
                    format!("fcos.loss.{k}"),
                    format!("must be ≥ 0, got {v}"),
                ));
            }
        }
        if l.focal_alpha.is_nan() || l.focal_alpha > 1.0 {
            return Err(Error::config(
                "fcos.loss.focal_alpha",
                format!(
                    "{} is above 1 (negative disables the weighting)",
                    l.focal_alpha
                ),
            ));
        }
        let e = &self.eval;
        if !(0.0..1.0).contains(&e.score_threshold) {
            return Err(Error::config(
                "fcos.eval.score_threshold",
                format!("{} is not in [0, 1)", e.score_threshold),
            ));
        }
        if !(0.0..=1.0).contains(&e.nms_threshold) {
            return Err(Error::config(
                "fcos.eval.nms_threshold",
                format!("{} is not in [0, 1]", e.nms_threshold),
            ));
        }
        if e.max_dets == 0 || e.topk_candidates == 0 {
            return Err(Error::config(
                "fcos.eval",
                "max_dets and topk_candidates must be positive",
            ));
        }
        crate::model::layers::check_replicas(
            replicas,
            &[("fcos.model.backbone.norm", self.model.backbone.norm)],
            &[],
        )
    }
}
