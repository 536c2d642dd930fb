//! DeepLabV3's supervised loss: per-pixel cross-entropy of the upsampled main and auxiliary
//! logits, averaged over labelled pixels (class-weighted if configured), optionally over OHEM's
//! hard pixels only.

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::layers::resize::{resize, Sampling};
use crate::ops::pixel::{hard_pixels, pixel_cross_entropy, weighted_mean, PixelLabels};

/// Online hard example mining (mmseg's `OHEMPixelSampler`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OhemConfig {
    /// Pixels whose ground-truth-class probability is at most this are hard (mmseg 0.7).
    pub thresh: f64,
    /// At least this many pixels per batch are kept (the threshold rises to keep them).
    pub min_kept: usize,
}

/// The `[deeplabv3.loss]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SegLossConfig {
    /// Weight of the auxiliary head's cross-entropy (torchvision and RDD: 0.4).
    pub aux_weight: f64,
    /// Per-class weights of the cross-entropy (PyTorch's `weight=`), one per class.
    pub class_weights: Option<Vec<f64>>,
    /// Average over OHEM's hard pixels instead of all labelled ones.
    pub ohem: Option<OhemConfig>,
}

impl Default for SegLossConfig {
    fn default() -> Self {
        SegLossConfig {
            aux_weight: 0.4,
            class_weights: None,
            ohem: None,
        }
    }
}

impl SegLossConfig {
    /// Checks the table against the number of classes.
    pub fn validate(&self, num_classes: usize) -> Result<()> {
        if !(self.aux_weight.is_finite() && self.aux_weight >= 0.0) {
            return Err(Error::config(
                "deeplabv3.loss.aux_weight",
                format!("must be ≥ 0, got {}", self.aux_weight),
            ));
        }
        if let Some(w) = &self.class_weights {
            if w.len() != num_classes {
                return Err(Error::config(
                    "deeplabv3.loss.class_weights",
                    format!("{} weights for {num_classes} classes", w.len()),
                ));
            }
            if w.iter().any(|x| !(x.is_finite() && *x >= 0.0)) {
                return Err(Error::config(
                    "deeplabv3.loss.class_weights",
                    "weights must be finite and ≥ 0",
                ));
            }
        }
        if let Some(o) = &self.ohem {
            if !(0.0..=1.0).contains(&o.thresh) {
                return Err(Error::config(
                    "deeplabv3.loss.ohem.thresh",
                    format!("must be in [0, 1], got {}", o.thresh),
                ));
            }
        }
        Ok(())
    }

    /// The loss of one head's logits `[N, K, h, w]`: upsampled to the labels, per-pixel
    /// cross-entropy, mean over labelled (or OHEM-hard) pixels with the class weights.
    pub fn head_loss<B: Backend>(
        &self,
        logits: Tensor<B, 4>,
        labels: &PixelLabels<B>,
    ) -> Tensor<B, 1> {
        let [_, h, w] = labels.shape;
        let ce = pixel_cross_entropy(resize(logits, [h, w], Sampling::Bilinear), labels);
        let mut weights = labels.class_weights(self.class_weights.as_deref());
        if let Some(o) = &self.ohem {
            let prob: Vec<f32> = ce
                .clone()
                .detach()
                .neg()
                .exp()
                .into_data()
                .to_vec::<f32>()
                .unwrap_or_default();
            let hard = hard_pixels(&prob, &labels.valid(), o.thresh as f32, o.min_kept);
            for (w, keep) in weights.iter_mut().zip(hard) {
                if !keep {
                    *w = 0.0;
                }
            }
        }
        let device = ce.device();
        weighted_mean(ce, labels.tensor(weights, &device))
    }
}
