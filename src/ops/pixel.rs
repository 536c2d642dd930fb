//! Per-pixel segmentation losses: cross-entropy maps with an ignore label, class-weighted means
//! over selected pixels, and the OHEM hard-pixel rule that RDD's TSE stage also uses.
//!
//! burn's `CrossEntropyLoss` averages over every pixel and has no ignore label, so these are
//! written out; they match `torch.nn.functional.cross_entropy(ignore_index=…, weight=…)`.

use burn::tensor::{
    activation::log_softmax, backend::Backend, ElementConversion, Int, Tensor, TensorData,
};

/// Ground-truth labels of a batch, on the host and as gather indices.
#[derive(Debug, Clone)]
pub struct PixelLabels<B: Backend> {
    /// Labels `[N, H, W]`, row-major.
    pub labels: Vec<u8>,
    /// `[N, H, W]`.
    pub shape: [usize; 3],
    /// The label of pixels that take no loss.
    pub ignore_index: u8,
    /// Labels as indices `[N, 1, H, W]`, ignored pixels as 0.
    pub index: Tensor<B, 4, Int>,
}

impl<B: Backend> PixelLabels<B> {
    /// Wraps host labels.
    pub fn new(labels: Vec<u8>, shape: [usize; 3], ignore_index: u8, device: &B::Device) -> Self {
        let [n, h, w] = shape;
        let index: Vec<i64> = labels
            .iter()
            .map(|&l| if l == ignore_index { 0 } else { l as i64 })
            .collect();
        PixelLabels {
            index: Tensor::from_data(TensorData::new(index, [n, 1, h, w]), device),
            labels,
            shape,
            ignore_index,
        }
    }

    /// 1 at labelled pixels, 0 at ignored ones.
    pub fn valid(&self) -> Vec<f32> {
        self.labels
            .iter()
            .map(|&l| f32::from(u8::from(l != self.ignore_index)))
            .collect()
    }

    /// Per-pixel weight of the pixel's class (`weights[label]`, 1 without weights), 0 at
    /// ignored pixels.
    pub fn class_weights(&self, weights: Option<&[f64]>) -> Vec<f32> {
        self.labels
            .iter()
            .map(|&l| match (l == self.ignore_index, weights) {
                (true, _) => 0.0,
                (false, Some(w)) => w.get(l as usize).copied().unwrap_or(1.0) as f32,
                (false, None) => 1.0,
            })
            .collect()
    }

    /// A host map `[N, H, W]` as a tensor.
    pub fn tensor(&self, map: Vec<f32>, device: &B::Device) -> Tensor<B, 3> {
        Tensor::from_data(TensorData::new(map, self.shape), device)
    }
}

/// Per-pixel cross-entropy `−log softmax(logits)[label]` `[N, H, W]` of logits `[N, K, H, W]`
/// at the labels' resolution; ignored pixels hold the loss of class 0 and must be masked.
pub fn pixel_cross_entropy<B: Backend>(
    logits: Tensor<B, 4>,
    labels: &PixelLabels<B>,
) -> Tensor<B, 3> {
    log_softmax(logits, 1)
        .gather(1, labels.index.clone())
        .squeeze_dim::<3>(1)
        .neg()
}

/// `Σ loss·w / Σ w` over pixels: PyTorch's weighted `mean` reduction when `w` holds class
/// weights, a masked mean when it holds 0/1. Zero (with the graph kept) when `Σ w = 0`.
pub fn weighted_mean<B: Backend>(loss: Tensor<B, 3>, weights: Tensor<B, 3>) -> Tensor<B, 1> {
    let total: f32 = weights.clone().sum().into_scalar().elem();
    (loss * weights)
        .sum()
        .div_scalar(f64::from(total.max(1.0e-12)))
}

/// OHEM's hard pixels: labelled pixels whose ground-truth-class probability is `≤ τ`, where
/// `τ = thresh` unless the `min_kept`-th smallest probability among labelled pixels is larger,
/// in which case `τ` is that value, so at least `min_kept` pixels stay. With fewer labelled
/// pixels than `min_kept`, `τ = thresh` (the official code fails there).
pub fn hard_pixels(prob_gt: &[f32], valid: &[f32], thresh: f32, min_kept: usize) -> Vec<bool> {
    let mut probs: Vec<f32> = prob_gt
        .iter()
        .zip(valid)
        .filter(|(_, &v)| v > 0.0)
        .map(|(&p, _)| p)
        .collect();
    let mut tau = thresh;
    if min_kept > 0 && min_kept <= probs.len() {
        let (_, kth, _) = probs.select_nth_unstable_by(min_kept - 1, f32::total_cmp);
        tau = tau.max(*kth);
    }
    prob_gt
        .iter()
        .zip(valid)
        .map(|(&p, &v)| v > 0.0 && p <= tau)
        .collect()
}
