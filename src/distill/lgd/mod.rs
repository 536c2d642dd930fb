//! LGD, label-guided self-distillation (Zhang et al., AAAI 2022; `method = "lgd"`): an
//! implicit teacher built from the ground-truth labels and the student's own FPN features
//! ([`teacher`]) gives teacher maps with the FPN's shapes; the **student's head** detects on
//! them (the teacher's detection loss), and the student's FPN, through an adapter, is pulled
//! towards them (instance-normalised MSE against the detached maps). The teacher and the adapter
//! are trained with the student and discarded at inference. Spec:
//! `../shared/docs/methods/lgd.md`.

pub mod teacher;

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::PaddingConfig2d;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{activation::relu, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::data::detection::{DetBatch, DetTarget};
use crate::distill::Distiller;
use crate::error::{Error, Result};
use crate::eval::coco::Detection;
use crate::model::fcos::loss::FcosLosses;
use crate::model::fcos::task::{decode_levels, image_boxes, padded_size, FcosTask};
use crate::model::fcos::Fcos;
use crate::task::{Losses, Stats};
use teacher::{ImplicitTeacher, Interact, Objects};

/// The label of the implicit teacher's evaluation in logs and reports.
pub const IMPLICIT_TEACHER: &str = "implicit_teacher";

/// `[distill]` of `method = "lgd"`; defaults are the official code's, with its phases (in
/// iterations of a 180k schedule) given here in steps and off by default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LgdConfig {
    /// λ of the distillation MSE.
    #[serde(default = "one")]
    pub weight: f64,
    /// Weight of the teacher's detection loss (the student's head on the teacher maps).
    #[serde(default = "one")]
    pub teacher_weight: f64,
    /// Adds a whole-image context token to each image's objects (`ADD_CONTEXT_BOX`).
    #[serde(default)]
    pub context_box: bool,
    /// Detaches the FPN features the teacher pools (`DETACH_APPEARANCE_EMBED`): the student
    /// then gets no gradient from the teacher's detection loss.
    #[serde(default)]
    pub detach_appearance: bool,
    /// How each object's vector is formed from its label embedding and appearance.
    #[serde(default)]
    pub interact: Interact,
    /// Heads of the relation adapter's attention (must divide the FPN width).
    #[serde(default = "eight")]
    pub heads: usize,
    /// Adds the identity to the T-Nets' transforms (a stabiliser; the official code has none).
    #[serde(default)]
    pub tnet_identity: bool,
    /// Steps during which the student's backbone gets no gradient.
    #[serde(default)]
    pub freeze_backbone_steps: usize,
    /// Steps before the distillation reaches the student (until then only the adapter learns
    /// from it).
    #[serde(default)]
    pub distill_warmup_steps: usize,
    /// The step from which the distillation stops reaching the student again, if any.
    #[serde(default)]
    pub distill_stop_step: Option<usize>,
    /// Learning rate of the implicit teacher and the adapter, as a multiple of the student's
    /// (the official code: 1).
    #[serde(default = "one")]
    pub teacher_lr_mult: f64,
}

fn one() -> f64 {
    1.0
}

fn eight() -> usize {
    8
}

impl LgdConfig {
    /// Checks the settings, naming `distill.<key>`.
    pub fn validate(&self) -> Result<()> {
        for (k, v) in [
            ("weight", self.weight),
            ("teacher_weight", self.teacher_weight),
            ("teacher_lr_mult", self.teacher_lr_mult),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::config(
                    format!("distill.{k}"),
                    format!("must be ≥ 0, got {v}"),
                ));
            }
        }
        if self.heads == 0 {
            return Err(Error::config("distill.heads", "must be at least 1"));
        }
        if let Some(stop) = self.distill_stop_step {
            if stop <= self.distill_warmup_steps {
                return Err(Error::config(
                    "distill.distill_stop_step",
                    format!(
                        "{stop} is not after distill_warmup_steps = {}",
                        self.distill_warmup_steps
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Whether the distillation reaches the student at `step`.
    pub fn distills_at(&self, step: usize) -> bool {
        step >= self.distill_warmup_steps && self.distill_stop_step.is_none_or(|s| step < s)
    }
}

/// The adapter on the student's FPN: conv-ReLU-conv-ReLU-conv (3×3), shared by every level.
#[derive(Module, Debug)]
pub struct Adapter<B: Backend> {
    /// The three convolutions.
    pub convs: Vec<Conv2d<B>>,
}

impl<B: Backend> Adapter<B> {
    fn new(channels: usize, device: &B::Device) -> Self {
        Adapter {
            convs: (0..3)
                .map(|_| {
                    Conv2dConfig::new([channels, channels], [3, 3])
                        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                        .init(device)
                })
                .collect(),
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let last = self.convs.len() - 1;
        self.convs.iter().enumerate().fold(x, |x, (i, conv)| {
            let y = conv.forward(x);
            if i < last {
                relu(y)
            } else {
                y
            }
        })
    }
}

/// What LGD trains beside the student.
#[derive(Module, Debug)]
pub struct LgdModules<B: Backend> {
    /// The implicit teacher.
    pub teacher: ImplicitTeacher<B>,
    /// The adapter on the student's FPN.
    pub adapter: Adapter<B>,
}

/// Instance normalisation without affine: each sample's channel over its positions (ε 1e-5).
fn instance_norm<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [n, c, h, w] = x.dims();
    let flat = x.reshape([n, c, h * w]);
    let (var, mean) = flat.clone().var_mean_bias(2);
    ((flat - mean) / var.add_scalar(1e-5).sqrt()).reshape([n, c, h, w])
}

/// LGD's distillation loss: the mean squared difference of the instance-normalised student
/// and teacher maps over every element of every level (levels weighted by their size).
pub fn lgd_distill_loss<B: Backend>(
    student: &[Tensor<B, 4>],
    teacher: &[Tensor<B, 4>],
) -> Tensor<B, 1> {
    let mut total = None;
    let mut count = 0;
    for (s, t) in student.iter().zip(teacher) {
        count += s.dims().iter().product::<usize>();
        let d = (instance_norm(s.clone()) - instance_norm(t.clone()))
            .square()
            .sum();
        total = Some(match total {
            Some(acc) => acc + d,
            None => d,
        });
    }
    match total {
        Some(t) => t.div_scalar(count.max(1) as f64),
        None => Tensor::zeros([1], &Default::default()),
    }
}

/// The three parts of LGD's loss, unweighted.
pub struct LgdTerms<B: Backend> {
    /// The student's detection loss.
    pub student: FcosLosses<B>,
    /// The detection loss of the student's head on the teacher maps (`None` when no image of
    /// the batch has a box).
    pub teacher: Option<FcosLosses<B>>,
    /// The distillation MSE.
    pub distill: Option<Tensor<B, 1>>,
}

/// The images of `targets` with at least one box.
fn labelled(targets: &[DetTarget]) -> Vec<usize> {
    (0..targets.len())
        .filter(|&i| !targets[i].boxes.is_empty())
        .collect()
}

/// The implicit teacher's maps of the images of a batch with at least one box.
struct TeacherMaps<B: Backend> {
    /// Those images' student FPN levels.
    fpn: Vec<Tensor<B, 4>>,
    /// Their targets.
    targets: Vec<DetTarget>,
    /// The teacher maps, with the shapes of `fpn`.
    maps: Vec<Tensor<B, 4>>,
}

/// The teacher maps of the images of `targets` with boxes, from their student FPN levels
/// (`None` when no image has a box: the official code drops such images).
fn teacher_maps<B: Backend>(
    config: &LgdConfig,
    num_classes: usize,
    teacher: &ImplicitTeacher<B>,
    fpn: Vec<Tensor<B, 4>>,
    targets: &[DetTarget],
    padded: (usize, usize),
) -> Option<TeacherMaps<B>> {
    let keep = labelled(targets);
    if keep.is_empty() {
        return None;
    }
    let device = fpn.first()?.device();
    let fpn: Vec<Tensor<B, 4>> = if keep.len() == targets.len() {
        fpn
    } else {
        let idx = Tensor::<B, 1, Int>::from_data(
            TensorData::new(keep.iter().map(|&i| i as i64).collect(), [keep.len()]),
            &device,
        );
        fpn.into_iter().map(|p| p.select(0, idx.clone())).collect()
    };
    let targets: Vec<DetTarget> = keep.iter().map(|&i| targets[i].clone()).collect();
    let shapes: Vec<(usize, usize)> = fpn
        .iter()
        .map(|p| {
            let [_, _, h, w] = p.dims();
            (h, w)
        })
        .collect();
    let objects = Objects::new(
        &image_boxes(&targets),
        num_classes,
        config.context_box,
        padded,
        &shapes,
        &device,
    );
    let pooled: Vec<Tensor<B, 4>> = if config.detach_appearance {
        fpn.iter().map(|p| p.clone().detach()).collect()
    } else {
        fpn.clone()
    };
    let maps = teacher.forward(&pooled, &objects, config.interact);
    Some(TeacherMaps { fpn, targets, maps })
}

/// LGD's loss terms of one batch at optimiser step `step`.
pub fn lgd_terms<B: Backend>(
    config: &LgdConfig,
    task: &FcosTask,
    student: &Fcos<B>,
    modules: &LgdModules<B>,
    batch: &DetBatch,
    step: usize,
) -> LgdTerms<B> {
    let device = student.scales.device();
    let freeze = step < config.freeze_backbone_steps;
    let out = student.forward_with(batch.images_tensor(&device), freeze);
    let padded = padded_size(batch);
    let terms = task.loss_terms(&out.levels, &batch.targets, padded);
    let num_classes = task.section().model.num_classes;
    let Some(t) = teacher_maps(
        config,
        num_classes,
        &modules.teacher,
        out.fpn,
        &batch.targets,
        padded,
    ) else {
        return LgdTerms {
            student: terms,
            teacher: None,
            distill: None,
        };
    };
    let teacher = task.loss_terms(&student.head(&t.maps), &t.targets, padded);
    let distills = config.distills_at(step);
    let adapted: Vec<Tensor<B, 4>> = t
        .fpn
        .into_iter()
        .map(|p| {
            modules
                .adapter
                .forward(if distills { p } else { p.detach() })
        })
        .collect();
    let detached: Vec<Tensor<B, 4>> = t.maps.into_iter().map(|m| m.detach()).collect();
    LgdTerms {
        student: terms,
        teacher: Some(teacher),
        distill: Some(lgd_distill_loss(&adapted, &detached)),
    }
}

/// The implicit teacher's detections on `batch` (the official `EVAL_TEACHER`): the student's
/// head on the teacher maps built from the batch's own labels. An image without boxes gets
/// none, as the teacher has nothing to render for it.
pub fn teacher_detections<B: Backend>(
    config: &LgdConfig,
    task: &FcosTask,
    student: &Fcos<B>,
    teacher: &ImplicitTeacher<B>,
    batch: &DetBatch,
) -> Vec<Vec<Detection>> {
    let out = student.forward(batch.images_tensor(&student.scales.device()));
    let padded = padded_size(batch);
    let num_classes = task.section().model.num_classes;
    let mut all = vec![Vec::new(); batch.targets.len()];
    let Some(t) = teacher_maps(
        config,
        num_classes,
        teacher,
        out.fpn,
        &batch.targets,
        padded,
    ) else {
        return all;
    };
    let model = &task.section().model;
    let detections = decode_levels(
        &student.head(&t.maps),
        &t.targets,
        padded,
        &model.strides,
        &task.section().eval,
    );
    for (i, d) in labelled(&batch.targets).into_iter().zip(detections) {
        all[i] = d;
    }
    all
}

/// The LGD distiller.
pub struct Lgd {
    config: LgdConfig,
    /// The student's FPN width.
    channels: usize,
    num_classes: usize,
    /// Optimiser steps done (the phases).
    step: usize,
}

impl Lgd {
    /// LGD for `task`'s student.
    pub fn new(task: &FcosTask, config: LgdConfig) -> Result<Self> {
        let model = &task.section().model;
        if !model.channels.is_multiple_of(config.heads) {
            return Err(Error::config(
                "distill.heads",
                format!(
                    "{} heads do not divide fcos.model.channels = {}",
                    config.heads, model.channels
                ),
            ));
        }
        Ok(Lgd {
            config,
            channels: model.channels,
            num_classes: model.num_classes,
            step: 0,
        })
    }
}

impl<B: AutodiffBackend> Distiller<B, FcosTask> for Lgd {
    type Trainable = LgdModules<B>;
    type State = usize;

    fn lr_mult(&self) -> f64 {
        self.config.teacher_lr_mult
    }

    fn init_trainable(&self, device: &B::Device) -> Result<LgdModules<B>> {
        let c = &self.config;
        Ok(LgdModules {
            teacher: ImplicitTeacher::new(
                self.num_classes,
                self.channels,
                c.heads,
                c.context_box,
                c.tnet_identity,
                device,
            ),
            adapter: Adapter::new(self.channels, device),
        })
    }

    fn loss(
        &self,
        task: &FcosTask,
        student: &Fcos<B>,
        modules: &LgdModules<B>,
        batch: &DetBatch,
    ) -> Result<Losses<B>> {
        let terms = lgd_terms(&self.config, task, student, modules, batch, self.step);
        let mut losses = task.losses(terms.student, "");
        if let Some(teacher) = terms.teacher {
            let t = task.losses(teacher, "teacher_");
            losses.total = losses.total + t.total.mul_scalar(self.config.teacher_weight);
            losses.terms.extend(t.terms);
        }
        if let Some(d) = terms.distill {
            losses.add("loss_lgd", d, self.config.weight);
        }
        Ok(losses)
    }

    fn evaluate_trainable(
        &self,
        task: &FcosTask,
        student: &Fcos<B::InnerBackend>,
        modules: &LgdModules<B::InnerBackend>,
    ) -> Result<Vec<(String, Stats)>> {
        let stats = task.evaluate_with(|batch| {
            teacher_detections(&self.config, task, student, &modules.teacher, batch)
        })?;
        Ok(vec![(IMPLICIT_TEACHER.to_string(), stats)])
    }

    fn after_step(&mut self, _student: &Fcos<B>, step: usize) {
        self.step = step + 1;
    }

    fn state(&self) -> usize {
        self.step
    }

    fn load_state(&mut self, step: usize) {
        self.step = step;
    }
}
