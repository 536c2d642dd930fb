//! The command line's output contracts and error reporting.

mod common;

use common::densekd;
use std::path::Path;

fn fixture(rel: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
        .display()
        .to_string()
}

#[test]
fn eval_coco_prints_summary_and_json() {
    let (gt, dt) = (
        fixture("coco/random_large/gt.json"),
        fixture("coco/random_large/dt.json"),
    );
    let (ok, stdout, stderr) = densekd(&["eval", "coco", "--gt", &gt, "--dt", &dt]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.lines().count(), 12);
    assert!(stdout
        .starts_with(" Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = "));

    let (ok, stdout, stderr) = densekd(&["eval", "coco", "--gt", &gt, "--dt", &dt, "--json"]);
    assert!(ok, "{stderr}");
    let got: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    let want: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fixture("coco/random_large/expected.json")).expect("read"),
    )
    .expect("json");
    for (k, v) in want["stats"].as_object().expect("stats") {
        let (g, w) = (
            got[k].as_f64().expect("key present"),
            v.as_f64().expect("number"),
        );
        assert!((g - w).abs() <= 1e-6, "{k}: {g} vs {w}");
    }
}

#[test]
fn eval_seg_prints_json_with_nulls() {
    let case = fixture("seg/absent_class");
    let want: serde_json::Value =
        serde_json::from_slice(&std::fs::read(format!("{case}/expected.json")).expect("read"))
            .expect("json");
    let k = want["num_classes"].to_string();
    let (ok, stdout, stderr) = densekd(&[
        "eval",
        "seg",
        "--gt",
        &format!("{case}/gt"),
        "--pred",
        &format!("{case}/pred"),
        "--num-classes",
        &k,
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let got: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert!(
        (got["mIoU"].as_f64().expect("mIoU") - want["mIoU"].as_f64().expect("mIoU")).abs() <= 1e-9
    );
    let ious = got["IoU"].as_array().expect("IoU");
    assert!(
        ious.iter().any(|v| v.is_null()),
        "an absent class is null: {ious:?}"
    );
}

#[test]
fn errors_exit_nonzero_with_file_named() {
    let (ok, _, stderr) = densekd(&[
        "eval",
        "coco",
        "--gt",
        "/nonexistent/gt.json",
        "--dt",
        "x.json",
    ]);
    assert!(!ok);
    assert!(stderr.contains("error: /nonexistent/gt.json"), "{stderr}");
    let (ok, _, stderr) = densekd(&["data", "synth", "--out", "/tmp/unused", "--size", "4"]);
    assert!(!ok);
    assert!(
        stderr.contains("synth") && stderr.contains("size"),
        "{stderr}"
    );
}

#[test]
fn data_check_reports_skipped_annotations() {
    let tmp = tempfile::tempdir().expect("tmp");
    let json = tmp.path().join("x.json");
    std::fs::write(
        &json,
        r#"{"images":[{"id":1,"file_name":"a.png","width":10,"height":10}],"categories":[{"id":1,"name":"a"}],
           "annotations":[{"id":5,"image_id":1,"category_id":1,"bbox":[1,1,-2,3]}]}"#,
    )
    .expect("write");
    let path = json.display().to_string();
    let (ok, stdout, stderr) = densekd(&["data", "check", "--coco", &path]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("0 usable annotations") && stderr.contains("annotations[0].bbox"),
        "{stdout}{stderr}"
    );
    let (ok, _, stderr) = densekd(&["data", "check", "--coco", &path, "--policy", "reject"]);
    assert!(!ok && stderr.contains("annotations[0].bbox"), "{stderr}");
}
