//! Box overlaps and focal loss against independent float64 references
//! (tests/fixtures/boxes.json, made by tests/fixtures/make_fixtures.py), values and gradients.

use burn::tensor::{Tensor, TensorData};
use densekd::backend::{device, Inference, Training};

use densekd::ops::boxes::*;
use densekd::ops::losses::sigmoid_focal_loss;
use serde_json::Value;

fn fixture() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/boxes.json");
    serde_json::from_slice(&std::fs::read(path).expect("read")).expect("json")
}

fn matrix(v: &Value) -> (Vec<f32>, [usize; 2]) {
    let rows = v.as_array().expect("rows");
    let cols = rows.first().map_or(0, |r| r.as_array().expect("row").len());
    let flat = rows
        .iter()
        .flat_map(|r| {
            r.as_array()
                .expect("row")
                .iter()
                .map(|x| x.as_f64().expect("number") as f32)
        })
        .collect();
    (flat, [rows.len(), cols])
}

fn tensor<B: burn::tensor::backend::Backend>(v: &Value) -> Tensor<B, 2> {
    let (data, shape) = matrix(v);
    Tensor::from_data(TensorData::new(data, shape), &Default::default())
}

fn assert_all_close(got: Vec<f32>, want: Vec<f32>, tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= tol * w.abs().max(1.0),
            "{what}[{i}]: {g} vs {w}"
        );
    }
}

fn values<B: burn::tensor::backend::Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().expect("f32 data")
}

#[test]
fn pairwise_iou_and_giou_match_reference() {
    let f = fixture();
    let pairs = f["pairs"].as_array().expect("pairs");
    assert!(!pairs.is_empty());
    for p in pairs {
        let a = tensor::<Inference>(&p["boxes1"]);
        let b = tensor::<Inference>(&p["boxes2"]);
        // f32 coordinates lose precision in `x1 - x0` when boxes are far from the origin relative
        // to their size; the tolerance follows that conditioning (f32 epsilon × |coord| / extent).
        let coords: Vec<f32> = [&p["boxes1"], &p["boxes2"]]
            .iter()
            .flat_map(|m| matrix(m).0)
            .collect();
        let extents: Vec<f32> = coords
            .chunks(4)
            .flat_map(|b| [b[2] - b[0], b[3] - b[1]])
            .collect();
        let max_coord = coords.iter().fold(0f32, |m, c| m.max(c.abs()));
        let min_extent = extents.iter().fold(f32::INFINITY, |m, e| m.min(*e));
        let tol = 1e-5 + 8.0 * f32::EPSILON * max_coord / min_extent;
        let name = p["name"].as_str().unwrap_or("?");
        assert_all_close(
            values(box_iou(a.clone(), b.clone())),
            matrix(&p["iou"]).0,
            tol,
            &format!("iou {name}"),
        );
        assert_all_close(
            values(generalized_box_iou(a, b)),
            matrix(&p["giou"]).0,
            tol,
            &format!("giou {name}"),
        );
    }
}

#[test]
fn giou_loss_gradient_matches_reference() {
    let f = fixture();
    let cases = match &f["giou_grad"] {
        Value::Array(list) => list.clone(),
        one => vec![one.clone()],
    };
    for (i, case) in cases.iter().enumerate() {
        let a = tensor::<Training>(&case["boxes1"]).require_grad();
        let b = tensor::<Training>(&case["boxes2"]);
        let loss = paired_generalized_box_iou(a.clone(), b)
            .neg()
            .add_scalar(1.0)
            .sum();
        let grads = loss.backward();
        let want_loss = case["loss"].as_f64().expect("loss") as f32;
        assert_all_close(
            values(loss.inner()),
            vec![want_loss],
            1e-5,
            &format!("giou loss {i}"),
        );
        let grad = a.grad(&grads).expect("gradient w.r.t. boxes1");
        assert_all_close(
            values(grad),
            matrix(&case["grad_boxes1"]).0,
            1e-3,
            &format!("giou grad {i}"),
        );
    }
}

#[test]
fn focal_loss_and_gradient_match_reference() {
    let f = fixture();
    let cases = f["focal"].as_array().expect("focal");
    assert!(cases.len() >= 3);
    for (i, case) in cases.iter().enumerate() {
        let x = tensor::<Training>(&case["logits"]).require_grad();
        let t = tensor::<Training>(&case["targets"]);
        let (alpha, gamma) = (
            case["alpha"].as_f64().expect("alpha"),
            case["gamma"].as_f64().expect("gamma"),
        );
        let loss = sigmoid_focal_loss(x.clone(), t, alpha, gamma).sum();
        let grads = loss.backward();
        let want = case["loss_sum"].as_f64().expect("loss_sum") as f32;
        let got = values(loss.inner());
        assert!(got[0].is_finite(), "case {i}: loss not finite");
        assert_all_close(got, vec![want], 1e-4, &format!("focal sum {i}"));
        let grad = values(x.grad(&grads).expect("gradient"));
        assert!(
            grad.iter().all(|g| g.is_finite()),
            "case {i}: gradient not finite"
        );
        assert_all_close(
            grad,
            matrix(&case["grad_logits"]).0,
            1e-4,
            &format!("focal grad {i}"),
        );
    }
}

#[test]
fn format_conversions_round_trip() {
    let b = [10.0, 20.0, 30.0, 40.0];
    assert_eq!(xywh_to_xyxy(b), [10.0, 20.0, 40.0, 60.0]);
    assert_eq!(xyxy_to_xywh(xywh_to_xyxy(b)), b);
    assert_eq!(
        cxcywh_to_xyxy([25.0, 40.0, 30.0, 40.0]),
        [10.0, 20.0, 40.0, 60.0]
    );
    assert_eq!(
        xyxy_to_cxcywh([10.0, 20.0, 40.0, 60.0]),
        [25.0, 40.0, 30.0, 40.0]
    );

    let t: Tensor<Inference, 2> = Tensor::from_data(
        TensorData::new(vec![0.5f32, 0.5, 0.2, 0.4, 0.1, 0.9, 0.2, 0.2], [2, 4]),
        &device(),
    );
    let xyxy = box_cxcywh_to_xyxy(t.clone());
    assert_all_close(
        values(xyxy.clone()),
        vec![0.4, 0.3, 0.6, 0.7, 0.0, 0.8, 0.2, 1.0],
        1e-6,
        "cxcywh->xyxy",
    );
    assert_all_close(
        values(box_xyxy_to_cxcywh(xyxy.clone())),
        values(t),
        1e-6,
        "round trip",
    );
    assert_all_close(values(box_area(xyxy)), vec![0.08, 0.04], 1e-6, "area");
}
