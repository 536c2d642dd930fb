//! Teacher-based distillation of a DeepLabV3 student (`method = "seg-kd"`): a frozen teacher
//! trained by densekd, and any combination of pixel-wise KD, CWD on logits, CWD on head
//! features (through a trained 1×1 connector when the channel counts differ) and RDD, which
//! replaces the student's own pixel loss. Each term is its own module: [`super::pixel_kd`],
//! [`super::cwd`], [`super::rdd`].

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::data::segmentation::SegBatch;
use crate::distill::cwd::{channel_wise_divergence, CwdConfig};
use crate::distill::pixel_kd::{pixel_kd, KdResolution, PixelKdConfig};
use crate::distill::rdd::{tfe_head_loss, tfe_weights, tse_head_loss, RddConfig, RddStage};
use crate::distill::teacher::FrozenTeacher;
use crate::distill::teacher_cache::TeacherCache;
use crate::distill::Distiller;
use crate::error::{Error, Result};
use crate::model::deeplabv3::task::SegTask;
use crate::model::deeplabv3::{DeepLabV3, SegOutput};
use crate::model::layers::conv::conv2d;
use crate::model::layers::resize::{resize, Sampling};
use crate::ops::pixel::PixelLabels;
use crate::task::{InnerModel, Losses, Task};

/// What seg-kd's teacher-cache entries hold: DeepLabV3's head features, logits and aux logits.
const CACHE_SCHEMA: &str = "deeplabv3:features,logits,aux_logits";

/// The label of the frozen teacher in logs and reports.
pub const TEACHER_LABEL: &str = "teacher";

/// `[distill]` of `method = "seg-kd"`: the teacher and the terms (each off unless its table is
/// present; at least one must be).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegKdConfig {
    /// The teacher: a finished DeepLabV3 run folder or its `model.safetensors`.
    pub teacher: PathBuf,
    /// Pixel-wise KD on the main logits.
    #[serde(default)]
    pub kd: Option<PixelKdConfig>,
    /// CWD on the main logits.
    #[serde(default)]
    pub cwd_logits: Option<CwdConfig>,
    /// CWD on the head features before the classifier.
    #[serde(default)]
    pub cwd_features: Option<CwdConfig>,
    /// RDD in place of the student's pixel loss.
    #[serde(default)]
    pub rdd: Option<RddConfig>,
    /// A folder caching the teacher's outputs per batch, shared by runs with the same teacher
    /// and seed (results are unchanged; each entry holds a batch's maps, ~150 kB per image for
    /// the shipped teacher).
    #[serde(default)]
    pub teacher_cache: Option<PathBuf>,
}

impl SegKdConfig {
    /// Checks the settings, naming `distill.<key>`.
    pub fn validate(&self) -> Result<()> {
        if self.kd.is_none()
            && self.cwd_logits.is_none()
            && self.cwd_features.is_none()
            && self.rdd.is_none()
        {
            return Err(Error::config(
                "distill",
                "seg-kd has no term: add one or more of distill.kd, distill.cwd_logits, \
                 distill.cwd_features, distill.rdd",
            ));
        }
        if let Some(kd) = &self.kd {
            kd.validate("distill.kd")?;
        }
        if let Some(c) = &self.cwd_logits {
            c.validate("distill.cwd_logits")?;
        }
        if let Some(c) = &self.cwd_features {
            c.validate("distill.cwd_features")?;
        }
        if let Some(r) = &self.rdd {
            r.validate()?;
        }
        Ok(())
    }
}

/// The modules seg-kd trains beside the student.
#[derive(Module, Debug)]
pub struct SegKdModules<B: Backend> {
    /// Maps the student's head features onto the teacher's channels for CWD on features.
    pub connector: Option<Conv2d<B>>,
}

/// The seg-kd distiller.
pub struct SegKd<B: AutodiffBackend> {
    config: SegKdConfig,
    teacher: FrozenTeacher<DeepLabV3<B::InnerBackend>>,
    cache: Option<TeacherCache>,
    /// Head channels of (student, teacher).
    channels: (usize, usize),
    total_steps: usize,
    /// Optimiser steps done (RDD's stage).
    step: usize,
}

impl<B: AutodiffBackend> SegKd<B> {
    /// Loads the teacher for `task`'s data and checks that it has what the terms need.
    pub fn new(task: &SegTask, config: SegKdConfig, total_steps: usize) -> Result<Self> {
        let teacher = FrozenTeacher::load::<B, _>(task, TEACHER_LABEL, Path::new(&config.teacher))?;
        let section = task.section();
        if config.rdd.is_some() {
            if teacher.model.aux_classifier.is_none() {
                return Err(Error::invalid(
                    &teacher.source,
                    "aux_classifier",
                    "the teacher has no auxiliary head, which RDD's difficulty needs: train it \
                     with deeplabv3.model.aux_head = true",
                ));
            }
            if section.loss.ohem.is_some() {
                return Err(Error::config(
                    "deeplabv3.loss.ohem",
                    "RDD replaces the pixel loss with its own hard-pixel selection: unset one",
                ));
            }
        }
        let channels = (
            section.model.channels,
            teacher.model.classifier.conv.conv.weight.dims()[0],
        );
        let cache = config
            .teacher_cache
            .as_deref()
            .map(|dir| TeacherCache::open(dir, &teacher.source, CACHE_SCHEMA))
            .transpose()?;
        Ok(SegKd {
            config,
            teacher,
            cache,
            channels,
            total_steps,
            step: 0,
        })
    }

    /// The teacher's forward pass on `batch`, as constants of the student's graph, and whether
    /// it came from the cache (`None` without one).
    fn teacher_output(
        &self,
        batch: &SegBatch,
        device: &B::Device,
    ) -> Result<(TeacherOutput<B>, Option<bool>)> {
        let forward = || {
            let out = self
                .teacher
                .model
                .forward(batch.images_tensor::<B>(device).inner());
            TeacherOutput {
                features: Tensor::from_inner(out.features),
                logits: Tensor::from_inner(out.logits),
                aux_logits: out.aux_logits.map(Tensor::from_inner),
            }
        };
        let Some(cache) = &self.cache else {
            return Ok((forward(), None));
        };
        let names: &[&str] = match self.teacher.model.aux_classifier {
            Some(_) => &["features", "logits", "aux_logits"],
            None => &["features", "logits"],
        };
        let entry = cache.entry(&batch.shape, &batch.images);
        if let Some(mut data) = cache.load(&entry, names)? {
            let tensor = |d: TensorData| Tensor::from_data(d, device);
            let aux_logits = (data.len() == 3).then(|| tensor(data.remove(2)));
            let logits = tensor(data.remove(1));
            let features = tensor(data.remove(0));
            let out = TeacherOutput {
                features,
                logits,
                aux_logits,
            };
            return Ok((out, Some(true)));
        }
        let out = forward();
        let data = |t: &Tensor<B, 4>| t.to_data().convert::<f32>();
        let mut stored = vec![data(&out.features), data(&out.logits)];
        stored.extend(out.aux_logits.as_ref().map(data));
        let named: Vec<(&str, &TensorData)> = names.iter().copied().zip(&stored).collect();
        cache.store(&entry, &named);
        Ok((out, Some(false)))
    }

    /// RDD's replacement of the task loss, with `loss_ce` / `loss_aux` named as the task's.
    fn rdd_losses(
        &self,
        rdd: &RddConfig,
        task: &SegTask,
        student: &SegOutput<B>,
        teacher: &TeacherOutput<B>,
        labels: &PixelLabels<B>,
    ) -> Losses<B> {
        let loss = &task.section().loss;
        let [_, h, w] = labels.shape;
        // The teacher's aux head is checked at load.
        let teacher_aux = teacher
            .aux_logits
            .clone()
            .unwrap_or_else(|| teacher.logits.clone());
        match rdd.stage(self.step, self.total_steps) {
            RddStage::Tfe => {
                let rd = tfe_weights(
                    teacher.logits.clone(),
                    teacher_aux,
                    rdd.tfe_divergence,
                    [h, w],
                );
                let ce = tfe_head_loss(student.logits.clone(), labels, rd.clone());
                let mut losses = Losses::single("loss_ce", ce);
                if let Some(aux) = &student.aux_logits {
                    losses.add(
                        "loss_aux",
                        tfe_head_loss(aux.clone(), labels, rd.clone()),
                        loss.aux_weight,
                    );
                }
                losses.terms.push(("rdd_weight".into(), rd.mean().detach()));
                losses
            }
            RddStage::Tse => {
                let weights = loss.class_weights.as_deref();
                let (ce, kept) = tse_head_loss(
                    student.logits.clone(),
                    teacher.logits.clone(),
                    labels,
                    weights,
                    rdd,
                );
                let mut losses = Losses::single("loss_ce", ce);
                if let Some(aux) = &student.aux_logits {
                    let (aux, _) = tse_head_loss(aux.clone(), teacher_aux, labels, weights, rdd);
                    losses.add("loss_aux", aux, loss.aux_weight);
                }
                let device = labels.index.device();
                losses.terms.push((
                    "rdd_kept".into(),
                    Tensor::from_floats([kept as f32], &device),
                ));
                losses
            }
        }
    }
}

/// What the distillation terms read of the teacher's forward pass (no gradient).
struct TeacherOutput<B: Backend> {
    features: Tensor<B, 4>,
    logits: Tensor<B, 4>,
    aux_logits: Option<Tensor<B, 4>>,
}

/// `teacher` resized to `student`'s spatial size (teachers may run at another output stride).
fn matched<B: Backend>(teacher: Tensor<B, 4>, student: &Tensor<B, 4>) -> Tensor<B, 4> {
    let [_, _, h, w] = student.dims();
    resize(teacher, [h, w], Sampling::Bilinear)
}

impl<B: AutodiffBackend> Distiller<B, SegTask> for SegKd<B> {
    type Trainable = SegKdModules<B>;
    type State = usize;

    fn init_trainable(&self, device: &B::Device) -> Result<SegKdModules<B>> {
        let (s, t) = self.channels;
        Ok(SegKdModules {
            connector: (self.config.cwd_features.is_some() && s != t)
                .then(|| Conv2dConfig::new([s, t], [1, 1]).init(device)),
        })
    }

    fn loss(
        &self,
        task: &SegTask,
        student: &DeepLabV3<B>,
        modules: &SegKdModules<B>,
        batch: &SegBatch,
    ) -> Result<Losses<B>> {
        let out = task.forward(student, batch)?;
        let device = out.logits.device();
        let (teacher, cached) = self.teacher_output(batch, &device)?;
        let labels = task.labels::<B>(batch, &device);
        let c = &self.config;
        let mut losses = match &c.rdd {
            Some(rdd) => self.rdd_losses(rdd, task, &out, &teacher, &labels),
            None => task.pixel_losses(&out, &labels),
        };
        let t_logits = matched(teacher.logits.clone(), &out.logits);
        if let Some(kd) = &c.kd {
            let (s, t) = match kd.resolution {
                KdResolution::Logits => (out.logits.clone(), t_logits.clone()),
                KdResolution::Labels => {
                    let [_, h, w] = labels.shape;
                    let up = |t: &Tensor<B, 4>| resize(t.clone(), [h, w], Sampling::Bilinear);
                    (up(&out.logits), up(&teacher.logits))
                }
            };
            let term = pixel_kd(s, t, kd.temperature);
            losses.add("loss_kd", term, kd.weight);
        }
        if let Some(cwd) = &c.cwd_logits {
            let term = channel_wise_divergence(out.logits.clone(), t_logits, cwd.temperature);
            losses.add("loss_cwd_logits", term, cwd.weight);
        }
        if let Some(cwd) = &c.cwd_features {
            let s = match &modules.connector {
                Some(conv) => conv2d(conv, out.features.clone()),
                None => out.features.clone(),
            };
            let t = matched(teacher.features, &s);
            losses.add(
                "loss_cwd_features",
                channel_wise_divergence(s, t, cwd.temperature),
                cwd.weight,
            );
        }
        if let Some(hit) = cached {
            let hit = Tensor::from_floats([f32::from(u8::from(hit))], &device);
            losses.terms.push(("teacher_cached".into(), hit));
        }
        Ok(losses)
    }

    fn after_step(&mut self, _student: &DeepLabV3<B>, step: usize) {
        self.step = step + 1;
    }

    fn teachers(&self) -> Vec<&FrozenTeacher<InnerModel<B, SegTask>>> {
        vec![&self.teacher]
    }

    fn state(&self) -> usize {
        self.step
    }

    fn load_state(&mut self, step: usize) {
        self.step = step;
    }
}
