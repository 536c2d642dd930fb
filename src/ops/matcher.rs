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
        return Err(Error::config(
            "cost",
            format!(
                "entry ({}, {}) is {}; matching costs must be finite",
                i / cols,
                i % cols,
                costs[i]
            ),
        ));
    }
    let (row_ind, col_ind) = lsap::solve(rows, cols, &costs, false)
        .map_err(|e| Error::config("cost", format!("assignment failed: {e:?}")))?;
    let pairs: Vec<(usize, usize)> = row_ind.into_iter().zip(col_ind).collect();
    let total_cost = pairs.iter().map(|&(r, c)| costs[r * cols + c]).sum();
    Ok(Assignment { pairs, total_cost })
}
