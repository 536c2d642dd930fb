//! Pixel-wise knowledge distillation (Hinton KD at every pixel, as CIRKD's `CriterionKD`):
//! `T² / (N·h·w) · Σ_pixels KL(softmax(z_t / T) ‖ softmax(z_s / T))`, at the logits'
//! resolution (CIRKD) or at the labels' (both logits upsampled as for the cross-entropy), over
//! every pixel (ignored ones included, as the reference code does).

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ops::losses::softmax_kl_sum;

/// `[distill.kd]`: weight and temperature of pixel-wise KD.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PixelKdConfig {
    /// λ_kd (CIRKD and RDD: 1).
    pub weight: f64,
    /// Softmax temperature T (CIRKD and RDD: 1).
    pub temperature: f64,
    /// Where the divergence is taken: the student's logit map (CIRKD) or the label map.
    pub resolution: KdResolution,
}

/// The spatial resolution pixel-wise KD compares the two predictions at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KdResolution {
    /// The student's logits (the teacher's resized to them), as CIRKD and RDD.
    #[default]
    Logits,
    /// The labels' size: both logits bilinearly upsampled, as the cross-entropy sees them. A
    /// student at a coarse output stride then learns the teacher's boundaries, not their average.
    Labels,
}

impl Default for PixelKdConfig {
    fn default() -> Self {
        PixelKdConfig {
            weight: 1.0,
            temperature: 1.0,
            resolution: KdResolution::Logits,
        }
    }
}

impl PixelKdConfig {
    /// Checks the settings; `key` is the table's dotted name.
    pub fn validate(&self, key: &str) -> Result<()> {
        positive(key, "weight", self.weight, true)?;
        positive(key, "temperature", self.temperature, false)
    }
}

/// A finite value above zero (or at zero when `zero_ok`), named `key.field` when not.
pub(crate) fn positive(key: &str, field: &str, v: f64, zero_ok: bool) -> Result<()> {
    if v.is_finite() && (v > 0.0 || (zero_ok && v == 0.0)) {
        Ok(())
    } else {
        let bound = if zero_ok { "≥ 0" } else { "> 0" };
        Err(Error::config(
            format!("{key}.{field}"),
            format!("must be finite and {bound}, got {v}"),
        ))
    }
}

/// Pixel-wise KD of student logits `[N, K, h, w]` toward teacher logits of the same shape.
pub fn pixel_kd<B: Backend>(
    student: Tensor<B, 4>,
    teacher: Tensor<B, 4>,
    temperature: f64,
) -> Tensor<B, 1> {
    let [n, _, h, w] = student.dims();
    let t = temperature;
    softmax_kl_sum(student.div_scalar(t), teacher.div_scalar(t), 1)
        .mul_scalar(t * t / (n * h * w) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolution_is_read_by_name_and_defaults_to_the_logits() {
        let parse = |text: &str| toml::from_str::<PixelKdConfig>(text);
        let default = parse("weight = 0.5").expect("default");
        assert_eq!(default.resolution, KdResolution::Logits);
        let labels = parse("resolution = \"labels\"").expect("labels");
        assert_eq!(labels.resolution, KdResolution::Labels);
        let err = parse("resolution = \"pixels\"")
            .expect_err("unknown")
            .to_string();
        assert!(err.contains("pixels") && err.contains("labels"), "{err}");
    }
}
