//! FitNet-style imitation restricted to object regions (FGFI, Wang et al., CVPR 2019): the
//! student's features through a trained 3×3 adapter regress the teacher's inside the
//! ground-truth boxes, `Σ I·Σ_c (A(S) − T)² / (2·Σ I)`.

use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Tensor};
use serde::{Deserialize, Serialize};

use crate::distill::pixel_kd::positive;
use crate::error::Result;

/// `[distill.fitnet]`: the term's weight.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FitnetConfig {
    /// Weight per FPN level (FGFI: 0.01 on a Faster R-CNN's summed squares).
    pub weight: f64,
}

impl FitnetConfig {
    /// Checks the settings; `key` is the table's dotted name.
    pub fn validate(&self, key: &str) -> Result<()> {
        positive(key, "weight", self.weight, true)
    }
}

/// The masked imitation loss of adapted student features `[N, C, H, W]` toward the teacher's,
/// where `mask` `[N, H, W]` is 1 inside an object; 0 when the mask is empty.
pub fn masked_imitation<B: Backend>(
    student: Tensor<B, 4>,
    teacher: Tensor<B, 4>,
    mask: Tensor<B, 3>,
) -> Tensor<B, 1> {
    let [n, c, h, w] = student.dims();
    let area: f32 = mask.clone().sum().into_scalar().elem();
    let weights = mask.reshape([n, 1, h * w]).repeat_dim(1, c);
    let sq = (student - teacher).square().reshape([n, c, h * w]);
    (sq * weights)
        .sum()
        .div_scalar(2.0 * (area as f64).max(1.0))
}
