//! Hungarian matching against SciPy's `linear_sum_assignment` (tests/fixtures/lsap.json).

use std::collections::HashSet;

use densekd::ops::matcher::linear_sum_assignment;

#[test]
fn matches_scipy_on_fixtures() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/lsap.json");
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path).expect("read")).expect("json");
    let cases = v["cases"].as_array().expect("cases");
    assert!(cases.len() >= 12);
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let (r, c) = (
            case["rows"].as_u64().expect("rows") as usize,
            case["cols"].as_u64().expect("cols") as usize,
        );
        let cost: Vec<f64> = case["cost"]
            .as_array()
            .expect("cost")
            .iter()
            .map(|x| x.as_f64().expect("f64"))
            .collect();
        let a = linear_sum_assignment(&cost, r, c).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(a.pairs.len(), r.min(c), "{name}");
        let rows: HashSet<usize> = a.pairs.iter().map(|p| p.0).collect();
        let cols: HashSet<usize> = a.pairs.iter().map(|p| p.1).collect();
        assert_eq!(rows.len(), a.pairs.len(), "{name}: a row used twice");
        assert_eq!(cols.len(), a.pairs.len(), "{name}: a column used twice");
        assert!(
            a.pairs.windows(2).all(|w| w[0].0 < w[1].0),
            "{name}: rows not sorted"
        );
        let want = case["total"].as_f64().expect("total");
        assert!(
            (a.total_cost - want).abs() <= 1e-9 * want.abs().max(1.0),
            "{name}: total {} vs scipy {want}",
            a.total_cost
        );
        let scipy_rows: Vec<u64> = case["row_ind"]
            .as_array()
            .expect("row_ind")
            .iter()
            .map(|x| x.as_u64().expect("u64"))
            .collect();
        assert_eq!(
            scipy_rows,
            a.pairs.iter().map(|p| p.0 as u64).collect::<Vec<_>>(),
            "{name}: matched rows"
        );
        // The same algorithm and tie-breaking as SciPy: the same optimum, even among equal ones.
        let scipy_cols: Vec<u64> = case["col_ind"]
            .as_array()
            .expect("col_ind")
            .iter()
            .map(|x| x.as_u64().expect("u64"))
            .collect();
        assert_eq!(
            scipy_cols,
            a.pairs.iter().map(|p| p.1 as u64).collect::<Vec<_>>(),
            "{name}: matched columns"
        );
    }
}

/// The least total over every way to give each row of the smaller side a distinct column.
fn brute_force_minimum(cost: &[f64], rows: usize, cols: usize) -> f64 {
    fn search(cost: &[f64], cols: usize, row: usize, rows: usize, used: &mut [bool]) -> f64 {
        if row == rows {
            return 0.0;
        }
        let mut best = f64::INFINITY;
        for c in 0..cols {
            if !used[c] {
                used[c] = true;
                let rest = search(cost, cols, row + 1, rows, used);
                best = best.min(cost[row * cols + c] + rest);
                used[c] = false;
            }
        }
        best
    }
    if rows <= cols {
        search(cost, cols, 0, rows, &mut vec![false; cols])
    } else {
        let transposed: Vec<f64> = (0..cols)
            .flat_map(|c| (0..rows).map(move |r| cost[r * cols + c]))
            .collect();
        search(&transposed, rows, 0, cols, &mut vec![false; rows])
    }
}

#[test]
fn optimal_against_brute_force_on_small_matrices_with_ties() {
    // Small integer costs make many equal optima: the paths' tie-breaking is exercised.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for case in 0..400 {
        let rows = 1 + (next() % 7) as usize;
        let cols = 1 + (next() % 7) as usize;
        let levels = if case % 2 == 0 { 4 } else { 1000 };
        let cost: Vec<f64> = (0..rows * cols)
            .map(|_| (next() % levels) as f64 - 2.0)
            .collect();
        let a = linear_sum_assignment(&cost, rows, cols).expect("solves");
        assert_eq!(a.pairs.len(), rows.min(cols));
        let mut used_rows = vec![false; rows];
        let mut used_cols = vec![false; cols];
        for &(r, c) in &a.pairs {
            assert!(
                !used_rows[r] && !used_cols[c],
                "{rows}x{cols}: reused index"
            );
            used_rows[r] = true;
            used_cols[c] = true;
        }
        let want = brute_force_minimum(&cost, rows, cols);
        assert_eq!(a.total_cost, want, "case {case}: {rows}x{cols} {cost:?}");
    }
}

#[test]
fn f32_costs_and_hand_cases() {
    // Greedy would take (0,0)=1 then (1,1)=10: total 11; the optimum is 2 + 3 = 5.
    let a = linear_sum_assignment(&[1.0f32, 2.0, 3.0, 10.0], 2, 2).expect("solves");
    assert_eq!(a.pairs, vec![(0, 1), (1, 0)]);
    assert_eq!(a.total_cost, 5.0);
    // Tall: 3 predictions, 1 target.
    let a = linear_sum_assignment(&[0.5f64, 0.1, 0.9], 3, 1).expect("solves");
    assert_eq!(a.pairs, vec![(1, 0)]);
    // Empty.
    assert!(linear_sum_assignment::<f64>(&[], 0, 5)
        .expect("solves")
        .pairs
        .is_empty());
    // Non-finite costs are rejected with the entry named.
    let err = linear_sum_assignment(&[1.0, f64::NAN, 0.0, 1.0], 2, 2)
        .expect_err("NaN")
        .to_string();
    assert!(err.contains("(0, 1)"), "{err}");
    // A tall matrix is solved transposed; the entry is still named in the caller's terms.
    let err = linear_sum_assignment(&[1.0, 2.0, 3.0, 4.0, f64::INFINITY, 6.0], 3, 2)
        .expect_err("infinite")
        .to_string();
    assert!(err.contains("(2, 0)"), "{err}");
    assert!(linear_sum_assignment(&[1.0, 2.0, 3.0], 2, 2).is_err());
}
