//! DeepLabV3's exported weights: `.safetensors` whose header describes the architecture, the
//! classes and the ignore label, so that `predict` and teachers need nothing else.

use std::path::Path;

use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::deeplabv3::config::SegTestConfig;
use crate::model::deeplabv3::{DeepLabV3, DeepLabV3Config};
use crate::model::weights::{load_native, safetensors_metadata, save_native};

/// Metadata key of the exported model's description.
pub const META_KEY: &str = "densekd.segmenter";

/// What predicting with an exported segmenter needs besides its tensors. Images are read
/// whole and normalised with the ImageNet mean and standard deviation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegmenterInfo {
    /// The architecture.
    pub model: DeepLabV3Config,
    /// Class names in label order.
    pub class_names: Vec<String>,
    /// The label of unlabelled pixels in the training data.
    pub ignore_index: u8,
    /// How the run evaluated it (exports before test-time flips had none).
    #[serde(default)]
    pub test: SegTestConfig,
}

/// Writes `model` with its description as `.safetensors`.
pub fn export_deeplabv3<B: Backend>(
    model: &DeepLabV3<B>,
    info: &SegmenterInfo,
    path: &Path,
) -> Result<()> {
    let json = serde_json::to_string(info).map_err(|e| Error::config("export", e.to_string()))?;
    save_native(model, path, &[(META_KEY, json)])
}

/// Loads a segmenter exported by training, with its description.
pub fn load_segmenter<B: Backend>(
    path: &Path,
    device: &B::Device,
) -> Result<(DeepLabV3<B>, SegmenterInfo)> {
    let meta = safetensors_metadata(path)?;
    let json = meta.get(META_KEY).ok_or_else(|| {
        Error::invalid(
            path,
            META_KEY,
            "missing: not a densekd DeepLabV3 export (use a DeepLabV3 run's model.safetensors)",
        )
    })?;
    let info: SegmenterInfo =
        serde_json::from_str(json).map_err(|e| Error::invalid(path, META_KEY, e.to_string()))?;
    let model = load_native(info.model.init::<B>(device)?, path)?;
    Ok((model, info))
}
