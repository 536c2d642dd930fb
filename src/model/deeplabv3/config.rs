//! DeepLabV3's config section (`[deeplabv3]`): the architecture (also recorded in exported
//! weights) and the loss.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::backbone::BackboneConfig;
use crate::model::deeplabv3::loss::SegLossConfig;
use crate::model::layers::norm::NormKind;

/// DeepLabV3 architecture settings (`[deeplabv3.model]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeepLabV3Config {
    /// The backbone; its `output_stride` (8 or 16) sets the logits' resolution.
    pub backbone: BackboneConfig,
    /// Classes, background included.
    pub num_classes: usize,
    /// Dilation rates of ASPP's 3×3 branches (torchvision: 12, 24, 36 at output stride 8).
    #[serde(default = "default_rates")]
    pub aspp_rates: Vec<usize>,
    /// ASPP's dilated branches as depthwise-separable convolutions (mmseg's DeepLabV3+ head;
    /// no torchvision counterpart): about a ninth of the dense branches' multiply-adds.
    #[serde(default)]
    pub separable_aspp: bool,
    /// Channels of ASPP and the head (torchvision 256; RDD's students 128).
    #[serde(default = "default_channels")]
    pub channels: usize,
    /// Normalisation in ASPP and the heads (torchvision: batch; `group` allows replicas).
    #[serde(default = "batch")]
    pub norm: NormKind,
    /// Dropout after ASPP's projection (torchvision 0.5).
    #[serde(default = "default_aspp_dropout")]
    pub aspp_dropout: f64,
    /// The auxiliary FCN head on the backbone's third stage (needed by RDD's teacher).
    #[serde(default = "yes")]
    pub aux_head: bool,
    /// Dropout in the auxiliary head (torchvision 0.1).
    #[serde(default = "default_aux_dropout")]
    pub aux_dropout: f64,
    /// Images are resized by this factor before the backbone (logits are still scored at the
    /// labels' resolution): small images give a stride-8 head too few cells per object.
    #[serde(default = "one")]
    pub input_scale: f64,
    /// DeepLabV3+'s decoder on the stride-4 stage (`[deeplabv3.model.decoder]`); absent: plain
    /// DeepLabV3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoder: Option<DecoderConfig>,
}

/// DeepLabV3+'s decoder (`[deeplabv3.model.decoder]`); its refinements have `channels` channels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecoderConfig {
    /// Channels of the stride-4 stage's 1×1 projection (mmseg and the paper: 48).
    #[serde(default = "default_low_level")]
    pub low_level_channels: usize,
}

fn default_low_level() -> usize {
    48
}

fn one() -> f64 {
    1.0
}

fn default_rates() -> Vec<usize> {
    vec![12, 24, 36]
}

fn default_channels() -> usize {
    256
}

fn default_aspp_dropout() -> f64 {
    0.5
}

fn default_aux_dropout() -> f64 {
    0.1
}

fn batch() -> NormKind {
    NormKind::Batch
}

fn yes() -> bool {
    true
}

impl DeepLabV3Config {
    /// Checks the settings, naming the key at fault.
    pub fn validate(&self) -> Result<()> {
        if self.num_classes < 2 {
            return Err(Error::config(
                "deeplabv3.model.num_classes",
                format!(
                    "{} classes: need at least 2 (background included)",
                    self.num_classes
                ),
            ));
        }
        if self.channels == 0 {
            return Err(Error::config(
                "deeplabv3.model.channels",
                "must be positive",
            ));
        }
        if self
            .decoder
            .as_ref()
            .is_some_and(|d| d.low_level_channels == 0)
        {
            return Err(Error::config(
                "deeplabv3.model.decoder.low_level_channels",
                "must be positive",
            ));
        }
        if self.aspp_rates.contains(&0) {
            return Err(Error::config(
                "deeplabv3.model.aspp_rates",
                "rates must be positive",
            ));
        }
        if !(self.input_scale.is_finite() && (0.25..=4.0).contains(&self.input_scale)) {
            return Err(Error::config(
                "deeplabv3.model.input_scale",
                format!("must be in [0.25, 4], got {}", self.input_scale),
            ));
        }
        for (key, p) in [
            ("deeplabv3.model.aspp_dropout", self.aspp_dropout),
            ("deeplabv3.model.aux_dropout", self.aux_dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(Error::config(key, format!("must be in [0, 1), got {p}")));
            }
        }
        Ok(())
    }
}

/// Which flips of each image a prediction averages (mmseg's flip test): the class
/// probabilities of every view, mapped back onto the image, are averaged before the argmax.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum TestFlips {
    /// The image as it is.
    #[default]
    None,
    /// The image and its mirror image.
    Horizontal,
    /// All eight flips and quarter turns of the image.
    Dihedral,
}

impl TestFlips {
    /// Each view as (transpose, flip left-right, flip top-bottom), applied in that order.
    pub fn views(self) -> &'static [(bool, bool, bool)] {
        const IDENTITY: (bool, bool, bool) = (false, false, false);
        match self {
            TestFlips::None => &[IDENTITY],
            TestFlips::Horizontal => &[IDENTITY, (false, true, false)],
            TestFlips::Dihedral => &[
                IDENTITY,
                (false, true, false),
                (false, false, true),
                (false, true, true),
                (true, false, false),
                (true, true, false),
                (true, false, true),
                (true, true, true),
            ],
        }
    }
}

/// How predictions are made (`[deeplabv3.test]`), at evaluation and by `predict`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegTestConfig {
    /// Flips averaged per image.
    #[serde(default)]
    pub flips: TestFlips,
}

/// The `[deeplabv3]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeepLabV3Section {
    /// The architecture.
    pub model: DeepLabV3Config,
    /// The pixel loss.
    #[serde(default)]
    pub loss: SegLossConfig,
    /// Test-time flips.
    #[serde(default)]
    pub test: SegTestConfig,
}

impl DeepLabV3Section {
    /// Checks the section, naming the key at fault; `replicas` is the run's data-parallel count.
    pub fn validate(&self, replicas: usize) -> Result<()> {
        self.model.validate()?;
        self.loss.validate(self.model.num_classes)?;
        let m = &self.model;
        crate::model::layers::check_replicas(
            replicas,
            &[
                ("deeplabv3.model.backbone.norm", m.backbone.norm),
                ("deeplabv3.model.norm", m.norm),
            ],
            &[
                ("deeplabv3.model.aspp_dropout", m.aspp_dropout),
                ("deeplabv3.model.aux_dropout", m.aux_dropout),
            ],
        )
    }
}
