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
    assert!(linear_sum_assignment(&[1.0, 2.0, 3.0], 2, 2).is_err());
}
