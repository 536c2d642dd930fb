//! The distiller contract of the training loop: a distiller's own trainable modules are trained
//! with the student (gradients, their own learning rate, data-parallel replicas, checkpoints and
//! exact resume) and never exported; frozen teachers load from a run folder, are evaluated and
//! logged before step 0, stay unchanged, and a missing, foreign or untrained teacher stops
//! training before it starts.

mod common;

use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use common::{lines, options, serial};

use burn::module::AutodiffModule;
use burn::nn::{Linear, LinearConfig, LinearRecord};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use densekd::backend::{Inference, Training};
use densekd::distill::teacher::FrozenTeacher;
use densekd::distill::{Distiller, NoDistill};
use densekd::model::detr::task::DetrTask;
use densekd::model::detr::{Detr, DetrRecord};
use densekd::task::{InnerModel, Losses, Task};
use densekd::train::checkpoint::{load_record, Checkpoints};
use densekd::train::config::{ModelSection, TrainConfig};
use densekd::train::{fit, RunSummary};

fn task(config: &TrainConfig) -> DetrTask {
    let ModelSection::Detr(section) = config.model().expect("model") else {
        panic!("the tiny config is a DETR config");
    };
    DetrTask::new(&config.task_inputs(), section).expect("task")
}

/// Trains `config` with `distiller` into `dir`.
fn train<D: Distiller<Training, DetrTask> + Sync>(
    config: &TrainConfig,
    distiller: &mut D,
    dir: &Path,
    resume: bool,
    stop_after: Option<usize>,
) -> densekd::Result<RunSummary> {
    let task = task(config);
    let device = Default::default();
    let student = task.init_model::<Training>(&device)?;
    let options = options(dir, resume, stop_after);
    fit(
        &task,
        distiller,
        student,
        &config.loop_config(),
        &options,
        &device,
    )
}

fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().expect("f32")
}

/// A FitNet-style toy: a trainable 1×1 connector maps the student's final decoder states onto
/// themselves (detached), added to the loss as `loss_connector`.
struct Connector {
    lr_mult: f64,
}

impl<B: AutodiffBackend> Distiller<B, DetrTask> for Connector {
    type Trainable = Linear<B>;
    type State = ();

    fn init_trainable(&self, device: &B::Device) -> densekd::Result<Linear<B>> {
        B::seed(device, 7);
        Ok(LinearConfig::new(32, 32).init(device))
    }

    fn lr_mult(&self) -> f64 {
        self.lr_mult
    }

    fn loss(
        &self,
        task: &DetrTask,
        student: &Detr<B>,
        connector: &Linear<B>,
        batch: &<DetrTask as Task<B>>::Batch,
    ) -> densekd::Result<Losses<B>> {
        let forward = task.forward(student, batch)?;
        let hidden = forward.output.last().hidden.clone();
        let mapped = connector.forward(hidden.clone());
        // Normalised like DETR's own terms, by the batch's box count, so that data-parallel
        // shards (weighted by their box counts) sum to exactly the whole batch's value.
        let boxes = Task::<B>::shard_weight(task, batch);
        let fit = (mapped - hidden.detach())
            .powi_scalar(2)
            .sum()
            .div_scalar(100.0 * boxes);
        let mut losses = task.loss(&forward, batch)?;
        losses.add("loss_connector", fit, 1.0);
        Ok(losses)
    }

    fn state(&self) {}

    fn load_state(&mut self, _state: ()) {}
}

/// The connector's weights in the run's latest checkpoint.
fn checkpointed_connector(dir: &Path) -> Vec<f32> {
    let saved = Checkpoints::new(dir)
        .load_latest(&["model"])
        .expect("read")
        .expect("a checkpoint");
    let bytes = saved.parts.into_iter().next().expect("model").1;
    let (_, connector): (DetrRecord<Training>, LinearRecord<Training>) =
        load_record::<Training, _>(bytes, &dir.join("model.bin"), &Default::default())
            .expect("record");
    values(connector.weight.val())
}

fn initial_connector() -> Vec<f32> {
    let device = Default::default();
    let init = <Connector as Distiller<Training, DetrTask>>::init_trainable(
        &Connector { lr_mult: 1.0 },
        &device,
    )
    .expect("init");
    values(init.weight.val())
}

/// The tensor names of an exported `model.safetensors`.
fn exported_names(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).expect("export");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("header size")) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).expect("header");
    let mut names: Vec<String> = header
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect();
    names.sort();
    names
}

#[test]
fn trainable_distiller_modules_train_resume_and_stay_out_of_the_export() {
    let _serial = serial();
    let tmp = tempfile::tempdir().expect("tmp");
    let cfg = common::tiny_config(&[]);
    let (a, b, frozen) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );

    let full = train(&cfg, &mut Connector { lr_mult: 1.0 }, &a, false, None).expect("train");
    assert!(full.finished);
    let trained = checkpointed_connector(&a);
    let init = initial_connector();
    assert_ne!(trained, init, "the connector did not train");
    let logged: Vec<f64> = lines(&a)
        .iter()
        .filter(|l| l["kind"] == "train")
        .map(|l| l["loss_connector"].as_f64().expect("loss_connector"))
        .collect();
    assert_eq!(logged.len(), 8);
    assert!(
        logged[7] < logged[0],
        "the connector's loss fell: {logged:?}"
    );

    // Killed at step 3 and resumed: bit-identical log and connector.
    let part = train(&cfg, &mut Connector { lr_mult: 1.0 }, &b, false, Some(3)).expect("part");
    assert!(!part.finished);
    train(&cfg, &mut Connector { lr_mult: 1.0 }, &b, true, None).expect("resume");
    assert_eq!(lines(&a), lines(&b), "metrics differ after resume");
    assert_eq!(checkpointed_connector(&b), trained);

    // Its own learning rate: at multiplier 0 it keeps its initial weights.
    train(&cfg, &mut Connector { lr_mult: 0.0 }, &frozen, false, None).expect("lr 0");
    assert_eq!(checkpointed_connector(&frozen), init);

    // The export holds the student alone: the same tensors as a run without a distiller.
    let plain = tmp.path().join("plain");
    train(&cfg, &mut NoDistill, &plain, false, None).expect("plain");
    assert_eq!(
        exported_names(&a.join("model.safetensors")),
        exported_names(&plain.join("model.safetensors"))
    );
}

#[test]
fn trainable_distiller_modules_work_with_replicas() {
    let _serial = serial();
    let tmp = tempfile::tempdir().expect("tmp");
    // Frozen norms, as replicas require; no dense head, whose loss is normalised by positive
    // tokens rather than boxes, so that the shards sum exactly to the batch.
    let sets = [
        "detr.model.backbone.norm=\"frozen\"",
        "detr.model.dense_head=false",
        "optim.replicas=2",
    ];
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    train(
        &common::tiny_config(&sets[..2]),
        &mut Connector { lr_mult: 1.0 },
        &one,
        false,
        None,
    )
    .expect("1");
    train(
        &common::tiny_config(&sets),
        &mut Connector { lr_mult: 1.0 },
        &two,
        false,
        None,
    )
    .expect("2");
    let first = |dir: &PathBuf| lines(dir).into_iter().find(|l| l["kind"] == "train");
    let (x, y) = (first(&one).expect("line"), first(&two).expect("line"));
    // The first step sees the same parameters: the shards' weighted losses sum to the batch's.
    for key in ["loss_connector", "loss", "grad_norm"] {
        let (p, q) = (x[key].as_f64().expect("x"), y[key].as_f64().expect("y"));
        assert!((p - q).abs() <= 1e-4 * p.abs(), "{key}: {p} vs {q}");
    }
    assert_ne!(checkpointed_connector(&two), initial_connector());
}

/// A distiller that only holds a frozen teacher (feature-KD methods build on this).
struct WithTeacher<M> {
    teacher: FrozenTeacher<M>,
}

impl<B: AutodiffBackend> Distiller<B, DetrTask> for WithTeacher<InnerModel<B, DetrTask>> {
    type Trainable = PhantomData<B>;
    type State = ();

    fn init_trainable(&self, _device: &B::Device) -> densekd::Result<PhantomData<B>> {
        Ok(PhantomData)
    }

    fn teachers(&self) -> Vec<&FrozenTeacher<InnerModel<B, DetrTask>>> {
        vec![&self.teacher]
    }

    fn state(&self) {}

    fn load_state(&mut self, _state: ()) {}
}

fn load_teacher(cfg: &TrainConfig, spec: &Path) -> densekd::Result<WithTeacher<Detr<Inference>>> {
    let teacher = FrozenTeacher::load::<Training, _>(&task(cfg), "teacher", spec)?;
    Ok(WithTeacher { teacher })
}

#[test]
fn frozen_teachers_are_checked_and_evaluated_before_step_0() {
    let _serial = serial();
    let tmp = tempfile::tempdir().expect("tmp");
    // A teacher good enough to beat chance on the tiny validation split.
    let teacher_cfg = common::tiny_config(&[
        "data.synthetic.train_images=48",
        "optim.epochs=16",
        "optim.lr=5e-3",
        "optim.warmup_steps=20",
    ]);
    let teacher_dir = tmp.path().join("teacher");
    train(&teacher_cfg, &mut NoDistill, &teacher_dir, false, None).expect("teacher");
    let cfg = common::tiny_config(&[]);

    let mut distiller = load_teacher(&cfg, &teacher_dir).expect("load from a run folder");
    let before = values(distiller.teacher.model.query_content.val());
    let student_dir = tmp.path().join("student");
    train(&cfg, &mut distiller, &student_dir, false, None).expect("student");
    let first = &lines(&student_dir)[0];
    assert_eq!(first["kind"], "eval", "{first}");
    assert_eq!(first["model"], "teacher", "{first}");
    assert_eq!(first["step"], 0, "{first}");
    assert!(first["AP"].as_f64().expect("AP") > 0.01, "{first}");
    assert_eq!(values(distiller.teacher.model.query_content.val()), before);
    let reloaded = load_teacher(&cfg, &teacher_dir.join("model.safetensors")).expect("file");
    assert_eq!(values(reloaded.teacher.model.query_content.val()), before);

    let missing = tmp.path().join("nothing-here");
    let e = load_teacher(&cfg, &missing).err().expect("missing");
    assert!(e.to_string().contains("nothing-here"), "{e}");

    // Another architecture: safetensors that are not a DETR export.
    let foreign = tmp.path().join("linear.safetensors");
    let linear: Linear<Inference> = LinearConfig::new(2, 2).init(&Default::default());
    densekd::model::weights::save_native(&linear, &foreign, &[]).expect("save");
    let e = load_teacher(&cfg, &foreign).err().expect("foreign");
    assert!(
        e.to_string().contains("linear.safetensors") && e.to_string().contains("DETR"),
        "{e}"
    );

    // An untrained teacher scores at chance: refused before step 0, nothing trained.
    let untrained = tmp.path().join("untrained.safetensors");
    let t = task(&cfg);
    let init = t.init_model::<Training>(&Default::default()).expect("init");
    Task::<Training>::export(&t, &init.valid(), &untrained).expect("export");
    let mut distiller = load_teacher(&cfg, &untrained).expect("loads");
    let refused = tmp.path().join("refused");
    let e = train(&cfg, &mut distiller, &refused, false, None).expect_err("chance-level teacher");
    assert!(
        e.to_string().contains("untrained.safetensors") && e.to_string().contains("chance"),
        "{e}"
    );
    assert!(lines(&refused).iter().all(|l| l["kind"] != "train"));
    assert!(!refused.join("checkpoints").exists());
}
