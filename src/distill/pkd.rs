//! PKD (Cao et al., NeurIPS 2022): each channel of the student's and the teacher's feature maps
//! is standardised over the batch and positions, and their mean squared difference halved,
//! `1 − r` for Pearson's `r`; no connector is needed for the scale (mmrazor's `PKDLoss`).

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::distill::pixel_kd::positive;
use crate::error::Result;

/// `[distill.pkd]`: the term's weight.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PkdConfig {
    /// Weight per FPN level (mmrazor: 6 for Faster R-CNN, 10 for RetinaNet).
    pub weight: f64,
}

impl PkdConfig {
    /// Checks the settings; `key` is the table's dotted name.
    pub fn validate(&self, key: &str) -> Result<()> {
        positive(key, "weight", self.weight, true)
    }
}

/// Each channel of `[N, C, H, W]` standardised over `N·H·W` (unbiased standard deviation,
/// `+1e-6`), as `[C, N·H·W]`.
fn standardise<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 2> {
    let [n, c, h, w] = x.dims();
    let rows = x.swap_dims(0, 1).reshape([c, n * h * w]);
    let (var, mean) = rows.clone().var_mean(1);
    (rows - mean) / var.sqrt().add_scalar(1e-6)
}

/// PKD of a student map toward a teacher map of the same shape.
pub fn pearson_distillation<B: Backend>(
    student: Tensor<B, 4>,
    teacher: Tensor<B, 4>,
) -> Tensor<B, 1> {
    (standardise(student) - standardise(teacher))
        .square()
        .mean()
        .div_scalar(2.0)
}
