//! densekd's side of each bench workload, as `bench/torch_ref.py` builds it: a torchvision-layout
//! classifier (ImageNet head, 1000 classes) or a shipped config's model (DeepLabV3, FCOS), stepped
//! on one fixed batch.

use burn::module::AutodiffModule;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, ElementConversion, Tensor};
use serde_json::{json, Value};

use crate::backend::{device, Inference, Training};
use crate::bench::BenchOptions;
use crate::data::config::DataConfig;
use crate::data::detection::DetBatch;
use crate::error::{Error, Result};
use crate::model::backbone::{Arch, Backbone, BackboneConfig};
use crate::model::deeplabv3::config::DeepLabV3Section;
use crate::model::deeplabv3::DeepLabV3;
use crate::model::detr::config::DetrSection;
use crate::model::detr::task::DetrTask;
use crate::model::detr::Detr;
use crate::model::fcos::config::FcosSection;
use crate::model::fcos::loss::{fcos_loss, ImageBoxes};
use crate::model::fcos::targets::{level_shapes, Points};
use crate::model::fcos::{Fcos, LevelOutput};
use crate::model::layers::norm::NormKind;
use crate::ops::pixel::PixelLabels;
use crate::task::{Task, TaskInputs};
use crate::train::adamw::FusedAdamW;

/// The workloads `densekd bench` knows, lightest memory first: a process keeps what it
/// allocated, so each peak RSS includes what came before it.
pub const WORKLOADS: [&str; 8] = [
    "mobilenet_v2-infer",
    "resnet18-infer",
    "resnet50-infer",
    "mobilenet_v2-train",
    "resnet18-train",
    "deeplabv3-train",
    "fcos-train",
    "detr-train",
];

/// The shipped config whose model and crop `deeplabv3-train` steps.
const DEEPLABV3_CONFIG: &str = include_str!("../../configs/deeplabv3_shapes.toml");

/// The shipped config whose model, loss and image size `fcos-train` steps.
const FCOS_CONFIG: &str = include_str!("../../configs/fcos_shapes.toml");

/// The shipped config whose model, loss and first training batch `detr-train` steps.
const DETR_CONFIG: &str = include_str!("../../configs/detr_shapes.toml");

/// A parsed workload name.
#[derive(Debug, Clone, Copy)]
pub enum Workload {
    /// `<arch>-<train|infer>`: a classifier at `--batch` × `--size`².
    Classifier {
        /// The network.
        arch: Arch,
        /// A train step (else inference).
        train: bool,
    },
    /// `deeplabv3-train`: a train step of `configs/deeplabv3_shapes.toml`'s model (its crop
    /// size, pixel loss with the auxiliary head) on `--batch` images.
    DeepLabV3,
    /// `fcos-train`: a train step of `configs/fcos_shapes.toml`'s model and loss on `--batch`
    /// square images of its training size with three fixed boxes each.
    Fcos,
    /// `detr-train`: a train step of `configs/detr_shapes.toml`'s model and loss (denoising
    /// and dense head included) on its first training batch of the built-in data, densekd
    /// alone (no PyTorch DETR of this design exists to compare with).
    Detr,
}

/// One timed unit of work.
pub trait Step {
    /// Runs one step to completion (its result read back, so nothing is left queued).
    fn step(&mut self) -> Result<()>;
}

/// A shipped config parsed, and a function reading one of its tables, naming the file on error.
fn parse_shipped(
    (file, text): (&'static str, &str),
) -> Result<(
    toml::Value,
    impl Fn(&toml::Value, &str) -> Result<toml::Value>,
)> {
    let value: toml::Value =
        toml::from_str(text).map_err(|e| Error::config(file, e.to_string()))?;
    let at = move |v: &toml::Value, path: &str| {
        path.split('.')
            .try_fold(v, |v, key| match key.parse::<usize>() {
                Ok(i) => v.get(i),
                Err(_) => v.get(key),
            })
            .cloned()
            .ok_or_else(|| Error::config(file, format!("no `{path}`")))
    };
    Ok((value, at))
}

/// Deserialises a value read from a shipped config.
fn typed<T: serde::de::DeserializeOwned>(file: &str, value: toml::Value) -> Result<T> {
    value
        .try_into()
        .map_err(|e: toml::de::Error| Error::config(file, e.to_string()))
}

/// A shipped config's `[table]` section and the integer at `size_path` (an image side).
fn shipped<T: serde::de::DeserializeOwned>(
    source: (&'static str, &str),
    table: &str,
    size_path: &str,
) -> Result<(T, usize)> {
    let (value, at) = parse_shipped(source)?;
    let size: i64 = typed(source.0, at(&value, size_path)?)?;
    Ok((typed(source.0, at(&value, table)?)?, size as usize))
}

/// The shipped DeepLabV3 config's `[deeplabv3]` section and crop side.
pub fn deeplabv3_setup() -> Result<(DeepLabV3Section, usize)> {
    let file = ("configs/deeplabv3_shapes.toml", DEEPLABV3_CONFIG);
    shipped(file, "deeplabv3", "data.seg_augment.crop.0")
}

/// The shipped FCOS config's `[fcos]` section and training image side.
pub fn fcos_setup() -> Result<(FcosSection, usize)> {
    let file = ("configs/fcos_shapes.toml", FCOS_CONFIG);
    shipped(file, "fcos", "data.augment.shorter")
}

/// The shipped DETR config's task (built-in data, fresh backbone: the bench downloads nothing)
/// and its first training batch.
fn detr_setup() -> Result<(DetrTask, DetBatch)> {
    let source = ("configs/detr_shapes.toml", DETR_CONFIG);
    let (value, at) = parse_shipped(source)?;
    let section: DetrSection = typed(source.0, at(&value, "detr")?)?;
    let data: DataConfig = typed(source.0, at(&value, "data")?)?;
    let seed: u64 = typed(source.0, at(&value, "seed")?)?;
    let batch_size: usize = typed(source.0, at(&value, "optim.batch_size")?)?;
    let inputs = TaskInputs {
        seed,
        data: &data,
        batch_size,
        backbone_weights: None,
        backbone_lr_mult: 1.0,
    };
    let task = DetrTask::new(&inputs, &section)?;
    let batch = Task::<Training>::train_batches(&task, 0, 0)
        .next()
        .ok_or_else(|| Error::config(source.0, "no training batch"))??;
    Ok((task, batch))
}

/// `fcos-train`'s ground truth: three boxes `[x0, y0, x1, y1]` per image of side `size`, and
/// their classes.
fn fcos_boxes(batch: usize, size: usize, classes: usize) -> Vec<ImageBoxes> {
    let s = size as f64 / 256.0;
    (0..batch)
        .map(|i| {
            let d = 4.0 * i as f64;
            let boxes = [
                [16.0 + d, 24.0, 112.0 + d, 120.0],
                [128.0, 40.0 + d, 232.0, 200.0 + d],
                [56.0, 144.0, 136.0 + d / 2.0, 248.0],
            ];
            ImageBoxes {
                boxes: boxes
                    .iter()
                    .map(|b| b.map(|v| (v * s).min(size as f64)))
                    .collect(),
                classes: (0..3).map(|j| (i + 3 * j) % classes).collect(),
            }
        })
        .collect()
}

impl Workload {
    /// Parses `mobilenet_v2-train`, `deeplabv3-train` and the like.
    pub fn parse(name: &str) -> Result<Self> {
        let unknown = || {
            Error::config(
                "--workloads",
                format!("`{name}` is not one of {}", WORKLOADS.join(", ")),
            )
        };
        match name {
            "deeplabv3-train" => return Ok(Workload::DeepLabV3),
            "fcos-train" => return Ok(Workload::Fcos),
            "detr-train" => return Ok(Workload::Detr),
            _ => {}
        }
        let (arch, mode) = name.rsplit_once('-').ok_or_else(unknown)?;
        let arch = match arch {
            "mobilenet_v2" => Arch::MobilenetV2,
            "resnet18" => Arch::Resnet18,
            "resnet34" => Arch::Resnet34,
            "resnet50" => Arch::Resnet50,
            _ => return Err(unknown()),
        };
        let train = match mode {
            "train" => true,
            "infer" => false,
            _ => return Err(unknown()),
        };
        Ok(Workload::Classifier { arch, train })
    }

    /// The image side and the architecture the reference builds (`null` for classifiers,
    /// which the name describes); `None` for a workload densekd runs alone.
    pub fn reference_setup(&self, options: &BenchOptions) -> Result<Option<(usize, Value)>> {
        let setup = match self {
            Workload::Detr => return Ok(None),
            Workload::Classifier { .. } => (options.size, Value::Null),
            Workload::DeepLabV3 => {
                let (section, crop) = deeplabv3_setup()?;
                let m = &section.model;
                (
                    crop,
                    json!({
                        "arch": m.backbone.arch,
                        "backbone_norm": m.backbone.norm,
                        "output_stride": m.backbone.output_stride,
                        "last_conv": m.backbone.last_conv,
                        "frozen_stages": m.backbone.frozen_stages,
                        "num_classes": m.num_classes,
                        "aspp_rates": m.aspp_rates,
                        "separable_aspp": m.separable_aspp,
                        "channels": m.channels,
                        "norm": m.norm,
                        "aux_head": m.aux_head,
                        "input_scale": m.input_scale,
                        "decoder": m.decoder.as_ref().map(|d| d.low_level_channels),
                        "aux_weight": section.loss.aux_weight,
                        "ohem": section.loss.ohem.map(|o| (o.thresh, o.min_kept)),
                    }),
                )
            }
            Workload::Fcos => {
                let (section, size) = fcos_setup()?;
                let (m, l) = (&section.model, &section.loss);
                let targets = fcos_boxes(options.batch, size, m.num_classes);
                (
                    size,
                    json!({
                        "arch": m.backbone.arch,
                        "backbone_norm": m.backbone.norm,
                        "frozen_stages": m.backbone.frozen_stages,
                        "last_conv": m.backbone.last_conv,
                        "strides": m.strides,
                        "channels": m.channels,
                        "head_convs": m.head_convs,
                        "norm_groups": m.norm_groups,
                        "num_classes": m.num_classes,
                        "center_sampling_radius": l.center_sampling_radius,
                        "boxes": targets.iter().map(|t| &t.boxes).collect::<Vec<_>>(),
                        "classes": targets.iter().map(|t| &t.classes).collect::<Vec<_>>(),
                    }),
                )
            }
        };
        Ok(Some(setup))
    }

    /// Builds the model and its input.
    pub fn build(&self, options: &BenchOptions) -> Result<Box<dyn Step>> {
        let device = device();
        match *self {
            Workload::Classifier { arch, train } => {
                let config = BackboneConfig {
                    arch,
                    width: 1.0,
                    // Training-mode batch norm, as the reference's `model.train()`; at
                    // inference both sides apply fixed statistics.
                    norm: if train {
                        NormKind::Batch
                    } else {
                        NormKind::Frozen
                    },
                    frozen_stages: 0,
                    output_stride: 32,
                    last_conv: true,
                    blocks: None,
                    num_classes: Some(1000),
                };
                let shape = [options.batch, 3, options.size, options.size];
                if !train {
                    return Ok(Box::new(InferStep {
                        model: config.init::<Inference>(&device)?,
                        x: Tensor::random(shape, Distribution::Normal(0.0, 1.0), &device),
                    }));
                }
                let x =
                    Tensor::<Training, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
                let labels: Vec<i64> = (0..options.batch as i64).map(|i| i * 97 % 1000).collect();
                let y = Tensor::from_data(labels.as_slice(), &device);
                let loss = move |model: &Backbone<Training>| {
                    let logits = model.classify(x.clone()).ok_or_else(|| {
                        Error::config("bench", "the model has no classifier head")
                    })?;
                    Ok(CrossEntropyLossConfig::new()
                        .init(&logits.device())
                        .forward(logits, y.clone()))
                };
                Ok(Box::new(TrainStep::new(
                    config.init::<Training>(&device)?,
                    loss,
                )))
            }
            Workload::DeepLabV3 => {
                let (section, crop) = deeplabv3_setup()?;
                let (n, k) = (options.batch, section.model.num_classes);
                let shape = [n, 3, crop, crop];
                let x =
                    Tensor::<Training, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
                // Blocks of every class with a 255 band, like the built-in label maps.
                let labels: Vec<u8> = (0..n * crop * crop)
                    .map(|p| {
                        let (i, y, x) = (p / (crop * crop), p / crop % crop, p % crop);
                        match (x % 16 == 0) || (y % 16 == 0) {
                            true => 255,
                            false => ((x / 16 + 3 * (y / 16) + i) % k) as u8,
                        }
                    })
                    .collect();
                let labels = PixelLabels::<Training>::new(labels, [n, crop, crop], 255, &device);
                let loss = move |model: &DeepLabV3<Training>| {
                    let out = model.forward(x.clone());
                    let l = &section.loss;
                    let main = l.head_loss(out.logits, &labels);
                    Ok(match out.aux_logits {
                        Some(aux) => main + l.head_loss(aux, &labels).mul_scalar(l.aux_weight),
                        None => main,
                    })
                };
                let model = section.model.init::<Training>(&device)?;
                Ok(Box::new(TrainStep::new(model, loss)))
            }
            Workload::Fcos => {
                let (section, size) = fcos_setup()?;
                let (n, m) = (options.batch, &section.model);
                let targets = fcos_boxes(n, size, m.num_classes);
                let shape = [n, 3, size, size];
                let x =
                    Tensor::<Training, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
                let shapes = level_shapes((size, size), &m.strides);
                let points = Points::new((size, size), &shapes, &m.strides);
                let model = m.init::<Training>(&device)?;
                let loss = move |model: &Fcos<Training>| {
                    let flat = LevelOutput::flatten(&model.forward(x.clone()).levels);
                    let terms = fcos_loss(&flat, &points, &targets, &section.loss);
                    Ok(terms.weighted(&section.loss))
                };
                Ok(Box::new(TrainStep::new(model, loss)))
            }
            Workload::Detr => {
                let (task, batch) = detr_setup()?;
                let model = task.init_model::<Training>(&device)?;
                let loss = move |model: &Detr<Training>| {
                    let forward = Task::<Training>::forward(&task, model, &batch)?;
                    Ok(Task::<Training>::loss(&task, &forward, &batch)?.total)
                };
                Ok(Box::new(TrainStep::new(model, loss)))
            }
        }
    }
}

/// A training step: forward, loss, backward and an AdamW update.
struct TrainStep<M: AutodiffModule<Training>, L> {
    model: Option<M>,
    optim: burn::optim::adaptor::OptimizerAdaptor<FusedAdamW, M, Training>,
    loss: L,
}

impl<M: AutodiffModule<Training>, L> TrainStep<M, L> {
    fn new(model: M, loss: L) -> Self {
        TrainStep {
            model: Some(model),
            // burn's AdamW defaults (ε 1e-5, weight decay 1e-4): the bench times steps only.
            optim: FusedAdamW::new(1e-5, 1e-4).init(),
            loss,
        }
    }
}

impl<M, L> Step for TrainStep<M, L>
where
    M: AutodiffModule<Training>,
    L: Fn(&M) -> Result<Tensor<Training, 1>>,
{
    fn step(&mut self) -> Result<()> {
        let model = self
            .model
            .take()
            .ok_or_else(|| Error::config("bench", "a previous step failed"))?;
        let loss = (self.loss)(&model)?;
        let device = loss.device();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let model = self.optim.step(1e-4, model, grads);
        // Waits for queued work on asynchronous backends (the GPU), as `loss.item()` does there.
        Training::sync(&device)
            .map_err(|e| Error::config("bench", format!("the device failed: {e:?}")))?;
        self.model = Some(model);
        Ok(())
    }
}

struct InferStep {
    model: Backbone<Inference>,
    x: Tensor<Inference, 4>,
}

impl Step for InferStep {
    fn step(&mut self) -> Result<()> {
        let logits = self
            .model
            .classify(self.x.clone())
            .ok_or_else(|| Error::config("bench", "the model has no classifier head"))?;
        logits.sum().into_scalar().elem::<f32>();
        Ok(())
    }
}

/// Resets this process's peak resident memory to its current one (Linux; no-op elsewhere).
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// This process's peak resident memory since the last reset, in bytes (0 where unknown).
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
