//! The training loop's contracts: a run stopped mid-epoch and resumed from its checkpoint ends
//! bit-identical to an uninterrupted run; the run folder holds what the docs promise; the CLI
//! trains, refuses to overwrite a run, names bad config keys, and its predictions evaluate.

mod common;

use common::{densekd, lines};
use std::path::Path;

use densekd::backend::Inference;
use densekd::model::detr::export::load_detector;
use densekd::train::config::TrainConfig;
use densekd::train::run::train_with_options;
use densekd::train::{RunOptions, RunSummary};

/// A tiny run (`common::TINY_RUN`) of 2 epochs = 8 steps, logging and evaluating throughout.
fn tiny() -> impl Iterator<Item = &'static str> {
    common::TINY_RUN.iter().copied().chain([
        "optim.epochs=2",
        "eval.every_epochs=1",
        "checkpoint.log_every_steps=1",
    ])
}

fn config(extra: &[&str]) -> TrainConfig {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/detr_shapes.toml");
    let mut sets: Vec<String> = tiny().map(String::from).collect();
    sets.extend(extra.iter().map(|s| s.to_string()));
    TrainConfig::load(&path, &sets).expect("config")
}

fn run(config: &TrainConfig, dir: &Path, resume: bool, stop_after: Option<usize>) -> RunSummary {
    // One training at a time: the backend's generator is process-global (`common::serial`).
    let _one_at_a_time = common::serial();
    let options = RunOptions {
        run_dir: dir.to_path_buf(),
        resume,
        stop_after,
        progress: false,
        world: None,
    };
    train_with_options(config, &options).expect("train")
}

fn tensor(model: &densekd::model::detr::Detr<Inference>) -> Vec<f32> {
    let mut v = model
        .query_content
        .val()
        .into_data()
        .to_vec::<f32>()
        .expect("f32");
    v.extend(
        model
            .class_head
            .weight
            .val()
            .into_data()
            .to_vec::<f32>()
            .expect("f32"),
    );
    v
}

/// Runs `cfg` uninterrupted into `a` and stopped at step 3 then resumed into `b`, and checks
/// both end identical.
fn check_resume(cfg: &TrainConfig, a: &Path, b: &Path) -> RunSummary {
    let full = run(cfg, a, false, None);
    assert!(full.finished);
    assert_eq!(full.steps, 8);
    let part = run(cfg, b, false, Some(3));
    assert!(!part.finished);
    assert_eq!(part.steps, 3);
    assert!(!b.join("model.safetensors").exists());
    let rest = run(cfg, b, true, None);
    assert!(rest.finished);
    assert_eq!(rest.steps, 8);
    assert_eq!(lines(a), lines(b), "metrics differ after resume");
    assert_eq!(full.final_eval, rest.final_eval);
    full
}

#[test]
fn od_detr_run_resumes_exactly_and_reports_the_ema_teacher() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let cfg = config(&[
        "distill.method=\"od-detr\"",
        "detr.eval.instability_images=8",
        "distill.distill_stop_step=5",
    ]);
    let full = check_resume(&cfg, &a, &b);
    let names: Vec<&str> = full.final_eval.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["student", "ema"]);
    let device = Default::default();
    let (ea, _) =
        load_detector::<Inference>(&a.join("model-ema.safetensors"), &device).expect("ema a");
    let (eb, _) =
        load_detector::<Inference>(&b.join("model-ema.safetensors"), &device).expect("ema b");
    let (student, _) =
        load_detector::<Inference>(&a.join("model.safetensors"), &device).expect("student");
    assert_eq!(
        tensor(&ea),
        tensor(&eb),
        "the EMA state was not restored on resume"
    );
    assert_ne!(
        tensor(&ea),
        tensor(&student),
        "the teacher is not an average"
    );
    let metrics = lines(&a);
    let train: Vec<_> = metrics.iter().filter(|l| l["kind"] == "train").collect();
    assert_eq!(train.len(), 8);
    // The distillation runs for the first 5 steps (the resumed run crosses the stop).
    for line in train {
        let step = line["step"].as_u64().expect("step");
        for key in ["loss_pd", "loss_aux"] {
            let value = line[key].as_f64();
            match step <= 5 {
                true => assert!(value.is_some_and(f64::is_finite), "{key} at step {step}"),
                false => assert!(value.is_none(), "{key} still logged at step {step}"),
            }
        }
    }
    for model in ["student", "ema"] {
        let unstable: Vec<_> = metrics
            .iter()
            .filter(|l| l["kind"] == "instability" && l["model"] == model)
            .collect();
        assert_eq!(
            unstable.len(),
            2,
            "one instability line per epoch for {model}"
        );
        assert!(unstable[0]["fraction"].as_f64().is_some_and(|f| f >= 0.0));
    }
    assert!(a.join("instability.png").exists());
}

/// The parameter bytes of a `.safetensors` file (what follows the header, whose metadata holds
/// the run's config).
fn parameter_bytes(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).expect("safetensors");
    let header: [u8; 8] = bytes[..8].try_into().expect("header length");
    bytes[8 + u64::from_le_bytes(header) as usize..].to_vec()
}

/// The EMA-only variant (OD-DETR with all three mechanisms off) reads nothing back from its
/// average, so its student trains exactly as without distillation: the od-detr-long grid reports
/// its student as the baseline instead of training the baseline again.
#[test]
fn an_ema_only_runs_student_is_the_run_without_distillation() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (plain, ema) = (tmp.path().join("plain"), tmp.path().join("ema"));
    let alone = run(&config(&[]), &plain, false, None);
    let with_ema = run(
        &config(&[
            "distill.method=\"od-detr\"",
            "distill.guided_matching=false",
            "distill.pd=false",
            "distill.aux=false",
        ]),
        &ema,
        false,
        None,
    );
    assert_eq!(alone.final_eval[0], with_ema.final_eval[0], "student stats");
    assert_eq!(with_ema.final_eval[1].0, "ema");
    assert_eq!(
        parameter_bytes(&plain.join("model.safetensors")),
        parameter_bytes(&ema.join("model.safetensors")),
        "student parameters"
    );
    let student = |dir: &Path| -> Vec<serde_json::Value> {
        lines(dir)
            .into_iter()
            .filter(|l| l["kind"] == "train" || l["model"] == "student")
            .collect()
    };
    assert_eq!(
        student(&plain),
        student(&ema),
        "losses and student evaluations"
    );
}

/// SGD's momentum is checkpointed with the run (exact resume), and the poly schedule sets each
/// step's rate.
#[test]
fn sgd_with_the_poly_schedule_resumes_exactly() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let cfg = config(&[
        "optim.optimizer=\"sgd\"",
        "optim.momentum=0.9",
        "optim.schedule=\"poly\"",
        "optim.power=0.9",
        "optim.lr=0.01",
        "optim.min_lr_ratio=0.1",
        "optim.warmup_steps=0",
    ]);
    let summary = check_resume(&cfg, &a, &b);
    assert!(summary.final_eval[0].1.iter().all(|(_, v)| v.is_finite()));
    let rates: Vec<f64> = lines(&a)
        .iter()
        .filter(|l| l["kind"] == "train")
        .map(|l| l["lr"].as_f64().expect("lr"))
        .collect();
    assert_eq!(rates.len(), 8);
    for (k, lr) in rates.iter().enumerate() {
        let poly = 0.001 + 0.009 * (1.0 - k as f64 / 8.0).powf(0.9);
        assert!((lr - poly).abs() < 1e-12, "step {}: {lr} vs {poly}", k + 1);
    }
}

#[test]
fn resumed_run_matches_uninterrupted_run() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let cfg = config(&[]);
    check_resume(&cfg, &a, &b);
    let device = Default::default();
    let (ma, info) = load_detector::<Inference>(&a.join("model.safetensors"), &device).expect("a");
    let (mb, _) = load_detector::<Inference>(&b.join("model.safetensors"), &device).expect("b");
    assert_eq!(tensor(&ma), tensor(&mb));
    assert_eq!(info.model, cfg.detr.as_ref().expect("detr section").model);
    assert_eq!(info.categories.len(), 8);

    // The run folder's promised contents.
    let metrics = lines(&a);
    let train: Vec<_> = metrics.iter().filter(|l| l["kind"] == "train").collect();
    assert_eq!(train.len(), 8);
    for key in ["step", "lr", "loss", "loss_class", "loss_bbox", "loss_giou"] {
        assert!(train[0][key].is_number(), "train line lacks {key}");
    }
    assert!(train[0]["lr"].as_f64() < train[1]["lr"].as_f64(), "warm-up");
    let evals: Vec<_> = metrics.iter().filter(|l| l["kind"] == "eval").collect();
    assert_eq!(evals.len(), 2);
    for key in densekd::eval::coco::STAT_KEYS {
        assert!(evals[1][key].is_number(), "eval line lacks {key}");
    }
    assert_eq!(evals[1]["epoch"], 2);
    assert_eq!(evals[1]["step"], 8);
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("summary.json")).expect("summary"))
            .expect("json");
    assert_eq!(summary["final"]["student"]["AP"], evals[1]["AP"]);
    for plot in ["loss.png", "ap.png"] {
        let img = image::open(a.join(plot)).expect("plot decodes");
        assert!(img.width() > 100 && img.height() > 100);
    }
    // Only the latest checkpoint is kept.
    let kept: Vec<_> = std::fs::read_dir(a.join("checkpoints"))
        .expect("checkpoints")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("step-"))
        .collect();
    assert_eq!(kept.len(), 1);
}

#[test]
fn cli_trains_predicts_and_guards_runs() {
    let tmp = tempfile::tempdir().expect("tmp");
    let run_dir = tmp.path().join("run");
    let run_s = run_dir.to_str().expect("utf8");
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/detr_shapes.toml");
    let config = config.to_str().expect("utf8");
    let mut args = vec!["train", config, "--out", run_s];
    for s in tiny() {
        args.extend(["--set", s]);
    }
    args.extend(["--set", "optim.epochs=1"]);

    let mut bad = args.clone();
    bad.extend(["--set", "optim.learning_rate=1"]);
    let (ok, _, stderr) = densekd(&bad);
    assert!(!ok);
    assert!(stderr.contains("learning_rate"), "{stderr}");

    let (ok, stdout, stderr) = densekd(&args);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("AP50"), "{stdout}");
    let saved = std::fs::read_to_string(run_dir.join("config.toml")).expect("resolved config");
    assert!(saved.contains("train_images = 16"), "{saved}");

    // A second run into the same folder must not clobber it; a resume with other values must
    // name them.
    let (ok, _, stderr) = densekd(&args);
    assert!(!ok && stderr.contains("--resume"), "{stderr}");
    let mut changed = args.clone();
    changed.extend(["--resume", "--set", "optim.lr=0.5"]);
    let (ok, _, stderr) = densekd(&changed);
    assert!(!ok && stderr.contains("optim.lr"), "{stderr}");

    let data = tmp.path().join("shapes");
    let data_s = data.to_str().expect("utf8");
    let (ok, _, stderr) = densekd(&[
        "data", "synth", "--out", data_s, "--train", "1", "--val", "8", "--size", "64",
    ]);
    assert!(ok, "{stderr}");
    let gt = data.join("annotations/instances_val.json");
    let pred = tmp.path().join("pred");
    let weights = run_dir.join("model.safetensors");
    let (ok, stdout, stderr) = densekd(&[
        "predict",
        "--weights",
        weights.to_str().expect("utf8"),
        "--images",
        data.join("images/val").to_str().expect("utf8"),
        "--out",
        pred.to_str().expect("utf8"),
        "--score-thr",
        "0",
        "--gt",
        gt.to_str().expect("utf8"),
    ]);
    assert!(ok, "{stderr}");
    // 10 queries × 8 classes = 80 candidates per image, all kept at threshold 0.
    assert!(stdout.contains("640 detections on 8 images"), "{stdout}");
    let drawn = std::fs::read_dir(pred.join("vis")).expect("vis").count();
    assert_eq!(drawn, 8);
    let (ok, stdout, stderr) = densekd(&[
        "eval",
        "coco",
        "--gt",
        gt.to_str().expect("utf8"),
        "--dt",
        pred.join("detections.json").to_str().expect("utf8"),
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let stats: serde_json::Value = serde_json::from_str(stdout.trim()).expect("json");
    assert!(stats["AP"].is_number());

    let (ok, _, stderr) = densekd(&[
        "predict",
        "--weights",
        gt.to_str().expect("utf8"),
        "--images",
        data.join("images/val").to_str().expect("utf8"),
        "--out",
        pred.to_str().expect("utf8"),
    ]);
    assert!(!ok && stderr.contains("instances_val.json"), "{stderr}");
    let (ok, _, stderr) = densekd(&[
        "predict",
        "--weights",
        weights.to_str().expect("utf8"),
        "--images",
        data_s,
        "--out",
        pred.to_str().expect("utf8"),
    ]);
    assert!(!ok && stderr.contains("no PNG or JPEG"), "{stderr}");
}

#[test]
fn denoising_run_resumes_exactly_and_logs_its_loss() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let cfg = config(&["detr.model.denoising.groups=2"]);
    check_resume(&cfg, &a, &b);
    let metrics = lines(&a);
    let train: Vec<_> = metrics.iter().filter(|l| l["kind"] == "train").collect();
    assert!(train.iter().all(|l| l["loss_dn"]
        .as_f64()
        .is_some_and(|v| v.is_finite() && v > 0.0)));
}

/// The first step's loss and gradient norm with two data-parallel replicas are the whole
/// batch's: every set-loss term is normalised by the batch's boxes, and the shards are weighted
/// by theirs. (Without the dense head, whose loss is normalised by positive tokens, and with
/// frozen norms, as replicas require.) With denoising, whose noise each shard draws on its
/// own thread, a replicated run resumes exactly.
#[test]
fn data_parallel_replicas_sum_to_the_batch_and_resume_exactly() {
    let tmp = tempfile::tempdir().expect("tmp");
    let base = [
        "detr.model.dense_head=false",
        "detr.model.backbone.norm=\"frozen\"",
    ];
    let first = |extra: &[&str], dir: &str| {
        let cfg = config(&[&base[..], extra].concat());
        let summary = run(&cfg, &tmp.path().join(dir), false, Some(1));
        assert_eq!(summary.steps, 1);
        let line = lines(&tmp.path().join(dir))
            .into_iter()
            .find(|l| l["kind"] == "train")
            .expect("train line");
        (
            line["loss"].as_f64().expect("loss"),
            line["grad_norm"].as_f64().expect("grad_norm"),
        )
    };
    let (loss1, norm1) = first(&[], "one");
    let (loss2, norm2) = first(&["optim.replicas=2"], "two");
    assert!(
        (loss1 - loss2).abs() < 1e-5 * loss1,
        "loss {loss1} vs {loss2}"
    );
    assert!(
        (norm1 - norm2).abs() < 1e-4 * norm1,
        "grad norm {norm1} vs {norm2}"
    );

    let cfg = config(
        &[
            &base[..],
            &["optim.replicas=2", "detr.model.denoising.groups=2"],
        ]
        .concat(),
    );
    check_resume(&cfg, &tmp.path().join("a"), &tmp.path().join("b"));

    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/detr_shapes.toml");
    let sets: Vec<String> = tiny()
        .chain(["optim.replicas=2"])
        .map(String::from)
        .collect();
    let err = TrainConfig::load(&path, &sets).expect_err("batch norm with replicas");
    assert!(err.to_string().contains("optim.replicas"), "{err}");
}
