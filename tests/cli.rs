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
        stdout.contains("0 usable annotations (1 skipped)")
            && stderr.contains("skipped 1 of 1 annotations: annotations[0].bbox"),
        "{stdout}{stderr}"
    );
    let (ok, _, stderr) = densekd(&["data", "check", "--coco", &path, "--policy", "reject"]);
    assert!(!ok && stderr.contains("annotations[0].bbox"), "{stderr}");
}

/// A one-line COCO file: images 1 and 2 (10x10), category 1, and `annotations` (JSON objects).
fn coco_json(dir: &Path, name: &str, annotations: &[String]) -> String {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            r#"{{"images":[{{"id":1,"file_name":"a.png","width":10,"height":10}},{{"id":2,"file_name":"b.png","width":10,"height":10}}],"categories":[{{"id":1,"name":"a"}}],"annotations":[{}]}}"#,
            annotations.join(",")
        ),
    )
    .expect("write");
    path.display().to_string()
}

/// An annotation with `id` on image 1 and this `bbox` (JSON text).
fn ann(id: u64, bbox: &str) -> String {
    format!(r#"{{"id":{id},"image_id":1,"category_id":1,"bbox":{bbox}}}"#)
}

/// A results file with the given detections (JSON objects).
fn results_json(dir: &Path, name: &str, detections: &[&str]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("[{}]", detections.join(","))).expect("write");
    path.display().to_string()
}

const DET: &str = r#"{"image_id":1,"category_id":1,"bbox":[1,1,4,4],"score":0.9}"#;

#[test]
fn json_errors_name_the_record_and_its_annotation_id() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut anns: Vec<String> = (0..20).map(|i| ann(100 + i, "[1,1,4,4]")).collect();
    anns[17] = ann(117, "[1,1,4]");
    let gt = coco_json(tmp.path(), "gt.json", &anns);
    let (ok, _, stderr) = densekd(&["data", "check", "--coco", &gt]);
    assert!(!ok);
    assert!(
        stderr.contains("gt.json: annotations[17].bbox: invalid length 3")
            && stderr.contains("(annotation id 117)"),
        "{stderr}"
    );
    anns[17] = r#"{"id":117,"image_id":"one","category_id":1,"bbox":[1,1,4,4]}"#.to_string();
    let gt = coco_json(tmp.path(), "gt2.json", &anns);
    let (ok, _, stderr) = densekd(&["eval", "coco", "--gt", &gt, "--dt", &gt]);
    assert!(!ok);
    assert!(
        stderr.contains("gt2.json: annotations[17].image_id: invalid type")
            && stderr.contains("(annotation id 117)"),
        "{stderr}"
    );

    let gt = coco_json(tmp.path(), "ok.json", &anns[..1]);
    let dt = results_json(
        tmp.path(),
        "dt.json",
        &[
            DET,
            r#"{"image_id":1,"category_id":1,"bbox":[1,1,4,4],"score":"high"}"#,
        ],
    );
    let (ok, _, stderr) = densekd(&["eval", "coco", "--gt", &gt, "--dt", &dt]);
    assert!(!ok);
    assert!(
        stderr.contains("dt.json: [1].score: invalid type"),
        "{stderr}"
    );
}

#[test]
fn out_of_range_boxes_are_skipped_or_rejected_and_scores_are_errors() {
    let tmp = tempfile::tempdir().expect("tmp");
    let anns = [
        ann(1, "[1,1,4,4]"),
        ann(7, "[1e999, 2, 3, 4]"),
        ann(8, "[1, -1E+400, 3, 4]"),
    ];
    let gt = coco_json(tmp.path(), "gt.json", &anns);
    let (ok, stdout, stderr) = densekd(&["data", "check", "--coco", &gt]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("1 usable annotations (2 skipped)")
            && stderr.contains("skipped 2 of 3 annotations: annotations[1].bbox: [inf, 2.0")
            && stderr.contains("(annotation id 7); annotations[2].bbox: [1.0, -inf")
            && stderr.contains("(annotation id 8)"),
        "{stdout}{stderr}"
    );
    let (ok, _, stderr) = densekd(&["data", "check", "--coco", &gt, "--policy", "reject"]);
    assert!(!ok);
    assert!(
        stderr.contains("gt.json: annotations[1].bbox: [inf, 2.0, 3.0, 4.0] has a non-finite value (annotation id 7)"),
        "{stderr}"
    );

    let dt = results_json(
        tmp.path(),
        "dt.json",
        &[
            DET,
            r#"{"image_id":1,"category_id":1,"bbox":[1,1,4,4],"score":1e999}"#,
        ],
    );
    let (ok, _, stderr) = densekd(&["eval", "coco", "--gt", &gt, "--dt", &dt]);
    assert!(!ok);
    assert!(
        stderr.contains("dt.json: [1].score: inf is not finite"),
        "{stderr}"
    );
    // Only a record's bbox, area and score may be non-finite; elsewhere it names the field.
    let bad = tmp.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"{"images":[{"id":1,"file_name":"a.png","width":1e999,"height":10}],"categories":[],"annotations":[]}"#,
    )
    .expect("write");
    let (ok, _, stderr) = densekd(&["data", "check", "--coco", &bad.display().to_string()]);
    assert!(!ok);
    assert!(
        stderr.contains("bad.json: images[0].width: 1e999 is not a finite number"),
        "{stderr}"
    );
}

#[test]
fn missing_or_empty_lists_are_errors_naming_the_key() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dt = results_json(tmp.path(), "dt.json", &[DET]);
    let cases = [
        ("{}", "images: missing"),
        (
            r#"{"images":[{"id":1,"width":4,"height":4}],"categories":[{"id":1,"name":"a"}]}"#,
            "annotations: missing",
        ),
        (
            r#"{"images":[{"id":1,"width":4,"height":4}],"annotations":[]}"#,
            "categories: missing",
        ),
        (
            r#"{"images":[],"annotations":[],"categories":[{"id":1,"name":"a"}]}"#,
            "images: empty",
        ),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let gt = tmp.path().join(format!("gt{i}.json"));
        std::fs::write(&gt, text).expect("write");
        let gt = gt.display().to_string();
        let (ok, stdout, stderr) = densekd(&["data", "check", "--coco", &gt]);
        assert!(!ok, "{stdout}");
        assert!(
            stderr.contains(&format!("gt{i}.json: {needle}")),
            "{stderr}"
        );
        let (ok, stdout, stderr) = densekd(&["eval", "coco", "--gt", &gt, "--dt", &dt]);
        assert!(!ok, "{stdout}");
        assert!(
            stderr.contains(&format!("gt{i}.json: {needle}")),
            "{stderr}"
        );
    }
    // No detections at all is a valid (if poor) result.
    let gt = coco_json(tmp.path(), "gt.json", &[ann(1, "[1,1,4,4]")]);
    let empty = results_json(tmp.path(), "empty.json", &[]);
    let (ok, stdout, stderr) = densekd(&["eval", "coco", "--gt", &gt, "--dt", &empty, "--json"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains(r#""AP":0.0"#), "{stdout}");
}

#[test]
fn skipped_annotations_are_counted_alike_by_check_eval_and_train() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut anns: Vec<String> = (0..8).map(|i| ann(i, "[1,1,0,4]")).collect();
    anns.push(r#"{"id":50,"image_id":99,"category_id":1,"bbox":[1,1,4,4]}"#.to_string());
    anns.push(r#"{"id":51,"image_id":1,"category_id":42,"bbox":[1,1,4,4]}"#.to_string());
    anns.push(ann(52, "[1,1,4,4]"));
    let gt = coco_json(tmp.path(), "gt.json", &anns);
    let summary =
        "skipped 10 of 11 annotations: first 5: annotations[0].bbox: [1.0, 1.0, 0.0, 4.0] \
                   has width or height <= 0 (annotation id 0); annotations[1].bbox";
    let (ok, _, stderr) = densekd(&["data", "check", "--coco", &gt]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains(summary), "{stderr}");
    assert!(
        !stderr.contains("annotations[5]"),
        "only the first 5 are named: {stderr}"
    );

    let dt = results_json(tmp.path(), "dt.json", &[DET]);
    let (ok, _, stderr) = densekd(&["eval", "coco", "--gt", &gt, "--dt", &dt]);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("gt.json: 10 of 11 annotations are unusable")
            && stderr.contains("first 5: annotations[0].bbox"),
        "{stderr}"
    );
    let (ok, _, stderr) = densekd(&[
        "eval", "coco", "--gt", &gt, "--dt", &dt, "--policy", "reject",
    ]);
    assert!(!ok);
    assert!(stderr.contains("gt.json: annotations[0].bbox"), "{stderr}");

    // Training reads the data before building the model; a class-count mismatch stops it right
    // after the warnings, a rejecting policy before them.
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/fcos_shapes.toml");
    let config = config.display().to_string();
    let out = tmp.path().join("run").display().to_string();
    let sets = [
        format!("data.coco.train_json={gt:?}"),
        format!("data.coco.val_json={gt:?}"),
        format!(
            "data.coco.train_images={:?}",
            tmp.path().display().to_string()
        ),
        format!(
            "data.coco.val_images={:?}",
            tmp.path().display().to_string()
        ),
        "backbone_weights=".to_string(),
    ];
    let mut args = vec!["train", &config, "--out", &out];
    for s in &sets {
        args.extend(["--set", s]);
    }
    let (ok, _, stderr) = densekd(&args);
    assert!(!ok);
    assert!(
        stderr.contains("warning: ") && stderr.contains(summary) && stderr.contains("num_classes"),
        "{stderr}"
    );
    args.extend(["--set", "data.coco.policy=\"reject\""]);
    let (ok, _, stderr) = densekd(&args);
    assert!(!ok);
    assert!(
        stderr.contains("gt.json: annotations[0].bbox") && !stderr.contains("warning: "),
        "{stderr}"
    );
}

#[test]
fn duplicate_gt_image_ids_blame_the_ground_truth() {
    let tmp = tempfile::tempdir().expect("tmp");
    let gt = tmp.path().join("gt.json");
    std::fs::write(
        &gt,
        r#"{"images":[{"id":1,"file_name":"a.png","width":10,"height":10},{"id":1,"file_name":"b.png","width":10,"height":10}],
           "categories":[{"id":1,"name":"a"}],"annotations":[]}"#,
    )
    .expect("write");
    let dt = results_json(tmp.path(), "dt.json", &[DET]);
    let gt = gt.display().to_string();
    let (ok, _, stderr) = densekd(&["eval", "coco", "--gt", &gt, "--dt", &dt]);
    assert!(!ok);
    assert!(
        stderr.contains("gt.json: images[1].id: duplicate image id 1")
            && !stderr.contains("dt.json"),
        "{stderr}"
    );
}

#[test]
fn eval_coco_accepts_ground_truth_without_image_sizes() {
    // pycocotools needs no `width` / `height`; the shared GT check must not demand them.
    let tmp = tempfile::tempdir().expect("tmp");
    let gt = tmp.path().join("gt.json");
    let dt = tmp.path().join("dt.json");
    std::fs::write(
        &gt,
        r#"{"images":[{"id":1,"file_name":"a.png"}],"categories":[{"id":1,"name":"a"}],
           "annotations":[{"id":1,"image_id":1,"category_id":1,"bbox":[10,10,20,20],"area":400,"iscrowd":0}]}"#,
    )
    .expect("gt");
    std::fs::write(
        &dt,
        r#"[{"image_id":1,"category_id":1,"bbox":[10,10,20,20],"score":0.9}]"#,
    )
    .expect("dt");
    let (ok, stdout, stderr) = densekd(&[
        "eval",
        "coco",
        "--gt",
        &gt.display().to_string(),
        "--dt",
        &dt.display().to_string(),
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let stats: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    assert!(
        (stats["AP"].as_f64().expect("AP") - 1.0).abs() < 1e-9,
        "{stdout}"
    );
}
