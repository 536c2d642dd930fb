//! FCOS's loss, as torchvision's `FCOSHead.compute_loss`: sigmoid focal loss over every point
//! and class, and on the positive points GIoU of the decoded boxes and binary cross-entropy of
//! the centerness, each summed and divided by the number of positives in the batch.

use burn::tensor::{activation::log_sigmoid, backend::Backend, Int, Tensor, TensorData};

use crate::model::fcos::config::FcosLossConfig;
use crate::model::fcos::targets::{assign, centerness, encode, Points};
use crate::model::fcos::FlatOutput;
use crate::ops::boxes::paired_generalized_box_iou;
use crate::ops::losses::sigmoid_focal_loss;

/// One image's boxes in padded-image pixels.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageBoxes {
    /// `[x0, y0, x1, y1]`.
    pub boxes: Vec<[f64; 4]>,
    /// Class of each box.
    pub classes: Vec<usize>,
}

/// The three loss terms, unweighted.
pub struct FcosLosses<B: Backend> {
    /// Focal loss per positive.
    pub class: Tensor<B, 1>,
    /// `1 − GIoU` per positive.
    pub boxes: Tensor<B, 1>,
    /// Centerness BCE per positive.
    pub centerness: Tensor<B, 1>,
    /// Positive points in the batch.
    pub positives: usize,
}

impl<B: Backend> FcosLosses<B> {
    /// The weighted sum.
    pub fn weighted(&self, w: &FcosLossConfig) -> Tensor<B, 1> {
        self.class.clone().mul_scalar(w.class_weight)
            + self.boxes.clone().mul_scalar(w.box_weight)
            + self.centerness.clone().mul_scalar(w.centerness_weight)
    }
}

/// The positives of a batch: flat `(image · A + point)` indices with their targets.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Positives {
    /// Flat point index.
    pub index: Vec<usize>,
    /// Class of the assigned box.
    pub class: Vec<usize>,
    /// The point.
    pub point: Vec<[f64; 3]>,
    /// The assigned box.
    pub target: Vec<[f64; 4]>,
    /// Centerness target.
    pub centerness: Vec<f64>,
}

/// Assigns every image's points and collects the positives.
pub fn positives(points: &Points, images: &[ImageBoxes], radius: f64) -> Positives {
    let mut pos = Positives::default();
    for (n, image) in images.iter().enumerate() {
        for (a, m) in assign(points, &image.boxes, radius).into_iter().enumerate() {
            let Some(j) = m else { continue };
            let p = &points.points[a];
            let b = image.boxes[j];
            pos.index.push(n * points.len() + a);
            pos.class.push(image.classes[j]);
            pos.point.push([p.x, p.y, p.size]);
            pos.target.push(b);
            pos.centerness.push(centerness(encode(p, &b)));
        }
    }
    pos
}

/// A host `[rows, cols]` matrix as a tensor.
fn matrix<B: Backend, const C: usize>(rows: &[[f64; C]], device: &B::Device) -> Tensor<B, 2> {
    let flat: Vec<f32> = rows.iter().flatten().map(|&v| v as f32).collect();
    Tensor::from_data(TensorData::new(flat, [rows.len(), C]), device)
}

/// The loss of a forward pass against `images`' boxes; `points` must be the pyramid's.
pub fn fcos_loss<B: Backend>(
    out: &FlatOutput<B>,
    points: &Points,
    images: &[ImageBoxes],
    cfg: &FcosLossConfig,
) -> FcosLosses<B> {
    let device = out.cls_logits.device();
    let [n, a, k] = out.cls_logits.dims();
    let pos = positives(points, images, cfg.center_sampling_radius);
    let f = pos.index.len();
    let norm = f.max(1) as f64;

    let mut onehot = vec![0f32; n * a * k];
    for (&i, &c) in pos.index.iter().zip(&pos.class) {
        onehot[i * k + c] = 1.0;
    }
    let onehot = Tensor::from_data(TensorData::new(onehot, [n, a, k]), &device);
    let class = sigmoid_focal_loss(
        out.cls_logits.clone(),
        onehot,
        cfg.focal_alpha,
        cfg.focal_gamma,
    )
    .sum()
    .div_scalar(norm);
    if f == 0 {
        let zero = Tensor::zeros([1], &device);
        return FcosLosses {
            class,
            boxes: zero.clone(),
            centerness: zero,
            positives: 0,
        };
    }

    let index = Tensor::<B, 1, Int>::from_data(
        TensorData::new(pos.index.iter().map(|&i| i as i64).collect(), [f]),
        &device,
    );
    let reg = out
        .bbox_reg
        .clone()
        .reshape([n * a, 4])
        .select(0, index.clone());
    let pts = matrix::<B, 3>(&pos.point, &device);
    let col = |t: &Tensor<B, 2>, c: usize| t.clone().narrow(1, c, 1);
    let (px, py, size) = (col(&pts, 0), col(&pts, 1), col(&pts, 2));
    let decoded = Tensor::cat(
        vec![
            px.clone() - col(&reg, 0) * size.clone(),
            py.clone() - col(&reg, 1) * size.clone(),
            px + col(&reg, 2) * size.clone(),
            py + col(&reg, 3) * size,
        ],
        1,
    );
    let giou = paired_generalized_box_iou(decoded, matrix::<B, 4>(&pos.target, &device));
    let boxes = giou.neg().add_scalar(1.0).sum().div_scalar(norm);

    let logit = out.centerness.clone().reshape([n * a]).select(0, index);
    let t = Tensor::<B, 1>::from_data(
        TensorData::new(pos.centerness.iter().map(|&c| c as f32).collect(), [f]),
        &device,
    );
    let bce = (t.clone() * log_sigmoid(logit.clone())
        + t.neg().add_scalar(1.0) * log_sigmoid(logit.neg()))
    .neg();
    FcosLosses {
        class,
        boxes,
        centerness: bce.sum().div_scalar(norm),
        positives: f,
    }
}
