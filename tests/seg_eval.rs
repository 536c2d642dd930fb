//! mIoU against an independent numpy implementation of mmseg's IoUMetric (fixtures made by
//! tests/fixtures/make_fixtures.py).

use std::path::{Path, PathBuf};

use densekd::data::labelmap::{write_label_map, LabelMap};
use densekd::eval::seg::{evaluate_dirs, SegEvaluator};

fn cases() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/seg");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("tests/fixtures/seg exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.join("expected.json").exists())
        .collect();
    dirs.sort();
    assert!(
        dirs.len() >= 5,
        "expected at least 5 segmentation cases, found {}",
        dirs.len()
    );
    dirs
}

#[test]
fn miou_matches_reference() {
    for case in cases() {
        let want: serde_json::Value =
            serde_json::from_slice(&std::fs::read(case.join("expected.json")).expect("read"))
                .expect("json");
        let k = want["num_classes"].as_u64().expect("num_classes") as usize;
        let ignore = want["ignore_index"].as_u64().expect("ignore_index") as u8;
        let result = evaluate_dirs(&case.join("gt"), &case.join("pred"), k, ignore);
        if case.ends_with("gt_out_of_range") {
            // mmseg silently drops such pixels from the label histogram; a ground-truth label
            // outside 0..K is a dataset bug, so densekd stops with the file and pixel named.
            let err = result.expect_err("out-of-range ground truth").to_string();
            assert!(
                err.contains("gt/img_") && err.contains("pixel (") && err.contains("out of range"),
                "{err}"
            );
            continue;
        }
        let got = result.unwrap_or_else(|e| panic!("{}: {e}", case.display()));
        let close = |g: Option<f64>, w: &serde_json::Value, what: &str| match (g, w.as_f64()) {
            (Some(g), Some(w)) => assert!(
                (g - w).abs() <= 1e-9,
                "{}: {what} {g} vs {w}",
                case.display()
            ),
            (None, None) => {}
            (g, _) => panic!("{}: {what} {g:?} vs {w}", case.display()),
        };
        close(got.mIoU, &want["mIoU"], "mIoU");
        close(got.aAcc, &want["aAcc"], "aAcc");
        let ious = want["IoU"].as_array().expect("IoU list");
        assert_eq!(got.IoU.len(), ious.len(), "{}", case.display());
        for (c, (g, w)) in got.IoU.iter().zip(ious).enumerate() {
            close(*g, w, &format!("IoU[{c}]"));
        }
    }
}

#[test]
fn abstaining_predictions_count_as_misses() {
    let mut ev = SegEvaluator::new(2, 255);
    // gt: [0, 1, 1, 255]; pred: [0, 255, 7, 1]. Pixel 3 is ignored; pixels 1-2 abstain.
    ev.update(&[0, 1, 1, 255], &[0, 255, 7, 1], "inline")
        .expect("valid");
    let s = ev.stats();
    assert_eq!(s.IoU, vec![Some(1.0), Some(0.0)]);
    assert_eq!(s.mIoU, Some(0.5));
    assert_eq!(s.aAcc, Some(1.0 / 3.0));
}

#[test]
fn streaming_equals_one_shot_and_merge() {
    let gt: Vec<u8> = (0..64).map(|i| (i * 7 % 5) as u8).collect();
    let pred: Vec<u8> = (0..64).map(|i| (i * 3 % 5) as u8).collect();
    let mut whole = SegEvaluator::new(5, 255);
    whole.update(&gt, &pred, "all").expect("ok");
    let (mut a, mut b) = (SegEvaluator::new(5, 255), SegEvaluator::new(5, 255));
    a.update(&gt[..20], &pred[..20], "a").expect("ok");
    b.update(&gt[20..], &pred[20..], "b").expect("ok");
    a.merge(&b).expect("same settings");
    assert_eq!(a.stats(), whole.stats());
    assert!(a.merge(&SegEvaluator::new(4, 255)).is_err());
}

#[test]
fn bad_inputs_are_errors_naming_the_file() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (gt, pred) = (tmp.path().join("gt"), tmp.path().join("pred"));
    std::fs::create_dir_all(&gt).expect("mkdir");
    std::fs::create_dir_all(&pred).expect("mkdir");
    let map = |w, h, v| LabelMap::filled(w, h, v);
    write_label_map(&gt.join("a.png"), &map(4, 4, 1), false).expect("write");
    write_label_map(&gt.join("b.png"), &map(4, 4, 1), true).expect("write");
    write_label_map(&pred.join("a.png"), &map(4, 4, 1), false).expect("write");

    let err = evaluate_dirs(&gt, &pred, 3, 255)
        .expect_err("b has no prediction")
        .to_string();
    assert!(
        err.contains("b.png") && err.contains("no prediction"),
        "{err}"
    );

    write_label_map(&pred.join("b.png"), &map(5, 4, 1), false).expect("write");
    let err = evaluate_dirs(&gt, &pred, 3, 255)
        .expect_err("size mismatch")
        .to_string();
    assert!(err.contains("b.png") && err.contains("5x4"), "{err}");

    write_label_map(&pred.join("b.png"), &map(4, 4, 1), false).expect("write");
    let err = evaluate_dirs(&gt, &pred, 1, 255)
        .expect_err("gt label 1 with K = 1")
        .to_string();
    assert!(
        err.contains("a.png") && err.contains("label 1") && err.contains("pixel (0, 0)"),
        "{err}"
    );

    std::fs::write(gt.join("a.png"), b"not a png").expect("write");
    let err = evaluate_dirs(&gt, &pred, 3, 255)
        .expect_err("corrupt file")
        .to_string();
    assert!(err.contains("a.png"), "{err}");
}
