//! Channel-wise distillation (Shu et al., ICCV 2021): each channel of a map becomes a
//! distribution over spatial positions, `softmax_i(y_{c,i} / T)`, and the student's is pulled
//! toward the teacher's by `T² / (N·C) · Σ_{n,c} KL(φ_t ‖ φ_s)`. Used on logits and on head
//! features (through a trained 1×1 connector when the channel counts differ).

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::distill::pixel_kd::positive;
use crate::error::Result;
use crate::ops::losses::softmax_kl_sum;

/// `[distill.cwd_logits]` / `[distill.cwd_features]`: weight and temperature of one CWD term.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CwdConfig {
    /// The term's weight (CIRKD's CWD recipe: 3 on logits, 50 on features).
    pub weight: f64,
    /// Spatial softmax temperature (CIRKD: 4).
    #[serde(default = "default_temperature")]
    pub temperature: f64,
}

fn default_temperature() -> f64 {
    4.0
}

impl CwdConfig {
    /// Checks the settings; `key` is the table's dotted name.
    pub fn validate(&self, key: &str) -> Result<()> {
        positive(key, "weight", self.weight, true)?;
        positive(key, "temperature", self.temperature, false)
    }
}

/// CWD of a student map `[N, C, h, w]` toward a teacher map of the same shape.
pub fn channel_wise_divergence<B: Backend>(
    student: Tensor<B, 4>,
    teacher: Tensor<B, 4>,
    temperature: f64,
) -> Tensor<B, 1> {
    let [n, c, h, w] = student.dims();
    let t = temperature;
    let flat = |x: Tensor<B, 4>| x.reshape([n * c, h * w]).div_scalar(t);
    softmax_kl_sum(flat(student), flat(teacher), 1).mul_scalar(t * t / (n * c) as f64)
}
