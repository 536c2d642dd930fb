//! Box formats and overlap measures: host-side helpers and differentiable burn tensor ops.
//!
//! Formats: `xywh` (COCO: corner + size), `xyxy` (corners), `cxcywh` (centre + size, DETR's
//! prediction format). Boxes are continuous coordinates with no `+1` (as pycocotools).

use burn::tensor::{backend::Backend, Tensor};

/// COCO `[x, y, w, h]` to `[x0, y0, x1, y1]`.
pub fn xywh_to_xyxy(b: [f64; 4]) -> [f64; 4] {
    [b[0], b[1], b[0] + b[2], b[1] + b[3]]
}

/// `[x0, y0, x1, y1]` to COCO `[x, y, w, h]`.
pub fn xyxy_to_xywh(b: [f64; 4]) -> [f64; 4] {
    [b[0], b[1], b[2] - b[0], b[3] - b[1]]
}

/// `[cx, cy, w, h]` to `[x0, y0, x1, y1]`.
pub fn cxcywh_to_xyxy(b: [f64; 4]) -> [f64; 4] {
    [
        b[0] - 0.5 * b[2],
        b[1] - 0.5 * b[3],
        b[0] + 0.5 * b[2],
        b[1] + 0.5 * b[3],
    ]
}

/// `[x0, y0, x1, y1]` to `[cx, cy, w, h]`.
pub fn xyxy_to_cxcywh(b: [f64; 4]) -> [f64; 4] {
    [
        (b[0] + b[2]) * 0.5,
        (b[1] + b[3]) * 0.5,
        b[2] - b[0],
        b[3] - b[1],
    ]
}

/// Splits `[N, 4]` into its four `[N, 1]` columns.
fn columns<B: Backend>(boxes: Tensor<B, 2>) -> [Tensor<B, 2>; 4] {
    let mut cols = boxes.chunk(4, 1).into_iter();
    std::array::from_fn(|_| cols.next().expect("a [N, 4] tensor has four columns"))
}

/// `[N, 4]` centre-size boxes to corners.
pub fn box_cxcywh_to_xyxy<B: Backend>(boxes: Tensor<B, 2>) -> Tensor<B, 2> {
    let [cx, cy, w, h] = columns(boxes);
    let (hw, hh) = (w.mul_scalar(0.5), h.mul_scalar(0.5));
    Tensor::cat(
        vec![
            cx.clone() - hw.clone(),
            cy.clone() - hh.clone(),
            cx + hw,
            cy + hh,
        ],
        1,
    )
}

/// `[N, 4]` corner boxes to centre-size.
pub fn box_xyxy_to_cxcywh<B: Backend>(boxes: Tensor<B, 2>) -> Tensor<B, 2> {
    let [x0, y0, x1, y1] = columns(boxes);
    Tensor::cat(
        vec![
            (x0.clone() + x1.clone()).mul_scalar(0.5),
            (y0.clone() + y1.clone()).mul_scalar(0.5),
            x1 - x0,
            y1 - y0,
        ],
        1,
    )
}

/// Areas `[N]` of `[N, 4]` corner boxes.
pub fn box_area<B: Backend>(boxes: Tensor<B, 2>) -> Tensor<B, 1> {
    let [x0, y0, x1, y1] = columns(boxes);
    ((x1 - x0) * (y1 - y0)).squeeze_dim(1)
}

/// Corner columns of `a` as `[N, M]` rows and of `b` as `[N, M]` columns, for pairwise ops.
fn pairwise<B: Backend>(
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
) -> ([Tensor<B, 2>; 4], [Tensor<B, 2>; 4]) {
    let (n, m) = (a.dims()[0], b.dims()[0]);
    let ca = columns(a).map(|c| c.expand([n, m]));
    let cb = columns(b).map(|c| c.reshape([1, m]).expand([n, m]));
    (ca, cb)
}

/// Intersection, union and enclosing-box area of corner boxes given as aligned column sets.
fn overlap_terms<B: Backend>(
    [ax0, ay0, ax1, ay1]: [Tensor<B, 2>; 4],
    [bx0, by0, bx1, by1]: [Tensor<B, 2>; 4],
) -> (Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 2>) {
    let area_a = (ax1.clone() - ax0.clone()) * (ay1.clone() - ay0.clone());
    let area_b = (bx1.clone() - bx0.clone()) * (by1.clone() - by0.clone());
    let iw = (ax1.clone().min_pair(bx1.clone()) - ax0.clone().max_pair(bx0.clone())).clamp_min(0.0);
    let ih = (ay1.clone().min_pair(by1.clone()) - ay0.clone().max_pair(by0.clone())).clamp_min(0.0);
    let inter = iw * ih;
    let union = area_a + area_b - inter.clone();
    let ew = (ax1.max_pair(bx1) - ax0.min_pair(bx0)).clamp_min(0.0);
    let eh = (ay1.max_pair(by1) - ay0.min_pair(by0)).clamp_min(0.0);
    (inter, union, ew * eh)
}

/// Pairwise IoU `[N, M]` of corner boxes `a: [N, 4]` and `b: [M, 4]`.
pub fn box_iou<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Tensor<B, 2> {
    let (ca, cb) = pairwise(a, b);
    let (inter, union, _) = overlap_terms(ca, cb);
    inter / union
}

/// Pairwise generalized IoU `[N, M]` (Rezatofighi et al., 2019) of corner boxes.
pub fn generalized_box_iou<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Tensor<B, 2> {
    let (ca, cb) = pairwise(a, b);
    let (inter, union, enclosing) = overlap_terms(ca, cb);
    let iou = inter / union.clone();
    iou - (enclosing.clone() - union) / enclosing
}

/// Generalized IoU `[N]` of aligned pairs `a[i]`, `b[i]` (the loss on matched boxes).
pub fn paired_generalized_box_iou<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Tensor<B, 1> {
    let (inter, union, enclosing) = overlap_terms(columns(a), columns(b));
    let iou = inter / union.clone();
    (iou - (enclosing.clone() - union) / enclosing).squeeze_dim(1)
}

/// IoU of two `[cx, cy, w, h]` boxes (0 when either is empty).
pub fn iou_cxcywh(a: [f64; 4], b: [f64; 4]) -> f64 {
    let (a, b) = (cxcywh_to_xyxy(a), cxcywh_to_xyxy(b));
    let area = |r: [f64; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let union = area(a) + area(b) - iw * ih;
    if union > 0.0 {
        iw * ih / union
    } else {
        0.0
    }
}

/// The cells of an `(h, w)` level inside box `b` of a `(H, W)` padded image: a cell `(y, x)`
/// is inside when `|y − y_c| ≤ h_b / 2` and `|x − x_c| ≤ w_b / 2` in level coordinates.
pub fn box_mask(b: &[f64; 4], (ph, pw): (usize, usize), (h, w): (usize, usize)) -> Vec<f32> {
    let (sy, sx) = (h as f64 / ph as f64, w as f64 / pw as f64);
    let (x0, y0, x1, y1) = (b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy);
    let (xc, yc, hw, hh) = (
        (x0 + x1) / 2.0,
        (y0 + y1) / 2.0,
        (x1 - x0) / 2.0,
        (y1 - y0) / 2.0,
    );
    let mut m = vec![0f32; h * w];
    for y in 0..h {
        for x in 0..w {
            if (y as f64 - yc).abs() <= hh && (x as f64 - xc).abs() <= hw {
                m[y * w + x] = 1.0;
            }
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn box_masks_use_closed_half_extents_in_level_cells() {
        // A 16×16 box at (8, 8)–(24, 24) of a 32×32 image on a 4×4 level: centre (2, 2),
        // half-extent 1, so cells 1..=3 in both directions.
        let m = box_mask(&[8.0, 8.0, 24.0, 24.0], (32, 32), (4, 4));
        let inside: Vec<usize> = (0..16).filter(|&i| m[i] == 1.0).collect();
        assert_eq!(inside, vec![5, 6, 7, 9, 10, 11, 13, 14, 15]);
        // A box smaller than a cell between cell centres covers none.
        assert!(box_mask(&[1.0, 1.0, 3.0, 3.0], (32, 32), (4, 4))
            .iter()
            .all(|&v| v == 0.0));
    }
}
