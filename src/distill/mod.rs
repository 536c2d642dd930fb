//! Distillers: how a method plugs into the training loop. A distiller may own modules trained
//! with the student (connectors, adapters, an implicit teacher), hold frozen teachers loaded
//! from earlier runs, replace or extend the task's loss with extra forward passes, act after
//! every optimiser step (an EMA update), add models to evaluate and export, and keep state
//! across checkpoints as one typed record.

pub mod cwd;
pub mod ema;
pub mod fcos_kd;
pub mod fitnet;
pub mod lgd;
pub mod od_detr;
pub mod pixel_kd;
pub mod pkd;
pub mod rdd;
pub mod seg_kd;
pub mod teacher;
pub mod teacher_cache;

use std::marker::PhantomData;

use burn::module::AutodiffModule;
use burn::record::Record;
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::task::{InnerModel, Losses, Stats, Task};
use teacher::FrozenTeacher;

/// A distillation method, generic over the task it distils.
pub trait Distiller<B: AutodiffBackend, T: Task<B>> {
    /// Modules trained in the same loop as the student, with their own parameter group
    /// (`PhantomData<B>` when there are none). They are checkpointed with the student and
    /// never exported.
    type Trainable: AutodiffModule<B> + Clone + Send;
    /// Untrained state to checkpoint, e.g. an EMA teacher and its update count (`()` for none).
    type State: Record<B::InnerBackend>;

    /// The trainable modules at step 0.
    fn init_trainable(&self, device: &B::Device) -> Result<Self::Trainable>;

    /// Learning-rate multiplier of the trainable modules' parameter group.
    fn lr_mult(&self) -> f64 {
        1.0
    }

    /// The loss of one batch; plain training is the task's own forward and loss.
    fn loss(
        &self,
        task: &T,
        student: &T::Model,
        _trainable: &Self::Trainable,
        batch: &T::Batch,
    ) -> Result<Losses<B>> {
        task.loss(&task.forward(student, batch)?, batch)
    }

    /// Called after every optimiser step with the updated student.
    fn after_step(&mut self, _student: &T::Model, _step: usize) {}

    /// Models evaluated and exported besides the student, with their labels (e.g. `ema`).
    fn extra_models(&self) -> Vec<(String, InnerModel<B, T>)> {
        Vec::new()
    }

    /// Evaluations that need the trained modules, labelled as in
    /// [`DistillConfig::model_labels`] (LGD's implicit teacher on the validation labels).
    fn evaluate_trainable(
        &self,
        _task: &T,
        _student: &InnerModel<B, T>,
        _trainable: &<Self::Trainable as AutodiffModule<B>>::InnerModule,
    ) -> Result<Vec<(String, Stats)>> {
        Ok(Vec::new())
    }

    /// Frozen teachers, evaluated once before step 0.
    fn teachers(&self) -> Vec<&FrozenTeacher<InnerModel<B, T>>> {
        Vec::new()
    }

    /// The state to checkpoint.
    fn state(&self) -> Self::State;

    /// Restores a state written by [`Distiller::state`].
    fn load_state(&mut self, state: Self::State);
}

/// No distillation: the task's loss alone (the baseline of every method).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoDistill;

impl<B: AutodiffBackend, T: Task<B>> Distiller<B, T> for NoDistill {
    type Trainable = PhantomData<B>;
    type State = ();

    fn init_trainable(&self, _device: &B::Device) -> Result<PhantomData<B>> {
        Ok(PhantomData)
    }

    fn state(&self) {}

    fn load_state(&mut self, _state: ()) {}
}

/// Plain training's (empty) `[distill]` settings.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoDistillConfig {}

/// The `[distill]` section: `method` picks the method, and the method's own settings sit
/// beside it in the same table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "kebab-case")]
pub enum DistillConfig {
    /// Plain training.
    None(NoDistillConfig),
    /// OD-DETR: online distillation from an EMA teacher.
    OdDetr(od_detr::OdDetrConfig),
    /// A frozen segmentation teacher: pixel KD, CWD and RDD.
    SegKd(seg_kd::SegKdConfig),
    /// LGD: an implicit teacher built from the labels and the student's FPN.
    Lgd(lgd::LgdConfig),
    /// A frozen FCOS teacher: CWD, PKD and masked imitation on the FPN.
    FcosKd(fcos_kd::FcosKdConfig),
}

impl Default for DistillConfig {
    fn default() -> Self {
        DistillConfig::None(NoDistillConfig {})
    }
}

impl DistillConfig {
    /// The method's name as configs spell it.
    pub fn method(&self) -> &'static str {
        match self {
            DistillConfig::None(_) => "none",
            DistillConfig::OdDetr(_) => "od-detr",
            DistillConfig::SegKd(_) => "seg-kd",
            DistillConfig::Lgd(_) => "lgd",
            DistillConfig::FcosKd(_) => "fcos-kd",
        }
    }

    /// Labels of the models a run evaluates: `student`, then the method's own.
    pub fn model_labels(&self) -> Vec<&'static str> {
        match self {
            DistillConfig::None(_) => vec!["student"],
            DistillConfig::OdDetr(_) => vec!["student", od_detr::EMA_LABEL],
            DistillConfig::Lgd(_) => vec!["student", lgd::IMPLICIT_TEACHER],
            DistillConfig::SegKd(_) | DistillConfig::FcosKd(_) => vec!["student"],
        }
    }

    /// Checks the method's settings and that it applies to the model kind `kind`.
    pub fn validate(&self, kind: &str) -> Result<()> {
        let supported: &[&str] = match self {
            DistillConfig::None(_) => return Ok(()),
            DistillConfig::OdDetr(c) => {
                c.validate()?;
                &["detr"]
            }
            DistillConfig::SegKd(c) => {
                c.validate()?;
                &["deeplabv3"]
            }
            DistillConfig::Lgd(c) => {
                c.validate()?;
                &["fcos"]
            }
            DistillConfig::FcosKd(c) => {
                c.validate()?;
                &["fcos"]
            }
        };
        if supported.contains(&kind) {
            Ok(())
        } else {
            Err(Error::config(
                "distill.method",
                format!(
                    "`{}` does not apply to the model kind `{kind}` (it distils: {})",
                    self.method(),
                    supported.join(", ")
                ),
            ))
        }
    }
}
