//! FCOS's exported weights: `.safetensors` whose header describes the architecture, the
//! decoding, the categories and the preprocessing, so that `predict` needs nothing else.

use std::path::Path;

use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

use crate::data::coco::Category;
use crate::data::detection::DetAugment;
use crate::error::{Error, Result};
use crate::model::fcos::config::FcosDecodeConfig;
use crate::model::fcos::{Fcos, FcosConfig};
use crate::model::weights::{load_native, safetensors_metadata, save_native};

/// Metadata key of the exported model's description.
pub const META_KEY: &str = "densekd.fcos";

/// What predicting with an exported FCOS needs besides its tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FcosInfo {
    /// The architecture.
    pub model: FcosConfig,
    /// How detections are decoded.
    pub decode: FcosDecodeConfig,
    /// Categories in class order (COCO ids and names).
    pub categories: Vec<Category>,
    /// Evaluation preprocessing.
    pub preprocess: DetAugment,
    /// Padding multiple of batched images.
    pub size_divisor: u32,
}

/// Writes `model` with its description as `.safetensors`.
pub fn export_fcos<B: Backend>(model: &Fcos<B>, info: &FcosInfo, path: &Path) -> Result<()> {
    let json = serde_json::to_string(info).map_err(|e| Error::config("export", e.to_string()))?;
    save_native(model, path, &[(META_KEY, json)])
}

/// Loads an FCOS exported by training, with its description.
pub fn load_fcos<B: Backend>(path: &Path, device: &B::Device) -> Result<(Fcos<B>, FcosInfo)> {
    let meta = safetensors_metadata(path)?;
    let json = meta.get(META_KEY).ok_or_else(|| {
        Error::invalid(
            path,
            META_KEY,
            "missing: not a densekd FCOS export (use an FCOS run's model.safetensors)",
        )
    })?;
    let info: FcosInfo =
        serde_json::from_str(json).map_err(|e| Error::invalid(path, META_KEY, e.to_string()))?;
    let model = load_native(info.model.init::<B>(device)?, path)?;
    Ok((model, info))
}
