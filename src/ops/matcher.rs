//! Exact rectangular minimum-cost assignment (Hungarian matching), as SciPy's
//! `linear_sum_assignment`, via the `lsap` crate (a port of SciPy's solver).

use crate::error::{Error, Result};

/// An optimal assignment: `pairs[i] = (row, col)`, sorted by row; `min(rows, cols)` pairs.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    /// Matched `(row, column)` pairs in increasing row order.
    pub pairs: Vec<(usize, usize)>,
    /// Sum of the matched costs (in f64).
    pub total_cost: f64,
}

/// Solves the rectangular assignment minimising total cost over a row-major `rows × cols` matrix.
///
/// Costs may be any finite values (f32 inputs are widened exactly to f64). NaN or infinite costs
/// are an error: they usually mean a diverged model, and SciPy rejects them too.
pub fn linear_sum_assignment<T: Copy + Into<f64>>(
    cost: &[T],
    rows: usize,
    cols: usize,
) -> Result<Assignment> {
    if cost.len() != rows * cols {
        return Err(Error::config(
            "cost",
            format!("{} values for a {rows}x{cols} matrix", cost.len()),
        ));
    }
    if rows == 0 || cols == 0 {
        return Ok(Assignment {
            pairs: Vec::new(),
            total_cost: 0.0,
        });
    }
    let costs: Vec<f64> = cost.iter().map(|&c| c.into()).collect();
    if let Some(i) = costs.iter().position(|c| !c.is_finite()) {
        return Err(Error::NotFinite {
            what: format!(
                "the matching cost ({}, {}) = {}",
                i / cols,
                i % cols,
                costs[i]
            ),
        });
    }
    let (row_ind, col_ind) = lsap::solve(rows, cols, &costs, false)
        .map_err(|e| Error::config("cost", format!("assignment failed: {e:?}")))?;
    let pairs: Vec<(usize, usize)> = row_ind.into_iter().zip(col_ind).collect();
    let total_cost = pairs.iter().map(|&(r, c)| costs[r * cols + c]).sum();
    Ok(Assignment { pairs, total_cost })
}

/// Weights of the DETR matching cost (Deformable-DETR / DAB-DETR defaults).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MatchCosts {
    /// Weight of the focal classification cost.
    pub class: f64,
    /// Weight of the L1 box cost.
    pub bbox: f64,
    /// Weight of the −GIoU cost.
    pub giou: f64,
    /// Focal α of the classification cost.
    pub alpha: f64,
    /// Focal γ of the classification cost.
    pub gamma: f64,
}

impl Default for MatchCosts {
    fn default() -> Self {
        MatchCosts {
            class: 2.0,
            bbox: 5.0,
            giou: 2.0,
            alpha: 0.25,
            gamma: 2.0,
        }
    }
}

/// GIoU of two `[cx, cy, w, h]` boxes, in f64.
fn giou_cxcywh(a: [f64; 4], b: [f64; 4]) -> f64 {
    use crate::ops::boxes::cxcywh_to_xyxy;
    let (a, b) = (cxcywh_to_xyxy(a), cxcywh_to_xyxy(b));
    let area = |r: [f64; 4]| (r[2] - r[0]) * (r[3] - r[1]);
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let union = area(a) + area(b) - inter;
    let enclosing =
        (a[2].max(b[2]) - a[0].min(b[0])).max(0.0) * (a[3].max(b[3]) - a[1].min(b[1])).max(0.0);
    inter / union - (enclosing - union) / enclosing
}

/// DETR's matching cost `class·focal + bbox·L1 + giou·(−GIoU)` (the focal cost as in
/// Deformable-DETR) of every query against every target, row-major `[Q, M]`.
///
/// `logits` is `[Q, K]` row-major, `boxes` `[Q, 4]` (`cx, cy, w, h`, normalised); targets are
/// class indices and boxes in the same format.
pub fn match_cost_matrix(
    logits: &[f32],
    boxes: &[f32],
    num_classes: usize,
    target_classes: &[usize],
    target_boxes: &[[f32; 4]],
    costs: &MatchCosts,
) -> Result<Vec<f64>> {
    let queries = boxes.len() / 4;
    let targets = target_classes.len();
    if logits.len() != queries * num_classes || target_boxes.len() != targets {
        return Err(Error::config(
            "match_queries",
            format!(
                "{} logits / {} box values for {queries} queries × {num_classes} classes, {} boxes for {targets} targets",
                logits.len(),
                boxes.len(),
                target_boxes.len()
            ),
        ));
    }
    if let Some(&c) = target_classes.iter().find(|&&c| c >= num_classes) {
        return Err(Error::config(
            "target class",
            format!("{c} >= {num_classes} classes"),
        ));
    }
    let mut cost = Vec::with_capacity(queries * targets);
    for q in 0..queries {
        let qb = [0, 1, 2, 3].map(|i| boxes[q * 4 + i] as f64);
        for (&class, tb) in target_classes.iter().zip(target_boxes) {
            let tb = tb.map(|v| v as f64);
            let p = 1.0 / (1.0 + (-(logits[q * num_classes + class] as f64)).exp());
            let pos = costs.alpha * (1.0 - p).powf(costs.gamma) * -(p + 1e-8).ln();
            let neg = (1.0 - costs.alpha) * p.powf(costs.gamma) * -(1.0 - p + 1e-8).ln();
            let l1: f64 = qb.iter().zip(&tb).map(|(a, b)| (a - b).abs()).sum();
            cost.push(
                costs.class * (pos - neg) + costs.bbox * l1 - costs.giou * giou_cxcywh(qb, tb),
            );
        }
    }
    Ok(cost)
}

/// Hungarian matching of one image's queries to its targets with [`match_cost_matrix`]'s
/// cost. Returns `(query, target)` pairs.
pub fn match_queries(
    logits: &[f32],
    boxes: &[f32],
    num_classes: usize,
    target_classes: &[usize],
    target_boxes: &[[f32; 4]],
    costs: &MatchCosts,
) -> Result<Assignment> {
    let cost = match_cost_matrix(
        logits,
        boxes,
        num_classes,
        target_classes,
        target_boxes,
        costs,
    )?;
    linear_sum_assignment(&cost, boxes.len() / 4, target_classes.len())
}
