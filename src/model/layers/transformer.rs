//! DETR's post-norm transformer layers on burn's `MultiHeadAttention`, with positional inputs,
//! key padding masks and a self-attention mask for query groups.

use crate::model::layers::deformable::{DeformableAttention, LevelGrid};
use burn::module::Module;
use burn::nn::attention::{MultiHeadAttention, MultiHeadAttentionConfig};
use burn::nn::{Dropout, DropoutConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::{activation::relu, backend::Backend, Bool, Tensor, TensorData};

use crate::model::layers::activation::softmax;

/// Layer sizes shared by encoder and decoder layers.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerConfig {
    /// Model width.
    pub d_model: usize,
    /// Attention heads.
    pub heads: usize,
    /// Hidden width of the feed-forward block.
    pub ffn: usize,
    /// Dropout probability (0 is best on CPU: dropout masks are costly on flex).
    pub dropout: f64,
}

fn mha<B: Backend>(c: &LayerConfig, device: &B::Device) -> MultiHeadAttention<B> {
    MultiHeadAttentionConfig::new(c.d_model, c.heads)
        .with_dropout(c.dropout)
        .init(device)
}

/// Linear → ReLU → dropout → Linear.
#[derive(Module, Debug)]
pub struct FeedForward<B: Backend> {
    /// Expansion.
    pub linear1: Linear<B>,
    /// Projection back.
    pub linear2: Linear<B>,
    /// Dropout between them.
    pub dropout: Dropout,
}

impl<B: Backend> FeedForward<B> {
    fn new(c: &LayerConfig, device: &B::Device) -> Self {
        FeedForward {
            linear1: LinearConfig::new(c.d_model, c.ffn).init(device),
            linear2: LinearConfig::new(c.ffn, c.d_model).init(device),
            dropout: DropoutConfig::new(c.dropout).init(),
        }
    }

    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.linear2
            .forward(self.dropout.forward(relu(self.linear1.forward(x))))
    }
}

/// Encoder layer: self-attention over image tokens (position added to queries and keys), FFN.
#[derive(Module, Debug)]
pub struct EncoderLayer<B: Backend> {
    /// Self-attention.
    pub self_attn: MultiHeadAttention<B>,
    /// Norm after attention.
    pub norm1: LayerNorm<B>,
    /// Feed-forward block.
    pub ffn: FeedForward<B>,
    /// Norm after the FFN.
    pub norm2: LayerNorm<B>,
}

impl<B: Backend> EncoderLayer<B> {
    /// A fresh layer.
    pub fn new(c: &LayerConfig, device: &B::Device) -> Self {
        EncoderLayer {
            self_attn: mha(c, device),
            norm1: LayerNormConfig::new(c.d_model).init(device),
            ffn: FeedForward::new(c, device),
            norm2: LayerNormConfig::new(c.d_model).init(device),
        }
    }

    /// `src, pos: [B, L, D]`, `padding: [B, L]` (true = padding; `None`: no token is).
    pub fn forward(
        &self,
        src: Tensor<B, 3>,
        pos: Tensor<B, 3>,
        padding: Option<Tensor<B, 2, Bool>>,
    ) -> Tensor<B, 3> {
        let qk = src.clone() + pos;
        let attn = attend(
            &self.self_attn,
            (qk.clone(), qk, src.clone()),
            padding,
            None,
        );
        let src = self.norm1.forward(src + attn);
        self.norm2.forward(src.clone() + self.ffn.forward(src))
    }
}

/// Decoder layer: query self-attention (groups masked apart), cross-attention to the image,
/// FFN; positions added to queries and keys as in DETR.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    /// Self-attention among queries.
    pub self_attn: MultiHeadAttention<B>,
    /// Norm after self-attention.
    pub norm1: LayerNorm<B>,
    /// Global cross-attention to the encoder memory (absent with deformable attention).
    pub cross_attn: Option<MultiHeadAttention<B>>,
    /// Deformable cross-attention (instead of the global one).
    pub deformable: Option<DeformableAttention<B>>,
    /// Norm after cross-attention.
    pub norm2: LayerNorm<B>,
    /// Feed-forward block.
    pub ffn: FeedForward<B>,
    /// Norm after the FFN.
    pub norm3: LayerNorm<B>,
}

/// Inputs of a decoder layer besides the queries.
pub struct DecoderContext<B: Backend> {
    /// Encoder output `[B, L, D]`.
    pub memory: Tensor<B, 3>,
    /// Its positional encoding `[B, L, D]`.
    pub memory_pos: Tensor<B, 3>,
    /// Memory padding `[B, L]` (true = padding).
    pub memory_padding: Tensor<B, 2, Bool>,
    /// Query self-attention mask `[B, Q, Q]` (true = blocked), e.g. between query groups.
    pub self_attn_mask: Option<Tensor<B, 3, Bool>>,
    /// The memory's levels, for deformable attention.
    pub grids: Vec<LevelGrid>,
}

/// `MultiHeadAttention::forward`'s context, with [`softmax`] recorded as one autodiff node.
fn attend<B: Backend>(
    mha: &MultiHeadAttention<B>,
    (query, key, value): (Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 3>),
    mask_pad: Option<Tensor<B, 2, Bool>>,
    mask_attn: Option<Tensor<B, 3, Bool>>,
) -> Tensor<B, 3> {
    let [b, lq, d] = query.dims();
    let heads = mha.n_heads;
    let split = |t: Tensor<B, 3>, linear: &Linear<B>| {
        let l = t.dims()[1];
        linear
            .forward(t)
            .reshape([b, l, heads, mha.d_k])
            .swap_dims(1, 2)
    };
    let (q, k, v) = (
        split(query, &mha.query),
        split(key, &mha.key),
        split(value, &mha.value),
    );
    let mut scores = mha.dropout.forward(
        q.matmul(k.swap_dims(2, 3))
            .div_scalar((mha.d_k as f32).sqrt()),
    );
    if let Some(mask) = mask_pad {
        let lk = mask.dims()[1];
        scores = scores.mask_fill(mask.reshape([b, 1, 1, lk]), mha.min_float);
    }
    if let Some(mask) = mask_attn {
        let [_, l1, l2] = mask.dims();
        scores = scores.mask_fill(mask.reshape([b, 1, l1, l2]), mha.min_float);
    }
    let context = softmax(scores, 3).matmul(v);
    mha.output
        .forward(context.swap_dims(1, 2).reshape([b, lq, d]))
}

/// Multi-head attention with burn's projections and an optional additive bias `[B, Lq, Lk]` on
/// the logits (shared by all heads); `key_padding` `[B, Lk]` (true = ignored) is filled with
/// burn's `-1e4`, so without a bias this equals `MultiHeadAttention::forward`.
pub fn biased_attention<B: Backend>(
    mha: &MultiHeadAttention<B>,
    query: Tensor<B, 3>,
    key: Tensor<B, 3>,
    value: Tensor<B, 3>,
    key_padding: Tensor<B, 2, Bool>,
    bias: Option<Tensor<B, 3>>,
) -> Tensor<B, 3> {
    let [b, lq, d] = query.dims();
    let lk = key.dims()[1];
    let heads = mha.n_heads;
    let dh = d / heads;
    let split = |t: Tensor<B, 3>, l: usize| t.reshape([b, l, heads, dh]).swap_dims(1, 2);
    let q = split(mha.query.forward(query), lq);
    let k = split(mha.key.forward(key), lk);
    let v = split(mha.value.forward(value), lk);
    let scores = q.matmul(k.swap_dims(2, 3)).div_scalar((dh as f64).sqrt());
    // One additive bias with the padding folded in, materialised per head: flex adds
    // contiguous tensors with SIMD but walks broadcast ones element by element.
    let pad = Tensor::<B, 3>::zeros([b, 1, lk], &key_padding.device())
        .mask_fill(key_padding.unsqueeze_dim::<3>(1), -1.0e4);
    let bias = match bias {
        Some(bias) => bias + pad,
        None => pad.repeat_dim(1, lq),
    };
    let bias = bias.unsqueeze_dim::<4>(1).repeat_dim(1, heads);
    let weights = softmax(scores + bias, 3);
    let context = mha.dropout.forward(weights).matmul(v);
    mha.output
        .forward(context.swap_dims(1, 2).reshape([b, lq, d]))
}

impl<B: Backend> DecoderLayer<B> {
    /// A fresh layer; `deformable` = `Some((levels, points))` samples the memory instead of
    /// attending to all of it.
    pub fn new(c: &LayerConfig, deformable: Option<(usize, usize)>, device: &B::Device) -> Self {
        DecoderLayer {
            self_attn: mha(c, device),
            norm1: LayerNormConfig::new(c.d_model).init(device),
            cross_attn: deformable.is_none().then(|| mha(c, device)),
            deformable: deformable.map(|(levels, points)| {
                DeformableAttention::new(c.d_model, c.heads, levels, points, device)
            }),
            norm2: LayerNormConfig::new(c.d_model).init(device),
            ffn: FeedForward::new(c, device),
            norm3: LayerNormConfig::new(c.d_model).init(device),
        }
    }

    /// `tgt, query_pos: [B, Q, D]`, `reference` boxes `[B, Q, 4]`; `cross_bias` `[B, Q, L]` is
    /// added to the global cross-attention's logits (e.g. a spatial prior around each box).
    pub fn forward(
        &self,
        tgt: Tensor<B, 3>,
        query_pos: Tensor<B, 3>,
        reference: Tensor<B, 3>,
        ctx: &DecoderContext<B>,
        cross_bias: Option<Tensor<B, 3>>,
    ) -> Tensor<B, 3> {
        let qk = tgt.clone() + query_pos.clone();
        let attn = attend(
            &self.self_attn,
            (qk.clone(), qk, tgt.clone()),
            None,
            ctx.self_attn_mask.clone(),
        );
        let tgt = self.norm1.forward(tgt + attn);
        let query = tgt.clone() + query_pos;
        let cross = match (&self.deformable, &self.cross_attn) {
            (Some(deformable), _) => {
                deformable.forward(query, reference, ctx.memory.clone(), &ctx.grids)
            }
            (None, Some(mha)) => biased_attention(
                mha,
                query,
                ctx.memory.clone() + ctx.memory_pos.clone(),
                ctx.memory.clone(),
                ctx.memory_padding.clone(),
                cross_bias,
            ),
            (None, None) => unreachable!("a decoder layer has one kind of cross-attention"),
        };
        let tgt = self.norm2.forward(tgt + cross);
        self.norm3.forward(tgt.clone() + self.ffn.forward(tgt))
    }
}

/// Block-diagonal self-attention mask `[B, ΣQ, ΣQ]` (true = blocked) for consecutive query groups
/// of the given sizes: a query attends only to queries of its own group, so groups train as
/// independent decoders that share weights (Group-DETR, OD-DETR's extra groups, DN queries).
pub fn group_attention_mask<B: Backend>(
    group_sizes: &[usize],
    batch: usize,
    device: &B::Device,
) -> Tensor<B, 3, Bool> {
    let total: usize = group_sizes.iter().sum();
    let mut group_of = Vec::with_capacity(total);
    for (g, &n) in group_sizes.iter().enumerate() {
        group_of.extend(std::iter::repeat_n(g, n));
    }
    let mask: Vec<bool> = (0..batch)
        .flat_map(|_| {
            group_of
                .iter()
                .flat_map(|&gi| group_of.iter().map(move |&gj| gi != gj))
        })
        .collect();
    Tensor::from_data(TensorData::new(mask, [batch, total, total]), device)
}
