//! DETR's detections from its final-layer predictions.

use burn::tensor::{activation::sigmoid, backend::Backend, Tensor};

use crate::model::detr::LayerPrediction;

/// Turns the first query group's final predictions into detections in original-image pixels:
/// the `max_dets` highest (query, class) sigmoid scores over all queries and classes
/// (Deformable-DETR's post-processing). `orig_sizes` are `(width, height)` per image; boxes are
/// normalised to each image's unpadded extent, which scales uniformly to the original.
pub fn postprocess<B: Backend>(
    prediction: &LayerPrediction<B>,
    num_queries: usize,
    orig_sizes: &[(u32, u32)],
    max_dets: usize,
) -> Vec<Vec<crate::eval::coco::Detection>> {
    let [b, _, k] = prediction.logits.dims();
    let host = |t: Tensor<B, 3>| -> Vec<f32> {
        t.into_data().convert::<f32>().to_vec().unwrap_or_default()
    };
    let scores = host(sigmoid(prediction.logits.clone().narrow(1, 0, num_queries)));
    let boxes = host(prediction.boxes.clone().narrow(1, 0, num_queries));
    (0..b.min(orig_sizes.len()))
        .map(|i| {
            let (w, h) = (orig_sizes[i].0 as f64, orig_sizes[i].1 as f64);
            let s = &scores[i * num_queries * k..(i + 1) * num_queries * k];
            let mut order: Vec<usize> = (0..s.len()).collect();
            order.sort_by(|&a, &c| s[c].total_cmp(&s[a]));
            order
                .into_iter()
                .take(max_dets)
                .map(|j| {
                    let q = j / k;
                    let bx = &boxes[(i * num_queries + q) * 4..][..4];
                    let (cx, cy, bw, bh) = (
                        bx[0] as f64 * w,
                        bx[1] as f64 * h,
                        bx[2] as f64 * w,
                        bx[3] as f64 * h,
                    );
                    crate::eval::coco::Detection {
                        class: j % k,
                        bbox: [cx - bw / 2.0, cy - bh / 2.0, bw, bh],
                        score: s[j] as f64,
                    }
                })
                .collect()
        })
        .collect()
}
