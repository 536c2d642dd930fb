//! Detection losses shared by every detector.

use burn::tensor::{activation, backend::Backend, Tensor};

/// Sigmoid focal loss (Lin et al., 2017), element-wise, as torchvision's `sigmoid_focal_loss`
/// with `reduction="none"`: `ce(x, t) · (1 − p_t)^γ`, weighted by `α·t + (1 − α)(1 − t)` when
/// `alpha ≥ 0`. The cross-entropy uses `log_sigmoid`, so extreme logits stay finite.
pub fn sigmoid_focal_loss<B: Backend, const D: usize>(
    logits: Tensor<B, D>,
    targets: Tensor<B, D>,
    alpha: f64,
    gamma: f64,
) -> Tensor<B, D> {
    let p = activation::sigmoid(logits.clone());
    let log_p = activation::log_sigmoid(logits.clone());
    let log_not_p = activation::log_sigmoid(logits.neg());
    let not_t = targets.clone().neg().add_scalar(1.0);
    let ce = (targets.clone() * log_p + not_t.clone() * log_not_p).neg();
    let p_t = p.clone() * targets.clone() + p.neg().add_scalar(1.0) * not_t.clone();
    let modulating = if gamma == 0.0 {
        p_t.ones_like()
    } else {
        p_t.neg().add_scalar(1.0).powf_scalar(gamma)
    };
    let loss = ce * modulating;
    if alpha >= 0.0 {
        loss * (targets.mul_scalar(alpha) + not_t.mul_scalar(1.0 - alpha))
    } else {
        loss
    }
}

/// Quality focal loss with several possible targets per query (Generalized Focal Loss's QFL
/// in Stable-DINO's focal form), summed: positives (`pos` = 1) are weighted
/// `α·|y − p|^γ` against their quality `y`, negatives `(1 − α)·p^γ` against 0.
pub fn quality_focal_loss<B: Backend>(
    logits: Tensor<B, 3>,
    quality: Tensor<B, 3>,
    pos: Tensor<B, 3>,
    alpha: f64,
    gamma: f64,
) -> Tensor<B, 1> {
    let p = activation::sigmoid(logits.clone());
    let bce = (quality.clone() * activation::log_sigmoid(logits.clone())
        + quality.clone().neg().add_scalar(1.0) * activation::log_sigmoid(logits.neg()))
    .neg();
    let pos_w = (quality - p.clone())
        .abs()
        .powf_scalar(gamma)
        .mul_scalar(alpha);
    let neg_w = p.powf_scalar(gamma).mul_scalar(1.0 - alpha);
    let w = pos.clone() * pos_w + pos.neg().add_scalar(1.0) * neg_w;
    (w * bce).sum()
}

/// `Σ softmax(t)·(log softmax(t) − log softmax(s))` over every element, the softmax taken along
/// `dim`: the summed KL divergence `KL(p_t ‖ p_s)` of every distribution along `dim`.
pub fn softmax_kl_sum<B: Backend, const D: usize>(
    student: Tensor<B, D>,
    teacher: Tensor<B, D>,
    dim: usize,
) -> Tensor<B, 1> {
    let log_t = activation::log_softmax(teacher.clone(), dim);
    let p_t = activation::softmax(teacher, dim);
    (p_t * (log_t - activation::log_softmax(student, dim))).sum()
}
