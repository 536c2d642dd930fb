//! FCOS and LGD end to end through the `densekd train` machinery: COCO files in, a memorised
//! training set, the exported model re-scored from files by `predict` and `eval coco`; LGD's
//! gradient flow term by term, its implicit teacher's evaluation, its exact resume, and an
//! export without its teacher.

mod common;

use std::path::Path;

use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use common::{lines, options, serial};
use densekd::backend::Training;
use densekd::data::export::write_split;
use densekd::data::synth::{Split, SynthConfig};
use densekd::distill::lgd::teacher::Interact;
use densekd::distill::lgd::{
    lgd_terms, teacher_detections, Lgd, LgdConfig, LgdModules, IMPLICIT_TEACHER,
};
use densekd::distill::Distiller;
use densekd::model::fcos::task::FcosTask;
use densekd::model::fcos::Fcos;
use densekd::task::Task;
use densekd::train::config::TrainConfig;
use densekd::train::optim::replica;
use densekd::train::run::train_with_options;

/// `configs/fcos_shapes.toml` made tiny: a 1/4-width ResNet-18 with one block per stage from
/// scratch, a 32-wide head with two convolutions per tower, on the COCO files in `data`
/// (trained and validated on the same images).
fn tiny_config(data: &Path, extra: &[&str]) -> TrainConfig {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/fcos_shapes.toml");
    let json = data.join("annotations/instances_train.json");
    let images = data.join("images/train");
    let quoted = |p: &Path| format!("{:?}", p.display().to_string());
    let sets: Vec<String> = [
        format!("data.coco.train_json={}", quoted(&json)),
        format!("data.coco.train_images={}", quoted(&images)),
        format!("data.coco.val_json={}", quoted(&json)),
        format!("data.coco.val_images={}", quoted(&images)),
    ]
    .into_iter()
    .chain(
        [
            "backbone_weights=",
            "data.workers=1",
            "data.augment.shorter=128",
            "data.augment.max_size=128",
            "data.augment.hflip_prob=0.0",
            "fcos.model.backbone.arch=\"resnet18\"",
            "fcos.model.backbone.width=0.25",
            "fcos.model.backbone.blocks=[1,1,1,1]",
            "fcos.model.backbone.norm=\"group\"",
            "fcos.model.backbone.frozen_stages=0",
            "fcos.model.channels=32",
            "fcos.model.head_convs=2",
            "fcos.model.norm_groups=8",
            "optim.replicas=1",
            "checkpoint.every_steps=0",
        ]
        .iter()
        .chain(extra)
        .map(|s| s.to_string()),
    )
    .collect();
    TrainConfig::load(&path, &sets).expect("config")
}

#[test]
fn tiny_fcos_memorises_eight_images_and_its_export_rescores() {
    let _serial = serial();
    let tmp = tempfile::tempdir().expect("tmp");
    let synth = SynthConfig {
        size: 64,
        max_objects: 3,
        ..SynthConfig::default()
    };
    write_split(tmp.path(), &synth, Split::Train, 8).expect("data");
    let config = tiny_config(
        tmp.path(),
        &[
            "optim.epochs=150",
            "optim.lr=5e-3",
            "optim.warmup_steps=10",
            "eval.every_epochs=150",
            "checkpoint.log_every_steps=50",
        ],
    );
    let run = tmp.path().join("run");
    let summary = train_with_options(&config, &options(&run, false, None)).expect("train");
    let stat = |name: &str| {
        summary.final_eval[0]
            .1
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| *v)
            .expect("stat")
    };
    let ap = stat("AP");
    assert!(
        ap >= 0.9,
        "AP {ap} (AP50 {}) after 150 steps on 8 images",
        stat("AP50")
    );

    // `predict` writes COCO results that `eval coco` scores as the run did.
    let out = tmp.path().join("pred");
    let json = tmp.path().join("annotations/instances_train.json");
    let path = |p: &Path| p.display().to_string();
    let (ok, _, err) = common::densekd(&[
        "predict",
        "--weights",
        &path(&run.join("model.safetensors")),
        "--images",
        &path(&tmp.path().join("images/train")),
        "--out",
        &path(&out),
        "--gt",
        &path(&json),
        "--score-thr",
        "0",
    ]);
    assert!(ok, "{err}");
    assert!(out.join("vis/000000.png").is_file());
    let (ok, stats, err) = common::densekd(&[
        "eval",
        "coco",
        "--gt",
        &path(&json),
        "--dt",
        &path(&out.join("detections.json")),
        "--json",
    ]);
    assert!(ok, "{err}");
    let scored: serde_json::Value = serde_json::from_str(&stats).expect("json");
    let rescored = scored["AP"].as_f64().expect("AP");
    assert!((rescored - ap).abs() < 1e-6, "{rescored} vs {ap}");
}

/// The tiny config on in-memory synthetic data (16 training images of 64 px read at 128 px).
fn tiny_synthetic(extra: &[&str]) -> TrainConfig {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/fcos_shapes.toml");
    let sets: Vec<String> = [
        "backbone_weights=",
        "data.workers=1",
        "data.synthetic.train_images=16",
        "data.synthetic.val_images=8",
        "data.synthetic.generator.size=64",
        "data.augment.shorter=128",
        "data.augment.max_size=128",
        "fcos.model.backbone.arch=\"resnet18\"",
        "fcos.model.backbone.width=0.25",
        "fcos.model.backbone.blocks=[1,1,1,1]",
        "fcos.model.backbone.norm=\"group\"",
        "fcos.model.backbone.frozen_stages=0",
        "fcos.model.channels=32",
        "fcos.model.head_convs=2",
        "fcos.model.norm_groups=8",
        "optim.batch_size=4",
        "optim.replicas=1",
        "optim.warmup_steps=2",
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect();
    TrainConfig::load(&path, &sets).expect("config")
}

/// Parameters of `module` with a gradient in `grads`.
fn with_grad<M: AutodiffModule<Training>>(
    grads: &mut <Training as burn::tensor::backend::AutodiffBackend>::Gradients,
    module: &M,
) -> usize {
    GradientsParams::from_module(grads, module).len()
}

/// Which parts get a gradient from one scalar: (backbone, FPN, head, teacher, adapter).
fn reached(
    loss: burn::tensor::Tensor<Training, 1>,
    student: &Fcos<Training>,
    modules: &LgdModules<Training>,
) -> [bool; 5] {
    let mut grads = loss.backward();
    [
        with_grad(&mut grads, &student.backbone) > 0,
        with_grad(&mut grads, &student.fpn) > 0,
        with_grad(&mut grads, &student.head) > 0,
        with_grad(&mut grads, &modules.teacher) > 0,
        with_grad(&mut grads, &modules.adapter) > 0,
    ]
}

#[test]
fn lgd_gradients_flow_as_the_spec_says() {
    let _serial = serial();
    let config = tiny_synthetic(&["distill.method=\"lgd\"", "distill.distill_warmup_steps=5"]);
    let section = config.fcos.clone().expect("fcos");
    let task = FcosTask::new(&config.task_inputs(), &section).expect("task");
    let device = Default::default();
    // As the training loop does: every parameter a materialised autodiff leaf.
    let student = replica(&task.init_model::<Training>(&device).expect("model"));
    let lgd_config = LgdConfig {
        freeze_backbone_steps: 2,
        ..match &config.distill {
            densekd::distill::DistillConfig::Lgd(c) => c.clone(),
            _ => panic!("lgd"),
        }
    };
    let lgd = Lgd::new(&task, lgd_config.clone()).expect("lgd");
    let modules: LgdModules<Training> =
        replica(&Distiller::<Training, FcosTask>::init_trainable(&lgd, &device).expect("modules"));
    let batch = Task::<Training>::train_batches(&task, 0, 0)
        .next()
        .expect("batch")
        .expect("batch ok");
    let terms = |step| lgd_terms(&lgd_config, &task, &student, &modules, &batch, step);

    // Each term from its own forward pass: a backward pass consumes the graph it shares.
    let student_det = |step| {
        let t = terms(step).student;
        t.class + t.boxes + t.centerness
    };
    let teacher_det = |config: &LgdConfig, step| {
        let t = lgd_terms(config, &task, &student, &modules, &batch, step)
            .teacher
            .expect("teacher terms");
        t.class + t.boxes + t.centerness
    };
    let distill = |step| terms(step).distill.expect("distill term");

    // Step 10: past the backbone freeze and the distillation warm-up.
    assert_eq!(
        reached(student_det(10), &student, &modules),
        [true, true, true, false, false]
    );
    // The teacher learns only from its own detection loss, through the student's shared head;
    // the student's FPN (and backbone) get it through the teacher's appearance pooling.
    assert_eq!(
        reached(teacher_det(&lgd_config, 10), &student, &modules),
        [true, true, true, true, false]
    );
    assert_eq!(
        reached(distill(10), &student, &modules),
        [true, true, false, false, true]
    );
    // Step 3: distillation off (only the adapter learns from it), backbone unfrozen.
    assert_eq!(
        reached(distill(3), &student, &modules),
        [false, false, false, false, true]
    );
    // Step 0: the backbone is frozen for every term.
    assert_eq!(
        reached(student_det(0), &student, &modules),
        [false, true, true, false, false]
    );
    // With detached appearance, or each object's own label embedding rendered (no appearance
    // path), the teacher's detection loss no longer reaches the student; label queries over
    // appearance keep it.
    let variants = [
        (
            LgdConfig {
                detach_appearance: true,
                ..lgd_config.clone()
            },
            false,
        ),
        (
            LgdConfig {
                interact: Interact::TeacherFill,
                ..lgd_config.clone()
            },
            false,
        ),
        (
            LgdConfig {
                interact: Interact::LabelGuided,
                ..lgd_config.clone()
            },
            true,
        ),
    ];
    for (config, to_student) in &variants {
        assert_eq!(
            reached(teacher_det(config, 10), &student, &modules),
            [*to_student, *to_student, true, true, false],
            "{config:?}"
        );
    }
}

#[test]
fn lgd_resumes_exactly_and_exports_the_student_only() {
    let _serial = serial();
    let tmp = tempfile::tempdir().expect("tmp");
    let config = tiny_synthetic(&[
        "distill.method=\"lgd\"",
        "distill.context_box=true",
        "distill.distill_warmup_steps=3",
        "distill.freeze_backbone_steps=2",
        "optim.clip_value=1.0",
        "optim.epochs=2",
        "eval.every_epochs=2",
        "checkpoint.every_steps=3",
        "checkpoint.log_every_steps=1",
    ]);
    let whole = tmp.path().join("whole");
    train_with_options(&config, &options(&whole, false, None)).expect("train");
    let parts = tmp.path().join("parts");
    train_with_options(&config, &options(&parts, false, Some(5))).expect("first part");
    train_with_options(&config, &options(&parts, true, None)).expect("resume");
    let train_lines = |dir: &Path| -> Vec<serde_json::Value> {
        lines(dir)
            .into_iter()
            .filter(|l| l["kind"] == "train")
            .collect()
    };
    let (a, b) = (train_lines(&whole), train_lines(&parts));
    assert_eq!(a.len(), 8);
    assert_eq!(
        a.last(),
        b.last(),
        "the resumed run ends where the whole run does"
    );
    for key in [
        "loss_lgd",
        "teacher_loss_cls",
        "teacher_loss_box",
        "loss_cls",
    ] {
        assert!(
            a[7][key].as_f64().is_some_and(f64::is_finite),
            "{key}: {}",
            a[7]
        );
    }

    // Every evaluation scores the implicit teacher too, and the summary reports it.
    let evals: Vec<serde_json::Value> = lines(&whole)
        .into_iter()
        .filter(|l| l["kind"] == "eval")
        .collect();
    let models: Vec<&str> = evals.iter().filter_map(|l| l["model"].as_str()).collect();
    assert_eq!(models, ["student", IMPLICIT_TEACHER]);
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(whole.join("summary.json")).expect("summary"))
            .expect("summary json");
    assert_eq!(summary["final"][IMPLICIT_TEACHER]["AP"], evals[1]["AP"]);
    assert!(evals[1]["AP"]
        .as_f64()
        .is_some_and(|ap| (0.0..=1.0).contains(&ap)));

    // The export holds the student alone: the same tensors as a plain FCOS run's.
    let plain = tmp.path().join("plain");
    let mut baseline = tiny_synthetic(&["optim.epochs=1"]);
    baseline.checkpoint.every_steps = 0;
    train_with_options(&baseline, &options(&plain, false, None)).expect("plain");
    // A safetensors file starts with the length of its JSON header, which names every tensor.
    let names = |dir: &Path| -> Vec<String> {
        let bytes = std::fs::read(dir.join("model.safetensors")).expect("export");
        let len = u64::from_le_bytes(bytes[..8].try_into().expect("length")) as usize;
        let header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&bytes[8..8 + len]).expect("header");
        let mut names: Vec<String> = header
            .keys()
            .filter(|k| *k != "__metadata__")
            .cloned()
            .collect();
        names.sort();
        names
    };
    let exported = names(&whole);
    assert!(exported
        .iter()
        .all(|n| !n.contains("teacher") && !n.contains("adapter")));
    assert_eq!(exported, names(&plain));
}

#[test]
fn fcos_kd_distils_every_level_from_a_frozen_teacher() {
    let _serial = serial();
    let tmp = tempfile::tempdir().expect("tmp");
    let synth = SynthConfig {
        size: 64,
        max_objects: 3,
        ..SynthConfig::default()
    };
    write_split(tmp.path(), &synth, Split::Train, 8).expect("data");
    // A teacher that has learnt its (training = validation) images well above chance level.
    let teacher = tmp.path().join("teacher");
    let config = tiny_config(
        tmp.path(),
        &[
            "optim.epochs=60",
            "optim.lr=5e-3",
            "optim.warmup_steps=10",
            "eval.every_epochs=60",
        ],
    );
    train_with_options(&config, &options(&teacher, false, None)).expect("teacher");
    // A narrower student: CWD and PKD go through a connector, the imitation through its adapter.
    let student = tmp.path().join("student");
    let teacher_set = format!("distill.teacher={:?}", teacher.display().to_string());
    let config = tiny_config(
        tmp.path(),
        &[
            "fcos.model.channels=16",
            "optim.epochs=2",
            "eval.every_epochs=2",
            "checkpoint.log_every_steps=1",
            "distill.method=\"fcos-kd\"",
            &teacher_set,
            "distill.cwd.weight=10.0",
            "distill.cwd.temperature=1.0",
            "distill.pkd.weight=10.0",
            "distill.fitnet.weight=0.01",
        ],
    );
    train_with_options(&config, &options(&student, false, None)).expect("student");
    let lines = lines(&student);
    assert!(
        lines
            .iter()
            .any(|l| l["kind"] == "eval" && l["model"] == "teacher" && l["AP"].is_number()),
        "the teacher is evaluated before step 0"
    );
    let last = lines
        .iter()
        .rev()
        .find(|l| l["kind"] == "train")
        .expect("train line");
    for key in ["loss_cwd", "loss_pkd", "loss_fitnet", "loss_cls"] {
        assert!(
            last[key].as_f64().is_some_and(|v| v.is_finite() && v > 0.0),
            "{key}: {last}"
        );
    }
}

#[test]
fn the_implicit_teacher_detects_each_labelled_image_on_its_own_labels() {
    let _serial = serial();
    // Every candidate kept, so the untrained head's detections are not empty.
    let config = tiny_synthetic(&["distill.method=\"lgd\"", "fcos.eval.score_threshold=0.0"]);
    let section = config.fcos.clone().expect("fcos");
    let task = FcosTask::new(&config.task_inputs(), &section).expect("task");
    let device = Default::default();
    let student = task.init_model::<Training>(&device).expect("model");
    let lgd_config = match &config.distill {
        densekd::distill::DistillConfig::Lgd(c) => c.clone(),
        _ => panic!("lgd"),
    };
    let lgd = Lgd::new(&task, lgd_config.clone()).expect("lgd");
    let modules: LgdModules<Training> =
        Distiller::<Training, FcosTask>::init_trainable(&lgd, &device).expect("modules");
    let batch = Task::<Training>::train_batches(&task, 0, 0)
        .next()
        .expect("batch")
        .expect("batch ok");
    assert!(batch.targets.iter().all(|t| !t.boxes.is_empty()));
    let detect = |b| teacher_detections(&lgd_config, &task, &student, &modules.teacher, b);
    let labelled = detect(&batch);
    assert!(labelled.iter().all(|d| d.len() == 100), "max_dets each");

    // Without its labels the first image gets no detections; the others keep theirs, as the
    // teacher reads each image's own labels and FPN levels only.
    let mut unlabelled = batch.clone();
    unlabelled.targets[0].boxes.clear();
    unlabelled.targets[0].classes.clear();
    let partial = detect(&unlabelled);
    assert_eq!(partial.len(), batch.targets.len());
    assert!(partial[0].is_empty());
    for (i, (a, b)) in labelled.iter().zip(&partial).enumerate().skip(1) {
        assert_eq!(a.len(), b.len(), "image {i}");
        for (x, y) in a.iter().zip(b) {
            assert_eq!(x.class, y.class, "image {i}");
            assert!((x.score - y.score).abs() < 1e-5, "image {i}: {x:?} {y:?}");
            for (p, q) in x.bbox.iter().zip(y.bbox) {
                assert!((p - q).abs() < 1e-3, "image {i}: {x:?} {y:?}");
            }
        }
    }
    // Other labels give other maps, hence other detections.
    let mut moved = batch.clone();
    for b in &mut moved.targets[1].boxes {
        b[0] = 1.0 - b[0];
    }
    assert_ne!(detect(&moved)[1], labelled[1]);
}
