//! The `[data]` config section: the built-in synthetic data or a COCO dataset on disk, the
//! augmentation, and the loader.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::data::detection::DetAugment;
use crate::data::synth::SynthConfig;

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
