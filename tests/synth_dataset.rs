//! The built-in dataset written to disk: readable by our readers and by pycocotools, perfect
//! when evaluated against itself, and deterministic.

use std::path::{Path, PathBuf};
use std::process::Command;

use densekd::data::coco::{read_dataset, CocoDataset, InvalidPolicy};
use densekd::data::export::{self_check, synth_coco, write_split, SplitSummary};
use densekd::data::synth::{Split, SynthConfig, NUM_CLASSES};

fn write(dir: &Path, seed: u64, train: usize, val: usize) -> (SplitSummary, SplitSummary) {
    let cfg = SynthConfig {
        seed,
        ..SynthConfig::default()
    };
    (
        write_split(dir, &cfg, Split::Train, train).expect("train split"),
        write_split(dir, &cfg, Split::Val, val).expect("val split"),
    )
}

#[test]
fn written_dataset_is_complete_and_perfect_against_itself() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (train, val) = write(tmp.path(), 3, 12, 40);
    assert_eq!((train.images, val.images), (12, 40));
    assert!(val.objects >= 40, "at least one object per image");
    for split in ["train", "val"] {
        let json = tmp
            .path()
            .join(format!("annotations/instances_{split}.json"));
        let ds = CocoDataset::load(&json, InvalidPolicy::Reject).expect("valid COCO");
        assert!(ds.warnings.is_empty(), "{:?}", ds.warnings);
        assert_eq!(ds.num_classes(), NUM_CLASSES);
        for img in &ds.images {
            assert!(tmp
                .path()
                .join("images")
                .join(split)
                .join(&img.file_name)
                .exists());
            assert!(tmp
                .path()
                .join("labels")
                .join(split)
                .join(&img.file_name)
                .exists());
        }
    }
    let (coco, seg) = self_check(tmp.path(), Split::Val).expect("self-check runs");
    assert!((coco.AP - 1.0).abs() < 1e-12, "AP {}", coco.AP);
    assert!((coco.AR100 - 1.0).abs() < 1e-12, "AR {}", coco.AR100);
    assert_eq!(seg.mIoU, Some(1.0));

    // The in-memory ground truth used by training equals the written file.
    let written = read_dataset(&tmp.path().join("annotations/instances_val.json")).expect("reads");
    let memory = synth_coco(
        &SynthConfig {
            seed: 3,
            ..SynthConfig::default()
        },
        Split::Val,
        40,
    )
    .expect("builds");
    assert_eq!(
        serde_json::to_value(&written.annotations).expect("json"),
        serde_json::to_value(&memory.annotations).expect("json")
    );
}

#[test]
fn same_seed_same_bytes_other_seed_other_data() {
    let (a, b, c) = (
        tempfile::tempdir().expect("tmp"),
        tempfile::tempdir().expect("tmp"),
        tempfile::tempdir().expect("tmp"),
    );
    write(a.path(), 7, 3, 3);
    write(b.path(), 7, 3, 3);
    write(c.path(), 8, 3, 3);
    for rel in [
        "images/train/000002.png",
        "labels/val/000001.png",
        "annotations/instances_val.json",
    ] {
        let read = |d: &Path| std::fs::read(d.join(rel)).expect("file exists");
        assert_eq!(read(a.path()), read(b.path()), "{rel}");
        assert_ne!(read(a.path()), read(c.path()), "{rel}");
    }
}

fn python() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("DENSEKD_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    venv.exists().then_some(venv)
}

#[test]
fn pycocotools_reads_the_written_dataset() {
    let Some(python) = python() else {
        // Developers without the reference venv skip; CI (which creates it) must not.
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must provide .venv with pycocotools (see .ci/run)"
        );
        eprintln!("skipped: no .venv/bin/python; run .ci/run or set DENSEKD_PYTHON");
        return;
    };
    let tmp = tempfile::tempdir().expect("tmp");
    write(tmp.path(), 11, 10, 25);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/check_pycocotools.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(tmp.path())
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pycocotools check failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().expect("a report line");
    let report: serde_json::Value = serde_json::from_str(last).expect("json report");
    assert_eq!(report["val"]["images"], 25);
    assert_eq!(report["train"]["images"], 10);
}
