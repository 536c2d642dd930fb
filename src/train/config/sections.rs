//! The model-independent config sections: `[optim]`, `[eval]` and `[checkpoint]`.

use serde::{Deserialize, Serialize};

/// Learning-rate decay after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Constant.
    Constant,
    /// Multiply by `gamma` at each of `milestones` (epochs).
    Step,
    /// Cosine from the base rate to `min_lr_ratio` × base at the last step.
    Cosine,
    /// Polynomial, `min + (base − min)·(1 − t)^power` over the steps after warm-up, with `min`
    /// = `min_lr_ratio` × base (mmseg's `PolyLR`, the segmentation recipes' schedule).
    Poly,
}

/// The update rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// AdamW with decoupled weight decay and `eps`.
    Adamw,
    /// SGD with `momentum` (PyTorch's: no dampening, optionally Nesterov) and L2 weight decay
    /// added to the gradient, as `torch.optim.SGD`: the detection and segmentation papers'
    /// recipes.
    Sgd,
}

/// The optimiser, its schedule and the length of training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// The update rule.
    #[serde(default = "default_optimizer")]
    pub optimizer: OptimizerKind,
    /// SGD's momentum (0 = plain SGD).
    #[serde(default = "default_momentum")]
    pub momentum: f64,
    /// SGD with Nesterov momentum.
    #[serde(default)]
    pub nesterov: bool,
    /// Images per step.
    pub batch_size: usize,
    /// Passes over the training set.
    pub epochs: usize,
    /// Data-parallel replicas: each batch is split into this many shards whose forward and
    /// backward passes run on their own threads; their gradients are summed before the step.
    /// The flex backend computes on one core, so 2 uses both of a 2-core machine. Results do
    /// not depend on the machine's core count, but do on this value (per-shard matching and
    /// normalisation, as multi-GPU DETR training).
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// Base learning rate.
    pub lr: f64,
    /// Backbone learning rate as a fraction of `lr`.
    #[serde(default = "default_backbone_mult")]
    pub backbone_lr_mult: f64,
    /// Weight decay: decoupled for AdamW, L2 added to the gradient for SGD.
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    /// AdamW's ε. PyTorch's 1e-8 by default: burn's own default (1e-5) is comparable to the
    /// per-element gradients left after clipping a whole model to norm 0.1, and damps the
    /// updates of small-gradient parameters.
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Maximum global gradient norm (0 disables clipping).
    #[serde(default = "default_clip")]
    pub clip_norm: f64,
    /// Clamps every gradient element to ±this before the norm clipping (detectron2's `value`
    /// clipping, which LGD's recipes use; 0 disables it).
    #[serde(default)]
    pub clip_value: f64,
    /// Batches whose loss or gradient norm is not finite that may be skipped (counted, with a
    /// warning) before training stops; 0 stops at the first.
    #[serde(default)]
    pub skip_nonfinite: usize,
    /// Linear warm-up steps from 0.
    #[serde(default)]
    pub warmup_steps: usize,
    /// Decay after warm-up.
    #[serde(default = "default_schedule")]
    pub schedule: Schedule,
    /// Epochs at which a step schedule multiplies the rate by `gamma`.
    #[serde(default)]
    pub milestones: Vec<usize>,
    /// Step-schedule factor.
    #[serde(default = "default_gamma")]
    pub gamma: f64,
    /// Final rate of the cosine and poly schedules as a fraction of `lr`.
    #[serde(default)]
    pub min_lr_ratio: f64,
    /// Exponent of the poly schedule.
    #[serde(default = "default_power")]
    pub power: f64,
}

fn default_optimizer() -> OptimizerKind {
    OptimizerKind::Adamw
}
fn default_momentum() -> f64 {
    0.9
}
fn default_power() -> f64 {
    0.9
}

fn default_replicas() -> usize {
    1
}
fn default_backbone_mult() -> f64 {
    0.1
}
fn default_weight_decay() -> f64 {
    1e-4
}
fn default_eps() -> f64 {
    1e-8
}
fn default_clip() -> f64 {
    0.1
}
fn default_schedule() -> Schedule {
    Schedule::Cosine
}
fn default_gamma() -> f64 {
    0.1
}

/// Periodic evaluation on the validation split (what is evaluated is the model kind's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalConfig {
    /// Evaluate every this many epochs (and always after the last).
    pub every_epochs: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig { every_epochs: 1 }
    }
}

/// When checkpoints are written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Also write one every this many steps (0 = only at epoch ends).
    pub every_steps: usize,
    /// Log a training line every this many steps.
    pub log_every_steps: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            every_steps: 0,
            log_every_steps: 10,
        }
    }
}
