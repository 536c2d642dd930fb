//! Feature-distillation losses of the FCOS baselines against PyTorch
//! (`tests/fixtures/feature_kd.json`, made by `tests/fixtures/make_feature_kd_fixtures.py`):
//! values and student gradients of PKD and of FGFI's masked imitation.

use burn::tensor::{Tensor, TensorData};
use densekd::backend::Training;
use densekd::distill::fitnet::masked_imitation;
use densekd::distill::pkd::pearson_distillation;
use serde_json::Value;

type B = Training;

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/feature_kd.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json")
}

fn floats(v: &Value) -> Vec<f32> {
    v["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

fn tensor<const D: usize>(v: &Value) -> Tensor<B, D> {
    let shape: Vec<usize> = v["shape"]
        .as_array()
        .expect("shape")
        .iter()
        .map(|x| x.as_u64().expect("dim") as usize)
        .collect();
    let shape: [usize; D] = shape.try_into().expect("rank");
    Tensor::from_data(TensorData::new(floats(v), shape), &Default::default())
}

/// Checks a case's loss and student gradient; `loss` computes it from (student, teacher, case).
fn check(case: &Value, loss: impl Fn(Tensor<B, 4>, Tensor<B, 4>, &Value) -> Tensor<B, 1>) {
    let what = case["description"].as_str().unwrap_or("case");
    let student = tensor::<4>(&case["student"]).require_grad();
    let value = loss(student.clone(), tensor::<4>(&case["teacher"]), case);
    let expected = case["loss"].as_f64().expect("loss");
    let got = value.clone().into_scalar() as f64;
    assert!(
        (got - expected).abs() <= 1e-5 * expected.abs() + 1e-6,
        "{what}: {got} vs {expected}"
    );
    let grads = value.backward();
    let g: Vec<f32> = student
        .grad(&grads)
        .expect("gradient")
        .into_data()
        .to_vec()
        .expect("f32");
    let e = floats(&case["grad_student"]);
    let scale = e.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (i, (a, b)) in g.iter().zip(&e).enumerate() {
        assert!(
            (a - b).abs() <= 1e-4 * scale + 1e-6,
            "{what} grad[{i}]: {a} vs {b}"
        );
    }
}

#[test]
fn pkd_matches_mmrazor_formula() {
    let f = fixture();
    for case in f["pkd"].as_array().expect("cases") {
        check(case, |s, t, _| pearson_distillation(s, t));
    }
}

#[test]
fn masked_imitation_matches_fgfi_formula() {
    let f = fixture();
    for case in f["masked_mse"].as_array().expect("cases") {
        check(case, |s, t, c| {
            masked_imitation(s, t, tensor::<3>(&c["mask"]))
        });
    }
}
