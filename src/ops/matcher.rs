//! Exact rectangular minimum-cost assignment (Hungarian matching), as SciPy's
//! `linear_sum_assignment`: Crouse's shortest augmenting path method, the algorithm of SciPy's
//! solver with its tie-breaking, so both return the same pairs. Written here rather than taken
//! from the `lsap` crate (a line-by-line port of SciPy's C++), which was 1.3–1.4× slower than
//! SciPy on DETR's 300 × 50 matrices (docs/performance.md).

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
    // The solver augments one row at a time, so the shorter side becomes its rows.
    let transpose = cols < rows;
    let (nr, nc) = if transpose {
        (cols, rows)
    } else {
        (rows, cols)
    };
    let mut work: Vec<f64> = vec![0.0; nr * nc];
    let mut finite = true;
    if transpose {
        for (i, row) in cost.chunks_exact(cols).enumerate() {
            for (j, &c) in row.iter().enumerate() {
                let c: f64 = c.into();
                finite &= c.is_finite();
                work[j * rows + i] = c;
            }
        }
    } else {
        for (w, &c) in work.iter_mut().zip(cost) {
            *w = c.into();
            finite &= w.is_finite();
        }
    }
    if !finite {
        let k = cost
            .iter()
            .position(|&c| !Into::<f64>::into(c).is_finite())
            .unwrap_or(0);
        return Err(Error::NotFinite {
            what: format!(
                "the matching cost ({}, {}) = {}",
                k / cols,
                k % cols,
                cost[k].into()
            ),
        });
    }
    let col4row = shortest_augmenting_paths(&work, nr, nc)?;
    let mut pairs: Vec<(usize, usize)> = col4row
        .into_iter()
        .enumerate()
        .map(|(a, b)| if transpose { (b, a) } else { (a, b) })
        .collect();
    pairs.sort_unstable();
    let total_cost = pairs.iter().map(|&(r, c)| cost[r * cols + c].into()).sum();
    Ok(Assignment { pairs, total_cost })
}

/// "No row" / "no column" in the solver's index arrays.
const NONE: usize = usize::MAX;

/// The solver's state of one column, kept together so one index reaches all of it.
#[derive(Clone, Copy)]
struct Column {
    /// Dual variable.
    v: f64,
    /// Length of the shortest alternating path found to this column in the current search.
    dist: f64,
    /// Row preceding this column on that path.
    path: usize,
    /// Row assigned to this column, or [`NONE`].
    row: usize,
}

/// Assigns every row of the row-major `nr × nc` matrix `cost` (`nr <= nc`, finite) to a distinct
/// column at minimum total cost; returns each row's column.
///
/// Crouse (2016), "On implementing 2D rectangular assignment algorithms", as SciPy implements it:
/// the same scan order, the same floating-point expressions and the same tie-breaking (among
/// equally short paths, one that ends in a free column), so both pick the same optimum.
fn shortest_augmenting_paths(cost: &[f64], nr: usize, nc: usize) -> Result<Vec<usize>> {
    let mut u = vec![0.0f64; nr];
    let mut columns = vec![
        Column {
            v: 0.0,
            dist: f64::INFINITY,
            path: NONE,
            row: NONE,
        };
        nc
    ];
    let mut col4row = vec![NONE; nr];
    let mut remaining: Vec<usize> = Vec::with_capacity(nc);
    // Rows and columns reached by the current search: only their duals change.
    let mut visited_rows: Vec<usize> = Vec::with_capacity(nr);
    let mut scanned_cols: Vec<usize> = Vec::with_capacity(nc);
    for cur_row in 0..nr {
        // Filled in reverse, so a constant matrix gives the identity (SciPy #11602).
        remaining.clear();
        remaining.extend((0..nc).rev());
        visited_rows.clear();
        scanned_cols.clear();
        for column in columns.iter_mut() {
            column.dist = f64::INFINITY;
        }
        let mut min_val = 0.0f64;
        let mut i = cur_row;
        let sink = loop {
            visited_rows.push(i);
            let row = &cost[i * nc..(i + 1) * nc];
            let ui = u[i];
            let mut lowest = f64::INFINITY;
            let mut index = NONE;
            for (it, &j) in remaining.iter().enumerate() {
                let column = &mut columns[j];
                let r = min_val + row[j] - ui - column.v;
                // Selects rather than a branch: whether a path shortens is unpredictable.
                let shorter = r < column.dist;
                column.path = if shorter { i } else { column.path };
                column.dist = if shorter { r } else { column.dist };
                let d = column.dist;
                if d < lowest || (d == lowest && column.row == NONE) {
                    lowest = d;
                    index = it;
                }
            }
            if index == NONE || !lowest.is_finite() {
                return Err(Error::config(
                    "cost",
                    format!("no feasible assignment for row {cur_row} of {nr}x{nc}"),
                ));
            }
            min_val = lowest;
            let j = remaining.swap_remove(index);
            scanned_cols.push(j);
            match columns[j].row {
                NONE => break j,
                next => i = next,
            }
        };
        u[cur_row] += min_val;
        for &i in &visited_rows[1..] {
            u[i] += min_val - columns[col4row[i]].dist;
        }
        for &j in &scanned_cols {
            let column = &mut columns[j];
            column.v -= min_val - column.dist;
        }
        let mut j = sink;
        loop {
            let i = columns[j].path;
            columns[j].row = i;
            std::mem::swap(&mut col4row[i], &mut j);
            if i == cur_row {
                break;
            }
        }
    }
    Ok(col4row)
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
