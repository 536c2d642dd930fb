//! ImageNet classification with torchvision-trained backbones: the real-weights check that the
//! architectures, the weight import and the preprocessing all match torchvision.

use std::path::Path;

use burn::tensor::{backend::Backend, Tensor, TensorData};
use image::RgbImage;
use serde::Serialize;

use crate::data::transforms::{imagenet_eval_crop, normalize, IMAGENET_MEAN, IMAGENET_STD};
use crate::error::{Error, Result};
use crate::model::backbone::{Arch, Backbone, BackboneConfig};
use crate::model::layers::norm::NormKind;
use crate::model::weights::{load_pytorch, LoadOptions, LoadReport};

/// Number of ImageNet-1k classes.
pub const IMAGENET_CLASSES: usize = 1000;

/// One class of a ranking.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ClassScore {
    /// Class index.
    pub class: usize,
    /// Raw logit.
    pub logit: f32,
    /// Softmax probability over all classes.
    pub prob: f64,
}

/// Builds `arch` with an ImageNet head and loads torchvision weights into it (all tensors
/// required).
pub fn load_imagenet_model<B: Backend>(
    arch: Arch,
    weights: &Path,
    device: &B::Device,
) -> Result<(Backbone<B>, LoadReport)> {
    let config = BackboneConfig {
        arch,
        width: 1.0,
        norm: NormKind::Frozen,
        frozen_stages: 0,
        output_stride: 32,
        last_conv: true,
        blocks: None,
        num_classes: Some(IMAGENET_CLASSES),
    };
    let model = config.init::<B>(device)?;
    let options = LoadOptions {
        key_rules: model.torchvision_key_rules(),
        ..LoadOptions::default()
    };
    load_pytorch(model, weights, &options)
}

/// torchvision's ImageNet evaluation transform: resize 256, center crop 224, normalise; CHW.
pub fn imagenet_input(img: &RgbImage) -> Vec<f32> {
    normalize(
        &imagenet_eval_crop(img, 256, 224),
        IMAGENET_MEAN,
        IMAGENET_STD,
    )
}

/// Logits `[N, classes]` for a batch of images; an error if the model has no classifier head.
pub fn classify_images<B: Backend>(
    model: &Backbone<B>,
    images: &[RgbImage],
    device: &B::Device,
) -> Result<Vec<Vec<f32>>> {
    let data: Vec<f32> = images.iter().flat_map(imagenet_input).collect();
    let x = Tensor::<B, 4>::from_data(TensorData::new(data, [images.len(), 3, 224, 224]), device);
    let logits = model.classify(x).ok_or_else(|| {
        Error::config(
            "backbone.num_classes",
            "the model has no classification head",
        )
    })?;
    let [n, k] = logits.dims();
    let flat: Vec<f32> = logits
        .into_data()
        .convert::<f32>()
        .to_vec()
        .map_err(|e| Error::config("logits", format!("{e:?}")))?;
    Ok((0..n).map(|i| flat[i * k..(i + 1) * k].to_vec()).collect())
}

/// The `k` highest logits with their softmax probabilities (computed in f64).
pub fn top_k(logits: &[f32], k: usize) -> Vec<ClassScore> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l)) as f64;
    let denom: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    order
        .into_iter()
        .take(k)
        .map(|c| ClassScore {
            class: c,
            logit: logits[c],
            prob: (logits[c] as f64 - max).exp() / denom,
        })
        .collect()
}
