//! The `[data]` config section: the built-in synthetic data, a COCO dataset or label-map
//! folders on disk, the augmentation, and the loader.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::data::coco::InvalidPolicy;
use crate::data::detection::DetAugment;
use crate::data::segmentation::SegAugment;
use crate::data::synth::SynthConfig;
use crate::error::{Error, Result};

/// Training and validation data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// The built-in synthetic shapes (used when no dataset on disk is given).
    #[serde(default)]
    pub synthetic: SynthData,
    /// A COCO dataset on disk, replacing the synthetic boxes (detection).
    #[serde(default)]
    pub coco: Option<CocoData>,
    /// Image and label-map folders, replacing the synthetic label maps (segmentation).
    #[serde(default)]
    pub segmentation: Option<SegFolders>,
    /// Detection augmentation (evaluation uses the same resize without flips); detectors
    /// need it.
    #[serde(default)]
    pub augment: Option<DetAugment>,
    /// Segmentation training augmentation (evaluation reads whole images); segmenters need it.
    #[serde(default)]
    pub seg_augment: Option<SegAugment>,
    /// Batched images are padded to a multiple of this.
    #[serde(default = "default_divisor")]
    pub size_divisor: u32,
    /// Loader threads.
    #[serde(default = "default_workers")]
    pub workers: usize,
}

impl DataConfig {
    /// The detection augmentation, which detectors require.
    pub fn det_augment(&self) -> Result<&DetAugment> {
        self.augment.as_ref().ok_or_else(|| {
            Error::config(
                "data.augment",
                "missing: detectors need [data.augment] (shorter, max_size, hflip_prob)",
            )
        })
    }

    /// The segmentation augmentation, which segmenters require.
    pub fn seg_augment(&self) -> Result<&SegAugment> {
        self.seg_augment.as_ref().ok_or_else(|| {
            Error::config(
                "data.seg_augment",
                "missing: segmenters need [data.seg_augment] (scale_range, crop, hflip_prob)",
            )
        })
    }
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
    /// Unusable annotations (degenerate boxes, unknown image or category ids): `"skip"` them
    /// with a warning, or `"reject"` the data.
    #[serde(default)]
    pub policy: InvalidPolicy,
}

/// Segmentation images and label maps (palette or grayscale PNGs of class indices) in folders,
/// paired by file stem after stripping the suffixes, e.g. Pascal VOC's `JPEGImages` +
/// `SegmentationClass`, or Cityscapes' `_leftImg8bit` + `_gtFine_labelTrainIds`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegFolders {
    /// Folder of the training images.
    pub train_images: PathBuf,
    /// Folder of the training label maps.
    pub train_labels: PathBuf,
    /// Folder of the validation images.
    pub val_images: PathBuf,
    /// Folder of the validation label maps.
    pub val_labels: PathBuf,
    /// Class names in label order (label `i` is `class_names[i]`).
    pub class_names: Vec<String>,
    /// The label of pixels that take no loss and no score.
    #[serde(default = "default_ignore")]
    pub ignore_index: u8,
    /// Stripped from image stems before pairing (Cityscapes: `_leftImg8bit`).
    #[serde(default)]
    pub image_suffix: String,
    /// Stripped from label-map stems before pairing (Cityscapes: `_gtFine_labelTrainIds`).
    #[serde(default)]
    pub label_suffix: String,
}

fn default_ignore() -> u8 {
    255
}
