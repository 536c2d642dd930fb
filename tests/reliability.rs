//! Faults a user meets at the command line, each with what must happen now: the smoke configs
//! train end to end with readable progress; diverged training stops before the optimiser step
//! and keeps the last good checkpoint; damaged checkpoints, images and inputs are refused with
//! the file named; partial failures keep the good results; resumes are checked and keep the log.

mod common;

use std::path::Path;

use common::densekd;

fn config(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("configs")
        .join(name)
        .display()
        .to_string()
}

/// `densekd train CONFIG --out DIR ARGS…`: (success, stdout, stderr).
fn train(config_name: &str, dir: &Path, args: &[&str]) -> (bool, String, String) {
    let (cfg, out) = (config(config_name), dir.display().to_string());
    let mut all = vec!["train", cfg.as_str(), "--out", out.as_str()];
    all.extend(args);
    densekd(&all)
}

#[test]
fn smoke_configs_train_with_progress_lines_and_their_run_folder() {
    let tmp = tempfile::tempdir().expect("tmp");
    for name in ["detr_smoke.toml", "fcos_smoke.toml", "deeplabv3_smoke.toml"] {
        let dir = tmp.path().join(name);
        let (ok, _, stderr) = train(name, &dir, &[]);
        assert!(ok, "{name}: {stderr}");
        // No terminal here: a line per logged step, and the run folder at start and end.
        assert!(stderr.contains("step 1/8 loss "), "{name}: {stderr}");
        assert!(stderr.contains("steps/s ETA"), "{name}: {stderr}");
        let folder = dir.display().to_string();
        assert!(
            stderr.contains(&format!("training 8 steps into {folder}"))
                && stderr.contains(&format!("finished {folder}")),
            "{name}: {stderr}"
        );
        assert!(dir.join("model.safetensors").exists(), "{name}");
    }
}

#[test]
fn resumes_are_checked_and_a_finished_run_keeps_its_log() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("run");
    let (ok, _, stderr) = train("detr_smoke.toml", &tmp.path().join("none"), &["--resume"]);
    assert!(
        !ok && stderr.contains("holds no checkpoint to resume"),
        "{stderr}"
    );

    let (ok, _, stderr) = train("detr_smoke.toml", &dir, &[]);
    assert!(ok, "{stderr}");
    let log = std::fs::read(dir.join("metrics.jsonl")).expect("log");
    let (ok, _, stderr) = train("detr_smoke.toml", &dir, &["--resume"]);
    assert!(
        ok && stderr.contains("finished its 8 steps already"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(dir.join("metrics.jsonl")).expect("log"),
        log,
        "resuming a finished run changed metrics.jsonl"
    );

    // The checkpoint's records are checked against their recorded length and SHA-256.
    let latest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join("checkpoints/latest.json")).expect("latest"),
    )
    .expect("json");
    let step_dir = dir
        .join("checkpoints")
        .join(latest["dir"].as_str().expect("dir"));
    let model = step_dir.join("model.bin");
    let bytes = std::fs::read(&model).expect("model.bin");
    let mut flipped = bytes.clone();
    flipped[bytes.len() / 2] ^= 1;
    for (what, content) in [
        ("cut short", bytes[..bytes.len() / 3].to_vec()),
        ("one bit flipped", flipped),
    ] {
        std::fs::write(&model, content).expect("damage");
        let (ok, _, stderr) = train("detr_smoke.toml", &dir, &["--resume"]);
        assert!(
            !ok && stderr.contains(&model.display().to_string()) && stderr.contains("damaged"),
            "{what}: {stderr}"
        );
    }
    std::fs::write(&model, &bytes).expect("restore");

    std::fs::remove_file(dir.join("config.toml")).expect("rm config");
    let (ok, _, stderr) = train("detr_smoke.toml", &dir, &["--resume"]);
    assert!(!ok && stderr.contains("config.toml is missing"), "{stderr}");
}

#[test]
fn a_diverging_run_stops_before_the_step_and_keeps_the_last_good_checkpoint() {
    let tmp = tempfile::tempdir().expect("tmp");
    // Nothing saved yet: the error must not claim a checkpoint.
    let dir = tmp.path().join("early");
    let (ok, _, stderr) = train("detr_smoke.toml", &dir, &["--set", "optim.lr=1e30"]);
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("step 2: not finite") && stderr.contains("no checkpoint had been written"),
        "{stderr}"
    );
    assert!(!dir.join("checkpoints").exists());

    // A warm-up from 0 keeps step 1 sane (checkpointed every step); step 2 diverges.
    let dir = tmp.path().join("late");
    let sets = [
        "--set",
        "optim.lr=1e30",
        "--set",
        "optim.warmup_steps=1000000",
        "--set",
        "checkpoint.every_steps=1",
        "--set",
        "optim.skip_nonfinite=1",
    ];
    let (ok, _, stderr) = train("fcos_smoke.toml", &dir, &sets);
    assert!(!ok, "{stderr}");
    assert_eq!(common::skip_warnings(&stderr), 1, "{stderr}");
    assert!(
        stderr.contains("the checkpoint of step") && stderr.contains("is intact"),
        "{stderr}"
    );
    let skipped = common::lines(&dir)
        .iter()
        .filter(|l| l["kind"] == "skipped")
        .count();
    assert_eq!(skipped, 1);
    // The kept checkpoint resumes (and diverges again at the same step, as the config says).
    let (ok, _, stderr) = train(
        "fcos_smoke.toml",
        &dir,
        &[&sets[..], &["--resume"]].concat(),
    );
    assert!(!ok && stderr.contains("resuming"), "{stderr}");
}

#[test]
fn bad_arguments_and_config_values_are_named() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("run");
    let cases: [(&[&str], &str); 4] = [
        (&["--set", "optim.lrr=1"], "did you mean `lr`"),
        (&["--set", "optim.lr=1e-3x"], "is not a TOML value"),
        (
            &["--set", "data.coco.val_json="],
            "--set data.coco.val_json",
        ),
        (
            &[
                "--set",
                "detr.model.backbone.arch=\"mobilenet-v2\"",
                "--set",
                "x=1",
            ],
            "unknown key",
        ),
    ];
    for (args, wanted) in cases {
        let (ok, _, stderr) = train("detr_smoke.toml", &dir, args);
        assert!(!ok && stderr.contains(wanted), "{args:?}: {stderr}");
    }
    // A key misspelled in a file is reported at its line there.
    let text = std::fs::read_to_string(config("detr_smoke.toml")).expect("config");
    let line = text
        .lines()
        .position(|l| l.starts_with("num_queries"))
        .expect("num_queries")
        + 1;
    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, text.replace("num_queries", "num_queris")).expect("write");
    let (ok, _, stderr) = densekd(&["train", &bad.display().to_string()]);
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains(&format!("detr.model.num_queris (line {line})"))
            && stderr.contains("did you mean `num_queries`"),
        "{stderr}"
    );

    let seg = [
        "eval",
        "seg",
        "--gt",
        "a",
        "--pred",
        "b",
        "--num-classes",
        "4294967295",
    ];
    let predict = |thr| {
        [
            "predict",
            "--weights",
            "w",
            "--images",
            "i",
            "--out",
            "o",
            "--score-thr",
            thr,
        ]
    };
    for args in [&seg[..], &predict("NaN"), &predict("-1")] {
        let (ok, _, stderr) = densekd(args);
        assert!(
            !ok && stderr.contains("invalid value"),
            "{args:?}: {stderr}"
        );
    }
    // One vocabulary: both spellings of an architecture reach the weights file.
    for arch in ["mobilenet_v2", "mobilenet-v2"] {
        let (ok, _, stderr) = densekd(&["classify", "--arch", arch, "--weights", "/nx.pth", "x"]);
        assert!(!ok && stderr.contains("/nx.pth"), "{arch}: {stderr}");
    }
}

#[test]
fn synth_refuses_a_used_folder_and_predict_keeps_the_readable_images() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let out = data.display().to_string();
    let synth = |extra: &[&str]| {
        let mut args = vec!["data", "synth", "--out", &out, "--train", "2", "--val", "3"];
        args.extend(extra);
        densekd(&args)
    };
    assert!(synth(&[]).0);
    let stale = data.join("images/train/stale.png");
    std::fs::write(&stale, b"old").expect("stale");
    let (ok, _, stderr) = synth(&[]);
    assert!(
        !ok && stderr.contains("not empty") && stderr.contains("--force"),
        "{stderr}"
    );
    assert!(synth(&["--force"]).0);
    assert!(!stale.exists(), "--force must replace the folder whole");

    // A truncated JPEG among good images: the others are predicted and written.
    let run = tmp.path().join("run");
    let (ok, _, stderr) = train("detr_smoke.toml", &run, &[]);
    assert!(ok, "{stderr}");
    let images = data.join("images/val");
    let good = std::fs::read(images.join("000000.png")).expect("png");
    let jpeg = {
        let img = image::load_from_memory(&good).expect("decode").to_rgb8();
        let mut bytes = std::io::Cursor::new(Vec::new());
        img.write_to(&mut bytes, image::ImageFormat::Jpeg)
            .expect("jpeg");
        bytes.into_inner()
    };
    std::fs::write(images.join("cut.jpg"), &jpeg[..jpeg.len() / 2]).expect("cut");
    let pred = tmp.path().join("pred");
    let (ok, _, stderr) = densekd(&[
        "predict",
        "--weights",
        &run.join("model.safetensors").display().to_string(),
        "--images",
        &images.display().to_string(),
        "--out",
        &pred.display().to_string(),
        "--score-thr",
        "0",
    ]);
    assert!(!ok, "one unreadable image must fail the command");
    assert!(
        stderr.contains("cut.jpg") && stderr.contains("truncated") && stderr.contains("1 of 4"),
        "{stderr}"
    );
    let dets: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(pred.join("detections.json")).expect("written"))
            .expect("json");
    let ids: std::collections::BTreeSet<u64> =
        dets.iter().filter_map(|d| d["image_id"].as_u64()).collect();
    assert_eq!(ids.len(), 3, "detections for the three readable images");
    assert_eq!(std::fs::read_dir(pred.join("vis")).expect("vis").count(), 3);
}

#[test]
fn dataset_images_are_checked_before_step_0_and_huge_headers_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let out = data.display().to_string();
    let (ok, _, stderr) = densekd(&["data", "synth", "--out", &out, "--train", "4", "--val", "2"]);
    assert!(ok, "{stderr}");
    let path = |rel: &str| data.join(rel).display().to_string();
    let coco = [
        format!(
            "data.coco.train_json={:?}",
            path("annotations/instances_train.json")
        ),
        format!("data.coco.train_images={:?}", path("images/train")),
        format!(
            "data.coco.val_json={:?}",
            path("annotations/instances_val.json")
        ),
        format!("data.coco.val_images={:?}", path("images/val")),
    ];
    let mut args = Vec::new();
    for c in &coco {
        args.extend(["--set", c.as_str()]);
    }
    let missing = data.join("images/val/000001.png");
    std::fs::remove_file(&missing).expect("rm");
    let run = tmp.path().join("run");
    let (ok, _, stderr) = train("detr_smoke.toml", &run, &args);
    assert!(
        !ok && stderr.contains(&missing.display().to_string()),
        "{stderr}"
    );
    assert!(!stderr.contains("step 1/"), "training started: {stderr}");

    // A JPEG whose frame header declares 65535 × 65535 pixels: refused before any allocation.
    let img = image::RgbImage::from_pixel(8, 8, image::Rgb([9, 9, 9]));
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, image::ImageFormat::Jpeg)
        .expect("jpeg");
    let mut jpeg = bytes.into_inner();
    let sof = jpeg
        .windows(2)
        .position(|w| w == [0xFF, 0xC0])
        .expect("baseline frame header");
    // Marker, length (2), precision (1), then height and width (2 bytes each).
    jpeg[sof + 5..sof + 9].copy_from_slice(&[0xFF; 4]);
    let huge = tmp.path().join("huge.jpg");
    std::fs::write(&huge, &jpeg).expect("write");
    let err = densekd::data::images::load_rgb(&huge).expect_err("huge header");
    assert!(
        err.to_string().contains("65535x65535") && err.to_string().contains("huge.jpg"),
        "{err}"
    );
}
