//! What a DETR forward pass returns: per-layer predictions, the encoder's memory and proposals,
//! and the queries the decoder started from, typed so that losses and distillers read them
//! directly.

use burn::tensor::{backend::Backend, Bool, Tensor};

use crate::model::backbone::BackboneFeatures;
use crate::model::layers::deformable::LevelGrid;

/// Predictions of one decoder layer.
#[derive(Debug, Clone)]
pub struct LayerPrediction<B: Backend> {
    /// Class logits `[B, Q, K]` (sigmoid, no background class).
    pub logits: Tensor<B, 3>,
    /// Boxes `[B, Q, 4]`, normalised `cx, cy, w, h`.
    pub boxes: Tensor<B, 3>,
    /// Normed decoder states `[B, Q, D]` the heads read (for distillation).
    pub hidden: Tensor<B, 3>,
    /// The layer's output state `[B, Q, D]`, i.e. the next layer's input content.
    pub state: Tensor<B, 3>,
}

/// All decoder layers' predictions; the last entry is the final output.
#[derive(Debug, Clone)]
pub struct DetrOutput<B: Backend> {
    /// One per decoder layer, first to last.
    pub layers: Vec<LayerPrediction<B>>,
    /// Sizes of the query groups, in query order.
    pub group_sizes: Vec<usize>,
    /// The initial queries the decoder started from.
    pub queries: InitialQueries<B>,
    /// Two-stage models' per-token predictions.
    pub proposals: Option<Proposals<B>>,
    /// The backbone's features.
    pub features: BackboneFeatures<B>,
}

impl<B: Backend> DetrOutput<B> {
    /// The final layer's predictions.
    pub fn last(&self) -> &LayerPrediction<B> {
        self.layers
            .last()
            .unwrap_or_else(|| unreachable!("a DETR has at least one decoder layer"))
    }
}

/// The encoder's half of a forward pass: the memory and what the decoder needs to read it.
#[derive(Debug, Clone)]
pub struct Encoded<B: Backend> {
    /// Encoder output `[B, T, D]` over the tokens of every level.
    pub memory: Tensor<B, 3>,
    /// Position (sine + level embedding) of each token `[B, T, D]`.
    pub memory_pos: Tensor<B, 3>,
    /// Token padding `[B, T]` (true = padding).
    pub memory_padding: Tensor<B, 2, Bool>,
    /// The same padding on the host, `B·T` values.
    pub padding: Vec<bool>,
    /// Normalised cell centres of the tokens `[B, T, 2]`.
    pub centres: Tensor<B, 3>,
    /// Where each level's tokens lie in the memory.
    pub grids: Vec<LevelGrid>,
    /// Dense per-token predictions of two-stage models.
    pub proposals: Option<Proposals<B>>,
    /// The backbone's features.
    pub features: BackboneFeatures<B>,
}

/// Two-stage models' per-token predictions and the tokens chosen as queries.
#[derive(Debug, Clone)]
pub struct Proposals<B: Backend> {
    /// Class logits `[B, T, K]` and boxes `[B, T, 4]` of every token.
    pub prediction: LayerPrediction<B>,
    /// Two-stage models: token index of each selected query, `B·Q` values (query order within
    /// each image), the correspondence between two models' queries on the same image. `None`
    /// for a dense auxiliary head, whose queries are the learned ones.
    pub selected: Option<Vec<usize>>,
    /// Each token's anchor (cell centre, two cells wide), normalised `cx, cy, w, h`, `B·T·4`.
    pub anchors: Vec<f32>,
    /// Token padding, `B·T` values (true = padding).
    pub padding: Vec<bool>,
}

/// The decoder's starting point for a set of queries.
#[derive(Debug, Clone)]
pub struct InitialQueries<B: Backend> {
    /// Content embeddings `[B, Q, D]`.
    pub content: Tensor<B, 3>,
    /// Reference boxes `[B, Q, 4]` (normalised `cx, cy, w, h`, no gradient).
    pub reference: Tensor<B, 3>,
}

impl<B: Backend> InitialQueries<B> {
    /// Query groups placed one after the other along the query axis.
    pub fn cat(groups: Vec<Self>) -> Self {
        let (content, reference) = groups.into_iter().map(|g| (g.content, g.reference)).unzip();
        InitialQueries {
            content: Tensor::cat(content, 1),
            reference: Tensor::cat(reference, 1),
        }
    }

    /// Number of queries.
    pub fn len(&self) -> usize {
        self.content.dims()[1]
    }

    /// Whether there are no queries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Narrows every layer's predictions to queries `start..start + len`.
pub fn narrow_layers<B: Backend>(
    layers: &[LayerPrediction<B>],
    start: usize,
    len: usize,
) -> Vec<LayerPrediction<B>> {
    layers
        .iter()
        .map(|l| LayerPrediction {
            logits: l.logits.clone().narrow(1, start, len),
            boxes: l.boxes.clone().narrow(1, start, len),
            hidden: l.hidden.clone().narrow(1, start, len),
            state: l.state.clone().narrow(1, start, len),
        })
        .collect()
}
