//! FCOS against torchvision (`tests/fixtures/fcos.json`, made by
//! `tests/fixtures/make_fcos_fixtures.py`): the points (`AnchorGenerator`), the target
//! assignment, regression and centerness targets (`FCOS.compute_loss`), the three losses and
//! their input gradients (`FCOSHead.compute_loss`), class-aware NMS (`batched_nms`), and the
//! import of a torchvision FCOS checkpoint (`tests/fixtures/fcos_import/`, made by
//! `tests/fixtures/make_fcos_import_fixture.py`) whose forward pass must match torchvision's.

mod common;

use burn::tensor::{Tensor, TensorData};
use densekd::backend::{Inference, Training};
use densekd::model::backbone::{Arch, BackboneConfig};
use densekd::model::fcos::config::FcosLossConfig;
use densekd::model::fcos::loss::{fcos_loss, ImageBoxes};
use densekd::model::fcos::targets::{assign, centerness, encode, level_shapes, Points};
use densekd::model::fcos::FlatOutput;
use densekd::model::fcos::{FcosConfig, LevelOutput};
use densekd::model::layers::norm::NormKind;
use densekd::model::weights::{load_pytorch, LoadOptions};
use densekd::ops::nms::batched_nms;
use serde_json::Value;

type B = Training;

fn fixture() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/fcos.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json")
}

fn numbers(v: &Value) -> Vec<f64> {
    match v {
        Value::Array(items) => items.iter().flat_map(numbers).collect(),
        other => vec![other.as_f64().unwrap_or(f64::NAN)],
    }
}

fn boxes(v: &Value) -> Vec<[f64; 4]> {
    numbers(v)
        .chunks(4)
        .map(|c| [c[0], c[1], c[2], c[3]])
        .collect()
}

fn indices(v: &Value) -> Vec<i64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_i64().expect("integer"))
        .collect()
}

fn usizes(v: &Value) -> Vec<usize> {
    indices(v).into_iter().map(|i| i as usize).collect()
}

/// The fixture's pyramid and its images' boxes.
fn setup(t: &Value) -> (Points, Vec<ImageBoxes>) {
    let size = usizes(&t["image_size"]);
    let strides = usizes(&t["strides"]);
    let shapes: Vec<(usize, usize)> = t["level_shapes"]
        .as_array()
        .expect("shapes")
        .iter()
        .map(|s| {
            let s = usizes(s);
            (s[0], s[1])
        })
        .collect();
    assert_eq!(level_shapes((size[0], size[1]), &strides), shapes);
    let points = Points::new((size[0], size[1]), &shapes, &strides);
    let images = t["images"]
        .as_array()
        .expect("images")
        .iter()
        .map(|im| ImageBoxes {
            boxes: boxes(&im["boxes"]),
            classes: usizes(&im["labels"]),
        })
        .collect();
    (points, images)
}

#[test]
fn points_are_torchvision_anchor_centres() {
    let f = fixture();
    let (points, _) = setup(&f["targets"]);
    let anchors = boxes(&f["targets"]["anchors"]);
    assert_eq!(points.len(), anchors.len());
    for (p, a) in points.points.iter().zip(&anchors) {
        assert_eq!(
            [p.x, p.y, p.size],
            [(a[0] + a[2]) / 2.0, (a[1] + a[3]) / 2.0, a[2] - a[0]]
        );
    }
}

#[test]
fn assignment_and_targets_match_torchvision() {
    let f = fixture();
    let t = &f["targets"];
    let (points, images) = setup(t);
    let radius = t["center_sampling_radius"].as_f64().expect("radius");
    let mut positives = 0;
    for (i, image) in images.iter().enumerate() {
        let expected = indices(&t["matched_idxs"][i]);
        let got: Vec<i64> = assign(&points, &image.boxes, radius)
            .into_iter()
            .map(|m| m.map_or(-1, |j| j as i64))
            .collect();
        assert_eq!(got, expected, "image {i}");
        let reg = numbers(&t["reg_targets"][i]);
        let ctr = numbers(&t["centerness_targets"][i]);
        for (a, m) in got.iter().enumerate() {
            let Ok(j) = usize::try_from(*m) else { continue };
            positives += 1;
            let d = encode(&points.points[a], &image.boxes[j]);
            for (k, v) in d.iter().enumerate() {
                assert!((v - reg[a * 4 + k]).abs() < 1e-12, "image {i} point {a}");
            }
            assert!(
                (centerness(d) - ctr[a]).abs() < 1e-12,
                "image {i} point {a}"
            );
        }
    }
    assert_eq!(positives, 35);
}

/// A fixture tensor `[B, A, C]` as a leaf tracked for gradients.
fn leaf(v: &Value, c: usize) -> Tensor<B, 3> {
    let data: Vec<f32> = numbers(v).into_iter().map(|x| x as f32).collect();
    let (b, a) = (
        v.as_array().expect("batch").len(),
        v[0].as_array().expect("points").len(),
    );
    Tensor::from_data(TensorData::new(data, [b, a, c]), &Default::default()).require_grad()
}

fn assert_close(got: &[f32], expected: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), expected.len(), "{what}");
    let scale = expected.iter().fold(0f64, |m, v| m.max(v.abs()));
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        assert!(
            (*g as f64 - e).abs() <= tol * scale.max(1e-12),
            "{what}[{i}]: {g} vs {e}"
        );
    }
}

#[test]
fn losses_and_gradients_match_torchvision() {
    let f = fixture();
    let (points, images) = setup(&f["targets"]);
    let l = &f["loss"];
    let k = l["num_classes"].as_u64().expect("classes") as usize;
    let cls = leaf(&l["cls_logits"], k);
    let reg = leaf(&l["bbox_regression"], 4);
    let ctr = leaf(&l["bbox_ctrness"], 1);
    let [b, a, _] = ctr.dims();
    let out = FlatOutput {
        cls_logits: cls.clone(),
        bbox_reg: reg.clone(),
        centerness: ctr.clone().reshape([b, a]),
        level_shapes: Vec::new(),
    };
    let losses = fcos_loss(&out, &points, &images, &FcosLossConfig::default());
    assert_eq!(losses.positives, 35);
    let scalar = |t: &Tensor<B, 1>| t.clone().into_scalar() as f64;
    let expected = &l["losses"];
    for (name, got) in [
        ("classification", scalar(&losses.class)),
        ("bbox_regression", scalar(&losses.boxes)),
        ("bbox_ctrness", scalar(&losses.centerness)),
    ] {
        let e = expected[name].as_f64().expect("loss");
        assert!((got - e).abs() < 1e-5 * e.abs(), "{name}: {got} vs {e}");
    }
    let total = losses.class + losses.boxes + losses.centerness;
    let grads = total.backward();
    for (name, t) in [
        ("cls_logits", cls),
        ("bbox_regression", reg),
        ("bbox_ctrness", ctr),
    ] {
        let g = t.grad(&grads).expect("gradient");
        let g: Vec<f32> = g.into_data().to_vec().expect("f32");
        assert_close(&g, &numbers(&l["grads"][name]), 1e-4, name);
    }
}

#[test]
fn nms_matches_torchvision_batched_nms() {
    let f = fixture();
    for case in f["nms"].as_array().expect("cases") {
        let keep = batched_nms(
            &boxes(&case["boxes"]),
            &numbers(&case["scores"]),
            &usizes(&case["classes"]),
            case["iou_threshold"].as_f64().expect("threshold"),
        );
        assert_eq!(keep, usizes(&case["keep"]), "{}", case["description"]);
    }
}

/// A fixture tensor `{"shape", "data"}` on the inference backend.
#[test]
fn torchvision_fcos_checkpoint_imports_and_matches_its_outputs() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/fcos_import");
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{dir}/expected.json")).expect("fixture"),
    )
    .expect("json");
    // The checkpoint's architecture: a quarter-width ResNet-18 with one block per stage,
    // torchvision's FPN with P6/P7 at 32 channels and its FCOS head (4 convs, GroupNorm 32).
    let config = FcosConfig {
        backbone: BackboneConfig {
            arch: Arch::Resnet18,
            width: 0.25,
            norm: NormKind::Frozen,
            blocks: Some([1, 1, 1, 1]),
            output_stride: 32,
            last_conv: true,
            frozen_stages: 0,
            num_classes: None,
        },
        num_classes: 3,
        strides: vec![8, 16, 32, 64, 128],
        channels: 32,
        head_convs: 4,
        norm_groups: 32,
        prior_prob: 0.01,
    };
    let model = config
        .init::<Inference>(&Default::default())
        .expect("model");
    let options = LoadOptions {
        key_rules: model.torchvision_key_rules(),
        top_level_key: None,
        allow_partial: true,
    };
    let (model, report) = load_pytorch(
        model,
        std::path::Path::new(&format!("{dir}/fcos_tiny.pth")),
        &options,
    )
    .expect("import");
    // Every checkpoint tensor has its place; only the per-level scales, which torchvision's
    // FCOS does not have, keep their initial value of 1.
    assert!(report.unused.is_empty(), "unused: {:?}", report.unused);
    assert_eq!(report.missing, vec!["scales".to_string()]);
    assert_eq!(
        report.applied,
        expected["keys"].as_array().expect("keys").len()
    );

    let out = model.forward(common::fixture_tensor::<4>(&expected["image"]));
    for (level, (got, e)) in out
        .fpn
        .iter()
        .zip(expected["fpn"].as_array().expect("fpn"))
        .enumerate()
    {
        common::assert_fixture_close(got.clone(), e, &format!("P{}", level + 3));
    }
    let flat = LevelOutput::flatten(&out.levels);
    common::assert_fixture_close(flat.cls_logits, &expected["cls_logits"], "cls_logits");
    common::assert_fixture_close(
        flat.bbox_reg,
        &expected["bbox_regression"],
        "bbox_regression",
    );
    let [n, a] = flat.centerness.dims();
    common::assert_fixture_close(
        flat.centerness.reshape([n, a, 1]),
        &expected["bbox_ctrness"],
        "bbox_ctrness",
    );
}
