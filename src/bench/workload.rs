//! densekd's side of each bench workload: a torchvision-layout classifier (ImageNet head,
//! 1000 classes) stepped on one fixed random batch, as `bench/torch_ref.py` does.

use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, ElementConversion, Int, Tensor};

use crate::backend::{device, Inference, Training};
use crate::bench::BenchOptions;
use crate::error::{Error, Result};
use crate::model::backbone::{Arch, Backbone, BackboneConfig};
use crate::model::layers::norm::NormKind;

/// The workloads `densekd bench` knows, `<arch>-<train|infer>`, lightest memory first: a
/// process keeps what it allocated, so each peak RSS includes what came before it.
pub const WORKLOADS: [&str; 5] = [
    "mobilenet_v2-infer",
    "resnet18-infer",
    "resnet50-infer",
    "mobilenet_v2-train",
    "resnet18-train",
];

/// A parsed workload name.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    arch: Arch,
    train: bool,
}

/// One timed unit of work.
pub trait Step {
    /// Runs one step to completion (its result read back, so nothing is left queued).
    fn step(&mut self) -> Result<()>;
}

impl Workload {
    /// Parses `mobilenet_v2-train` and the like.
    pub fn parse(name: &str) -> Result<Self> {
        let unknown = || {
            Error::config(
                "--workloads",
                format!("`{name}` is not one of {}", WORKLOADS.join(", ")),
            )
        };
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
        Ok(Workload { arch, train })
    }

    /// Builds the model and its input.
    pub fn build(&self, options: &BenchOptions) -> Result<Box<dyn Step>> {
        let config = BackboneConfig {
            arch: self.arch,
            width: 1.0,
            // Training-mode batch norm, as the reference's `model.train()`; at inference both
            // sides apply fixed statistics.
            norm: if self.train {
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
        let device = device();
        let shape = [options.batch, 3, options.size, options.size];
        if self.train {
            let model = config.init::<Training>(&device)?;
            let labels: Vec<i64> = (0..options.batch as i64).map(|i| i * 97 % 1000).collect();
            Ok(Box::new(TrainStep {
                model: Some(model),
                optim: AdamWConfig::new().init(),
                x: Tensor::random(shape, Distribution::Normal(0.0, 1.0), &device),
                y: Tensor::from_data(labels.as_slice(), &device),
            }))
        } else {
            Ok(Box::new(InferStep {
                model: config.init::<Inference>(&device)?,
                x: Tensor::random(shape, Distribution::Normal(0.0, 1.0), &device),
            }))
        }
    }
}

struct TrainStep<O> {
    model: Option<Backbone<Training>>,
    optim: O,
    x: Tensor<Training, 4>,
    y: Tensor<Training, 1, Int>,
}

impl<O: Optimizer<Backbone<Training>, Training>> Step for TrainStep<O> {
    fn step(&mut self) -> Result<()> {
        let model = self
            .model
            .take()
            .ok_or_else(|| Error::config("bench", "a previous step failed"))?;
        let logits = model
            .classify(self.x.clone())
            .ok_or_else(|| Error::config("bench", "the model has no classifier head"))?;
        let loss = CrossEntropyLossConfig::new()
            .init(&logits.device())
            .forward(logits, self.y.clone());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let model = self.optim.step(1e-4, model, grads);
        // Waits for queued work on asynchronous backends (the GPU), as `loss.item()` does there.
        Training::sync(&self.x.device())
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
