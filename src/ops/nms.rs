//! Class-aware non-maximum suppression, as torchvision's `batched_nms`.

/// IoU of two `[x0, y0, x1, y1]` boxes, computed as torchvision's NMS kernel does.
fn iou(a: &[f64; 4], b: &[f64; 4]) -> f64 {
    let area = |b: &[f64; 4]| (b[2] - b[0]) * (b[3] - b[1]);
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    inter / (area(a) + area(b) - inter)
}

/// Indices of the boxes kept, best score first: in score order (ties by index), a box is
/// dropped when its IoU with a kept box of the same class exceeds `iou_threshold`.
pub fn batched_nms(
    boxes: &[[f64; 4]],
    scores: &[f64],
    classes: &[usize],
    iou_threshold: f64,
) -> Vec<usize> {
    let mut order: Vec<usize> = (0..boxes.len().min(scores.len()).min(classes.len())).collect();
    // A stable sort keeps equal scores in index order, as torchvision's CPU kernel.
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let mut kept: Vec<usize> = Vec::new();
    for i in order {
        let suppressed = kept
            .iter()
            .any(|&k| classes[k] == classes[i] && iou(&boxes[k], &boxes[i]) > iou_threshold);
        if !suppressed {
            kept.push(i);
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suppresses_only_above_the_threshold_and_within_a_class() {
        let boxes = [
            [0.0, 0.0, 10.0, 10.0],
            [0.0, 0.0, 10.0, 20.0],
            [0.0, 0.0, 10.0, 11.0],
            [0.0, 0.0, 10.0, 10.0],
        ];
        // Box 1 has IoU exactly 0.5 with box 0 (kept), box 2 about 0.91 (dropped), box 3 is
        // box 0 in another class (kept).
        let keep = batched_nms(&boxes, &[0.9, 0.8, 0.7, 0.9], &[0, 0, 0, 1], 0.5);
        assert_eq!(keep, vec![0, 3, 1]);
        assert!(batched_nms(&[], &[], &[], 0.5).is_empty());
    }
}
