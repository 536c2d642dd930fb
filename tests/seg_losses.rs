//! Segmentation losses and distillation terms against PyTorch (`tests/fixtures/seg_losses.json`,
//! made by `tests/fixtures/make_seg_fixtures.py`): values and input gradients of the pixel
//! cross-entropy (ignore index, class weights, upsampling), pixel-wise KD, CWD, RDD's TFE map and
//! loss, and RDD's TSE masks (OHEM threshold with `min_kept`) and loss, ported from the
//! official code.

use burn::tensor::{Tensor, TensorData};
use densekd::backend::Training;
use densekd::distill::cwd::channel_wise_divergence;
use densekd::distill::pixel_kd::pixel_kd;
use densekd::distill::rdd::{
    tfe_head_loss, tfe_weights, tse_head_loss, tse_mask, RddConfig, TfeDivergence,
};
use densekd::model::deeplabv3::loss::SegLossConfig;
use densekd::ops::pixel::{hard_pixels, PixelLabels};
use serde_json::Value;

type B = Training;

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/seg_losses.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json")
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

fn shape<const D: usize>(v: &Value) -> [usize; D] {
    let s: Vec<usize> = v["shape"]
        .as_array()
        .expect("shape")
        .iter()
        .map(|x| x.as_u64().expect("dim") as usize)
        .collect();
    s.try_into().expect("rank")
}

/// A leaf tensor from a fixture entry, tracked for gradients.
fn leaf(v: &Value) -> Tensor<B, 4> {
    Tensor::from_data(
        TensorData::new(floats(&v["data"]), shape::<4>(v)),
        &Default::default(),
    )
    .require_grad()
}

fn labels(v: &Value) -> PixelLabels<B> {
    let data: Vec<u8> = v["data"]
        .as_array()
        .expect("labels")
        .iter()
        .map(|x| x.as_u64().expect("label") as u8)
        .collect();
    PixelLabels::new(data, shape::<3>(v), 255, &Default::default())
}

fn weights(v: &Value) -> Option<Vec<f64>> {
    v.as_array()
        .map(|w| w.iter().map(|x| x.as_f64().expect("weight")).collect())
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{what}[{i}]: {g} vs {w}"
        );
    }
}

/// The loss's value and the gradient of `input`, against the case's `loss` and `grad`.
fn check(what: &str, loss: Tensor<B, 1>, input: &Tensor<B, 4>, case: &Value) {
    let value = loss.clone().into_data().to_vec::<f32>().expect("f32")[0];
    assert_close(
        what,
        &[value],
        &[case["loss"].as_f64().expect("loss") as f32],
        1e-5,
    );
    let grads = loss.backward();
    let grad = input.grad(&grads).expect("gradient");
    assert_close(
        &format!("{what} gradient"),
        &grad.into_data().to_vec::<f32>().expect("f32"),
        &floats(&case["grad"]),
        1e-5,
    );
}

#[test]
fn pixel_cross_entropy_matches_pytorch() {
    for case in fixture()["cross_entropy"].as_array().expect("cases") {
        let name = case["name"].as_str().expect("name");
        let logits = leaf(&case["logits"]);
        let config = SegLossConfig {
            class_weights: weights(&case["class_weights"]),
            ..SegLossConfig::default()
        };
        let loss = config.head_loss(logits.clone(), &labels(&case["labels"]));
        check(name, loss, &logits, case);
    }
}

#[test]
fn pixel_kd_matches_pytorch() {
    for case in fixture()["kd"].as_array().expect("cases") {
        let (s, t) = (leaf(&case["student"]), leaf(&case["teacher"]).detach());
        let loss = pixel_kd(s.clone(), t, case["temperature"].as_f64().expect("T"));
        check(case["name"].as_str().expect("name"), loss, &s, case);
    }
}

#[test]
fn channel_wise_divergence_matches_pytorch() {
    for case in fixture()["cwd"].as_array().expect("cases") {
        let (s, t) = (leaf(&case["student"]), leaf(&case["teacher"]).detach());
        let loss = channel_wise_divergence(s.clone(), t, case["temperature"].as_f64().expect("T"));
        check(case["name"].as_str().expect("name"), loss, &s, case);
    }
}

#[test]
fn rdd_tfe_weights_and_loss_match_the_official_code() {
    let case = &fixture()["tfe"];
    let labels = labels(&case["labels"]);
    let [_, h, w] = labels.shape;
    let rd = tfe_weights(
        leaf(&case["teacher_main"]).detach(),
        leaf(&case["teacher_aux"]).detach(),
        TfeDivergence::AuxMain,
        [h, w],
    );
    assert_close(
        "RD map",
        &rd.clone().into_data().to_vec::<f32>().expect("f32"),
        &floats(&case["rd"]),
        1e-5,
    );
    let student = leaf(&case["student"]);
    check(
        "TFE",
        tfe_head_loss(student.clone(), &labels, rd.clone()),
        &student,
        case,
    );

    // The paper's direction gives another map.
    let paper = tfe_weights(
        leaf(&case["teacher_main"]).detach(),
        leaf(&case["teacher_aux"]).detach(),
        TfeDivergence::MainAux,
        [h, w],
    );
    let diff: f32 = (paper - rd).abs().max().into_scalar();
    assert!(diff > 1e-3, "KL directions gave the same map");
}

fn bits(v: &Value) -> Vec<bool> {
    v.as_array()
        .expect("mask")
        .iter()
        .map(|x| x.as_u64().expect("bit") == 1)
        .collect()
}

/// Ground-truth-class probabilities of logits at the labels' resolution.
fn gt_probs(logits: Tensor<B, 4>, labels: &PixelLabels<B>) -> Vec<f32> {
    densekd::ops::pixel::pixel_cross_entropy(logits, labels)
        .neg()
        .exp()
        .into_data()
        .to_vec::<f32>()
        .expect("f32")
}

#[test]
fn rdd_tse_masks_and_loss_match_the_official_code() {
    for case in fixture()["tse"].as_array().expect("cases") {
        let name = case["name"].as_str().expect("name");
        let labels = labels(&case["labels"]);
        let (student, teacher) = (leaf(&case["student"]), leaf(&case["teacher"]).detach());
        let pixels = labels.labels.len();
        let min_kept = case["min_kept"].as_u64().expect("min_kept") as usize;
        let config = RddConfig {
            threshold: case["threshold"].as_f64().expect("threshold"),
            min_kept_fraction: min_kept as f64 / pixels as f64,
            ..RddConfig::default()
        };
        assert_eq!(config.min_kept(pixels), min_kept);
        let (ps, pt) = (
            gt_probs(student.clone().detach(), &labels),
            gt_probs(teacher.clone(), &labels),
        );
        let valid = labels.valid();
        let t = config.threshold as f32;
        assert_eq!(
            hard_pixels(&ps, &valid, t, min_kept),
            bits(&case["student_hard"]),
            "{name}: student's hard pixels"
        );
        assert_eq!(
            hard_pixels(&pt, &valid, t, min_kept),
            bits(&case["teacher_hard"]),
            "{name}: teacher's hard pixels"
        );
        assert_eq!(
            tse_mask(&ps, &pt, &valid, &config),
            bits(&case["mask"]),
            "{name}: XOR mask"
        );
        let class_weights = weights(&case["class_weights"]);
        let (loss, kept) = tse_head_loss(
            student.clone(),
            teacher,
            &labels,
            class_weights.as_deref(),
            &config,
        );
        let masked = bits(&case["mask"]).iter().filter(|&&m| m).count();
        let labelled = valid.iter().filter(|&&v| v > 0.0).count();
        assert!(
            (kept - masked as f64 / labelled as f64).abs() < 1e-12,
            "{name}"
        );
        check(name, loss, &student, case);
    }
}
