//! FCOS's detections from its head outputs, as torchvision's `FCOS.postprocess_detections`:
//! per level the best candidates scoring `√(σ(class) · σ(centerness))` above a threshold,
//! decoded and clipped to the image, then class-aware NMS over all levels.

use burn::tensor::{activation::sigmoid, backend::Backend, Tensor};

use crate::eval::coco::Detection;
use crate::model::fcos::config::FcosDecodeConfig;
use crate::model::fcos::targets::{decode, Points};
use crate::model::fcos::FlatOutput;
use crate::ops::nms::batched_nms;

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap_or_default()
}

/// Detections per image in original-image pixels. `sizes` are each image's unpadded
/// `(width, height)` in the network input and `orig_sizes` its original size.
pub fn postprocess<B: Backend>(
    out: &FlatOutput<B>,
    points: &Points,
    sizes: &[(u32, u32)],
    orig_sizes: &[(u32, u32)],
    cfg: &FcosDecodeConfig,
) -> Vec<Vec<Detection>> {
    let [n, a, k] = out.cls_logits.dims();
    let class = host(sigmoid(out.cls_logits.clone()));
    let centerness = host(sigmoid(out.centerness.clone()));
    let reg = host(out.bbox_reg.clone());
    (0..n.min(sizes.len()).min(orig_sizes.len()))
        .map(|i| {
            let (w, h) = (sizes[i].0 as f64, sizes[i].1 as f64);
            let mut boxes = Vec::new();
            let mut scores = Vec::new();
            let mut classes = Vec::new();
            let mut start = 0;
            for &count in &points.per_level {
                let mut candidates: Vec<(usize, f64)> = Vec::new();
                for p in start..start + count {
                    let ctr = centerness[i * a + p] as f64;
                    for c in 0..k {
                        let s = (class[(i * a + p) * k + c] as f64 * ctr).sqrt();
                        if s > cfg.score_threshold {
                            candidates.push((p * k + c, s));
                        }
                    }
                }
                candidates.sort_by(|x, y| y.1.total_cmp(&x.1));
                candidates.truncate(cfg.topk_candidates);
                for (j, s) in candidates {
                    let p = j / k;
                    let r = &reg[(i * a + p) * 4..][..4];
                    let b = decode(
                        &points.points[p],
                        [r[0] as f64, r[1] as f64, r[2] as f64, r[3] as f64],
                    );
                    boxes.push([
                        b[0].clamp(0.0, w),
                        b[1].clamp(0.0, h),
                        b[2].clamp(0.0, w),
                        b[3].clamp(0.0, h),
                    ]);
                    scores.push(s);
                    classes.push(j % k);
                }
                start += count;
            }
            let keep = batched_nms(&boxes, &scores, &classes, cfg.nms_threshold);
            let (sx, sy) = (orig_sizes[i].0 as f64 / w, orig_sizes[i].1 as f64 / h);
            keep.into_iter()
                .take(cfg.max_dets)
                .map(|j| {
                    let b = boxes[j];
                    Detection {
                        class: classes[j],
                        bbox: [b[0] * sx, b[1] * sy, (b[2] - b[0]) * sx, (b[3] - b[1]) * sy],
                        score: scores[j],
                    }
                })
                .collect()
        })
        .collect()
}
