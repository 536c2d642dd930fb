//! Distillers: how a method plugs into the training loop. A distiller may run extra forward
//! passes (a teacher), replace or extend the task's loss, act after every optimiser step (an EMA
//! update), add models to evaluate and export, and keep state across checkpoints.

pub mod ema;
pub mod od_detr;

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;

use crate::error::Result;
use crate::train::{Losses, Task};

/// The inference form of a task's model.
pub type InnerModel<B, T> = <<T as Task<B>>::Model as AutodiffModule<B>>::InnerModule;

/// A distillation method, generic over the task it distils.
pub trait Distiller<B: AutodiffBackend, T: Task<B>> {
    /// The loss of one batch; plain training is the task's own loss.
    fn loss(&self, task: &T, student: &T::Model, batch: &T::Batch) -> Result<Losses<B>> {
        task.loss(student, batch)
    }

    /// Called after every optimiser step with the updated student.
    fn after_step(&mut self, _student: &T::Model, _step: usize) {}

    /// Models evaluated and exported besides the student, with their labels (e.g. `ema`).
    fn extra_models(&self) -> Vec<(String, InnerModel<B, T>)> {
        Vec::new()
    }

    /// Named records to checkpoint.
    fn state(&self) -> Result<Vec<(String, Vec<u8>)>> {
        Ok(Vec::new())
    }

    /// Names of the records [`Distiller::state`] writes.
    fn state_names(&self) -> Vec<&'static str> {
        Vec::new()
    }

    /// Restores the records written by [`Distiller::state`].
    fn load_state(&mut self, _parts: &[(String, Vec<u8>)], _device: &B::Device) -> Result<()> {
        Ok(())
    }
}

/// No distillation: the task's loss alone (the baseline of every method).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoDistill;

impl<B: AutodiffBackend, T: Task<B>> Distiller<B, T> for NoDistill {}

/// Which distillation method trains the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DistillMethod {
    /// Plain training.
    #[default]
    None,
    /// OD-DETR: online distillation from an EMA teacher.
    OdDetr,
}

/// The `[distill]` section of a training config.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DistillConfig {
    /// The method.
    pub method: DistillMethod,
    /// OD-DETR's settings (used when `method = "od-detr"`).
    pub od_detr: od_detr::OdDetrConfig,
}
