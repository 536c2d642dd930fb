//! Teacher-based feature distillation of an FCOS student (`method = "fcos-kd"`): a frozen,
//! larger FCOS trained by densekd, and any combination of CWD, PKD and FGFI-style masked
//! imitation on every FPN level. Each term is its own module ([`super::cwd`], [`super::pkd`],
//! [`super::fitnet`]); the student's detection loss is kept.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Initializer, PaddingConfig2d};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::data::detection::DetBatch;
use crate::distill::cwd::{channel_wise_divergence, CwdConfig};
use crate::distill::fitnet::{masked_imitation, FitnetConfig};
use crate::distill::pkd::{pearson_distillation, PkdConfig};
use crate::distill::teacher::FrozenTeacher;
use crate::distill::Distiller;
use crate::error::{Error, Result};
use crate::model::fcos::task::{image_boxes, padded_size, FcosTask};
use crate::model::fcos::Fcos;
use crate::model::layers::conv::conv2d;
use crate::ops::boxes::box_mask;
use crate::task::{InnerModel, Losses, Task};

/// The label of the frozen teacher in logs and reports.
pub const TEACHER_LABEL: &str = "teacher";

/// `[distill]` of `method = "fcos-kd"`: the teacher and the terms (each off unless its table is
/// present; at least one must be).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FcosKdConfig {
    /// The teacher: a finished FCOS run folder or its `model.safetensors`.
    pub teacher: PathBuf,
    /// CWD on each FPN level (mmrazor's FPN recipe: τ 1, weight 10 per level).
    #[serde(default)]
    pub cwd: Option<CwdConfig>,
    /// PKD on each FPN level.
    #[serde(default)]
    pub pkd: Option<PkdConfig>,
    /// Masked imitation inside the boxes on each FPN level, through a 3×3 adapter.
    #[serde(default)]
    pub fitnet: Option<FitnetConfig>,
}

impl FcosKdConfig {
    /// Checks the settings, naming `distill.<key>`.
    pub fn validate(&self) -> Result<()> {
        if self.cwd.is_none() && self.pkd.is_none() && self.fitnet.is_none() {
            return Err(Error::config(
                "distill",
                "fcos-kd has no term: add one or more of distill.cwd, distill.pkd, distill.fitnet",
            ));
        }
        if let Some(c) = &self.cwd {
            c.validate("distill.cwd")?;
        }
        if let Some(c) = &self.pkd {
            c.validate("distill.pkd")?;
        }
        if let Some(c) = &self.fitnet {
            c.validate("distill.fitnet")?;
        }
        Ok(())
    }
}

/// The modules fcos-kd trains beside the student.
#[derive(Module, Debug)]
pub struct FcosKdModules<B: Backend> {
    /// 1×1 map of the student's FPN onto the teacher's width for CWD and PKD, when they
    /// differ.
    pub connector: Option<Conv2d<B>>,
    /// FGFI's 3×3 adapter for the masked imitation.
    pub adapter: Option<Conv2d<B>>,
}

/// The fcos-kd distiller.
pub struct FcosKd<B: AutodiffBackend> {
    config: FcosKdConfig,
    teacher: FrozenTeacher<Fcos<B::InnerBackend>>,
    /// FPN widths of (student, teacher).
    channels: (usize, usize),
}

impl<B: AutodiffBackend> FcosKd<B> {
    /// Loads the teacher for `task`'s data and checks its pyramid matches the student's.
    pub fn new(task: &FcosTask, config: FcosKdConfig) -> Result<Self> {
        let teacher = FrozenTeacher::load::<B, _>(task, TEACHER_LABEL, Path::new(&config.teacher))?;
        let levels = teacher.model.fpn.layer_blocks.len()
            + usize::from(teacher.model.fpn.p6.is_some())
            + usize::from(teacher.model.fpn.p7.is_some());
        let student = &task.section().model;
        if levels != student.strides.len() {
            return Err(Error::invalid(
                &teacher.source,
                "fcos.model.strides",
                format!(
                    "the teacher has {levels} FPN levels and the student {}: distillation pairs \
                     them level by level",
                    student.strides.len()
                ),
            ));
        }
        let channels = (
            student.channels,
            teacher.model.fpn.layer_blocks[0].weight.dims()[0],
        );
        Ok(FcosKd {
            config,
            teacher,
            channels,
        })
    }

    /// The teacher's FPN on `batch`, as constants of the student's graph.
    fn teacher_fpn(&self, batch: &DetBatch, device: &B::Device) -> Vec<Tensor<B, 4>> {
        let images = batch.images_tensor::<B>(device).inner();
        self.teacher
            .model
            .forward(images)
            .fpn
            .into_iter()
            .map(Tensor::from_inner)
            .collect()
    }
}

/// The union of `batch`'s boxes on an `(h, w)` level, `[N, h, w]`.
fn object_mask<B: Backend>(
    batch: &DetBatch,
    (h, w): (usize, usize),
    device: &B::Device,
) -> Tensor<B, 3> {
    let padded = padded_size(batch);
    let images = image_boxes(&batch.targets);
    let mut data = vec![0f32; images.len() * h * w];
    for (i, image) in images.iter().enumerate() {
        for b in &image.boxes {
            for (cell, v) in box_mask(b, padded, (h, w)).into_iter().enumerate() {
                if v > 0.0 {
                    data[i * h * w + cell] = 1.0;
                }
            }
        }
    }
    Tensor::from_data(TensorData::new(data, [images.len(), h, w]), device)
}

impl<B: AutodiffBackend> Distiller<B, FcosTask> for FcosKd<B> {
    type Trainable = FcosKdModules<B>;
    type State = ();

    fn init_trainable(&self, device: &B::Device) -> Result<FcosKdModules<B>> {
        let (s, t) = self.channels;
        let feature_terms = self.config.cwd.is_some() || self.config.pkd.is_some();
        Ok(FcosKdModules {
            connector: (feature_terms && s != t)
                .then(|| Conv2dConfig::new([s, t], [1, 1]).init(device)),
            adapter: self.config.fitnet.map(|_| {
                Conv2dConfig::new([s, t], [3, 3])
                    .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                    .with_initializer(Initializer::Normal {
                        mean: 0.0,
                        std: 1e-4,
                    })
                    .init(device)
            }),
        })
    }

    fn loss(
        &self,
        task: &FcosTask,
        student: &Fcos<B>,
        modules: &FcosKdModules<B>,
        batch: &DetBatch,
    ) -> Result<Losses<B>> {
        let out = Task::<B>::forward(task, student, batch)?;
        let mut losses = Task::<B>::loss(task, &out, batch)?;
        let device = student.scales.device();
        let teacher = self.teacher_fpn(batch, &device);
        let c = &self.config;
        let mut cwd = Vec::new();
        let mut pkd = Vec::new();
        let mut fitnet = Vec::new();
        for (s, t) in out.fpn.iter().zip(&teacher) {
            let connected = || match &modules.connector {
                Some(conv) => conv2d(conv, s.clone()),
                None => s.clone(),
            };
            if let Some(cfg) = &c.cwd {
                cwd.push(channel_wise_divergence(
                    connected(),
                    t.clone(),
                    cfg.temperature,
                ));
            }
            if c.pkd.is_some() {
                pkd.push(pearson_distillation(connected(), t.clone()));
            }
            if let Some(adapter) = &modules.adapter {
                let [_, _, h, w] = s.dims();
                let mask = object_mask::<B>(batch, (h, w), &device);
                fitnet.push(masked_imitation(
                    adapter.forward(s.clone()),
                    t.clone(),
                    mask,
                ));
            }
        }
        let sum = |terms: Vec<Tensor<B, 1>>| terms.into_iter().reduce(|a, b| a + b);
        if let (Some(cfg), Some(term)) = (&c.cwd, sum(cwd)) {
            losses.add("loss_cwd", term, cfg.weight);
        }
        if let (Some(cfg), Some(term)) = (&c.pkd, sum(pkd)) {
            losses.add("loss_pkd", term, cfg.weight);
        }
        if let (Some(cfg), Some(term)) = (&c.fitnet, sum(fitnet)) {
            losses.add("loss_fitnet", term, cfg.weight);
        }
        Ok(losses)
    }

    fn teachers(&self) -> Vec<&FrozenTeacher<InnerModel<B, FcosTask>>> {
        vec![&self.teacher]
    }

    fn state(&self) {}

    fn load_state(&mut self, _state: ()) {}
}
