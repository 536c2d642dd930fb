//! Networks: shared layers, backbones with torchvision-compatible parameter names, PyTorch
//! weight import, and the model kinds (each in its own folder with its outputs, loss and task).

pub mod backbone;
pub mod classify;
pub mod deeplabv3;
pub mod det_splits;
pub mod detr;
pub mod fcos;
pub mod layers;
pub mod pretrained;
pub mod weights;

use std::path::Path;

use burn::tensor::backend::Backend;

use crate::error::{Error, Result};

/// A model exported by a densekd run, by kind, with its description.
// Loaded once per command, so the variants' size difference costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Exported<B: Backend> {
    /// A DETR detector.
    Detr(detr::Detr<B>, detr::export::DetectorInfo),
    /// An FCOS detector.
    Fcos(fcos::Fcos<B>, fcos::export::FcosInfo),
    /// A DeepLabV3 segmenter.
    DeepLabV3(deeplabv3::DeepLabV3<B>, deeplabv3::export::SegmenterInfo),
}

/// Loads a run's exported weights of any model kind, told apart by their header.
pub fn load_export<B: Backend>(path: &Path, device: &B::Device) -> Result<Exported<B>> {
    let meta = weights::safetensors_metadata(path)?;
    if meta.contains_key(detr::export::META_KEY) {
        let (model, info) = detr::export::load_detector(path, device)?;
        return Ok(Exported::Detr(model, info));
    }
    if meta.contains_key(fcos::export::META_KEY) {
        let (model, info) = fcos::export::load_fcos(path, device)?;
        return Ok(Exported::Fcos(model, info));
    }
    if meta.contains_key(deeplabv3::export::META_KEY) {
        let (model, info) = deeplabv3::export::load_segmenter(path, device)?;
        return Ok(Exported::DeepLabV3(model, info));
    }
    Err(Error::invalid(
        path,
        "metadata",
        format!(
            "not a densekd export (no `{}`, `{}` or `{}` entry): use a run's model.safetensors",
            detr::export::META_KEY,
            fcos::export::META_KEY,
            deeplabv3::export::META_KEY
        ),
    ))
}
