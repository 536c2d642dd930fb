//! DETR's architecture settings (the `[detr.model]` config table, also recorded in exported
//! weights).

use serde::{Deserialize, Serialize};

use crate::model::backbone::BackboneConfig;
use crate::model::detr::denoising::DenoisingConfig;
use crate::model::detr::loss::SetLossWeights;
use crate::model::layers::transformer::LayerConfig;
use crate::ops::matcher::MatchCosts;

/// DETR settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetrConfig {
    /// The backbone.
    pub backbone: BackboneConfig,
    /// Backbone levels fed to the transformer, by stride: any of 4 (C2), 8 (C3), 16 (C4) and 32
    /// (C5).
    /// Each level gets its own 1×1 projection and a learned level embedding; their tokens are
    /// concatenated into one memory. Fine levels matter for localising small objects.
    #[serde(default = "stride32")]
    pub feature_strides: Vec<usize>,
    /// Levels (strides) whose tokens the encoder's self-attention runs over; empty = all. The
    /// other levels join the memory unencoded. Self-attention is quadratic in the tokens, so
    /// leaving the fine level out (RT-DETR encodes only the coarsest) keeps it cheap.
    #[serde(default)]
    pub encoder_strides: Vec<usize>,
    /// Number of object classes.
    pub num_classes: usize,
    /// Queries per group.
    pub num_queries: usize,
    /// Query groups used in training (1 = plain DETR; Group-DETR uses e.g. 11); inference uses
    /// the first group only.
    #[serde(default = "one")]
    pub groups: usize,
    /// Spatial prior of the decoder's cross-attention: each query's attention logits get a
    /// Gaussian around its current box, of standard deviation `spatial_prior` × the box size
    /// (SMCA-style; 0 disables it, giving DETR's plain cross-attention). It lets queries pool
    /// their own region from the first step, which is what makes DETR learn in minutes.
    #[serde(default)]
    pub spatial_prior: f64,
    /// Deformable cross-attention in the decoder (Deformable DETR): each query samples this many
    /// points per head and level around its box instead of attending to every token
    /// (`spatial_prior` then has no effect); 0 = global attention.
    #[serde(default)]
    pub deformable_points: usize,
    /// Two-stage queries (Deformable-DETR two-stage, DINO's mixed query selection): every encoder
    /// token predicts classes and a box around its own cell, trained densely; the decoder's
    /// queries start from the `num_queries` best-scoring tokens' boxes (content embeddings stay
    /// learned). Without it, query anchors are learned parameters.
    #[serde(default)]
    pub two_stage: bool,
    /// Dense auxiliary head (Co-DETR): the same per-token head as two-stage, trained with the
    /// proposal loss (`loss.proposal_assignment`, one-to-many) so that every encoder token gets
    /// a direct classification and box signal, but without selecting queries from it. Not run
    /// at inference (without autodiff); implied by `two_stage`.
    #[serde(default)]
    pub dense_head: bool,
    /// Denoising query groups in training (DN-DETR); off by default.
    #[serde(default)]
    pub denoising: DenoisingConfig,
    /// Transformer layer sizes.
    pub layer: LayerConfig,
    /// Encoder layers (may be 0).
    pub encoder_layers: usize,
    /// Decoder layers.
    pub decoder_layers: usize,
}

fn one() -> usize {
    1
}

fn stride32() -> Vec<usize> {
    vec![32]
}

/// The `[detr]` config section: the architecture and how it is trained and evaluated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetrSection {
    /// The architecture.
    pub model: DetrConfig,
    /// Loss weights.
    #[serde(default)]
    pub loss: SetLossWeights,
    /// Hungarian matching costs.
    #[serde(default)]
    pub matcher: MatchCosts,
    /// Evaluation settings.
    #[serde(default)]
    pub eval: DetrEvalConfig,
}

/// DETR's evaluation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DetrEvalConfig {
    /// Detections kept per image.
    pub max_dets: usize,
    /// Training images (the first ones, without augmentation) on which matching instability
    /// is measured at every epoch end (DN-DETR's definition); 0 disables it.
    pub instability_images: usize,
}

impl Default for DetrEvalConfig {
    fn default() -> Self {
        DetrEvalConfig {
            max_dets: 100,
            instability_images: 64,
        }
    }
}

impl DetrSection {
    /// Checks what serde cannot, naming the key; `replicas` is the run's data-parallel count.
    pub fn validate(&self, replicas: usize) -> crate::Result<()> {
        use crate::error::Error;
        if self.eval.max_dets == 0 {
            return Err(Error::config(
                "detr.eval.max_dets",
                "must be positive, got 0",
            ));
        }
        self.model.denoising.validate()?;
        crate::model::layers::check_replicas(
            replicas,
            &[("detr.model.backbone.norm", self.model.backbone.norm)],
            &[("detr.model.layer.dropout", self.model.layer.dropout)],
        )
    }
}
