//! LGD's implicit teacher: it encodes the ground-truth labels (a PointNet with T-Nets), pools
//! the student's FPN features inside each box (appearance), relates the two with one
//! attention layer restricted to each image, and renders the object vectors back onto their
//! boxes (knowledge mapper) to give teacher maps with exactly the FPN's shapes.

use burn::module::Module;
use burn::nn::attention::{MhaInput, MultiHeadAttention, MultiHeadAttentionConfig};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::backend::Backend;
use burn::tensor::{activation::relu, Bool, Int, Tensor, TensorData};

use serde::{Deserialize, Serialize};

use crate::model::fcos::loss::ImageBoxes;
use crate::model::layers::norm::{normalise, unit_affine, NormAct, NormGroups};
use crate::ops::boxes::box_mask;

/// LayerNorm over the last dimension without affine parameters (ε = 1e-5).
fn layer_norm<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let (var, mean) = x.clone().var_mean_bias(1);
    (x - mean) / var.add_scalar(1e-5).sqrt()
}

/// GroupNorm with one group and no affine: every sample normalised over all its values.
fn group_norm1<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let (ones, zeros) = unit_affine(x.dims()[1], &x.device());
    normalise(
        x,
        NormGroups::Image(1),
        ones,
        zeros,
        1e-5,
        NormAct::Identity,
    )
    .output
}

/// `Lin → LayerNorm → ReLU`.
fn lin_ln_relu<B: Backend>(lin: &Linear<B>, x: Tensor<B, 2>) -> Tensor<B, 2> {
    relu(layer_norm(lin.forward(x)))
}

fn conv3<B: Backend>(c: usize, device: &B::Device) -> Conv2d<B> {
    Conv2dConfig::new([c, c], [3, 3])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init(device)
}

/// A PointNet T-Net: per-object `k×k` transforms from `Lin(k→64→128→1024→512→256)` (each
/// with LayerNorm and ReLU) and a last `Lin(256→k²)`.
#[derive(Module, Debug)]
pub struct TNet<B: Backend> {
    /// The hidden layers.
    pub layers: Vec<Linear<B>>,
    /// The output layer.
    pub out: Linear<B>,
    /// The transform's size.
    pub k: usize,
    /// Whether the identity is added to the predicted transform.
    pub identity: bool,
}

impl<B: Backend> TNet<B> {
    fn new(k: usize, identity: bool, device: &B::Device) -> Self {
        let widths = [k, 64, 128, 1024, 512, 256];
        TNet {
            layers: widths
                .windows(2)
                .map(|w| LinearConfig::new(w[0], w[1]).init(device))
                .collect(),
            out: LinearConfig::new(256, k * k).init(device),
            k,
            identity,
        }
    }

    /// `x · T(x)` for each row of `x: [T, k]`.
    fn transform(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let [t, k] = x.dims();
        let hidden = self
            .layers
            .iter()
            .fold(x.clone(), |h, lin| lin_ln_relu(lin, h));
        let mut m = self.out.forward(hidden).reshape([t, k, k]);
        if self.identity {
            let eye = Tensor::<B, 2>::eye(k, &x.device()).reshape([1, k, k]);
            m = m + eye;
        }
        x.reshape([t, 1, k]).matmul(m).reshape([t, k])
    }
}

/// The label encoder: a PointNet over per-object descriptors with a per-image max-pooled
/// global feature, projected to the FPN's width.
#[derive(Module, Debug)]
pub struct LabelEncoder<B: Backend> {
    /// Input transform.
    pub input_tnet: TNet<B>,
    /// `Lin(k→64)`.
    pub lin1: Linear<B>,
    /// Feature transform.
    pub feature_tnet: TNet<B>,
    /// `Lin(64→128)`.
    pub lin2: Linear<B>,
    /// `Lin(128→1024)`.
    pub lin3: Linear<B>,
    /// `Lin(1088→C)` of the local and global features.
    pub embed: Linear<B>,
    /// `Lin(C→C)`.
    pub project: Linear<B>,
}

impl<B: Backend> LabelEncoder<B> {
    fn new(k: usize, channels: usize, identity: bool, device: &B::Device) -> Self {
        LabelEncoder {
            input_tnet: TNet::new(k, identity, device),
            lin1: LinearConfig::new(k, 64).init(device),
            feature_tnet: TNet::new(64, identity, device),
            lin2: LinearConfig::new(64, 128).init(device),
            lin3: LinearConfig::new(128, 1024).init(device),
            embed: LinearConfig::new(1088, channels).init(device),
            project: LinearConfig::new(channels, channels).init(device),
        }
    }

    /// Label embeddings `[T, C]` of descriptors `[T, k]`; `image_of` gives each object's image
    /// (every image in `0..images` has at least one object).
    fn forward(
        &self,
        desc: Tensor<B, 2>,
        image_of: &Tensor<B, 1, Int>,
        images: &[Vec<usize>],
    ) -> Tensor<B, 2> {
        let x = self.input_tnet.transform(desc);
        let h = lin_ln_relu(&self.lin1, x);
        let f = self.feature_tnet.transform(h);
        let g = lin_ln_relu(&self.lin3, lin_ln_relu(&self.lin2, f.clone()));
        let device = g.device();
        let pooled: Vec<Tensor<B, 2>> = images
            .iter()
            .map(|objects| g.clone().select(0, index(objects, &device)).max_dim(0))
            .collect();
        let global = Tensor::cat(pooled, 0).select(0, image_of.clone());
        let e = lin_ln_relu(&self.embed, Tensor::cat(vec![f, global], 1));
        lin_ln_relu(&self.project, e)
    }
}

/// An index tensor.
fn index<B: Backend>(values: &[usize], device: &B::Device) -> Tensor<B, 1, Int> {
    let data: Vec<i64> = values.iter().map(|&v| v as i64).collect();
    Tensor::from_data(TensorData::new(data, [values.len()]), device)
}

/// How the relation adapter forms each object's vector (the official `INTERACT_PATTERN`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Interact {
    /// Appearance queries attend to the image's label embeddings (`stuGuided`, every official
    /// config).
    #[default]
    StuGuided,
    /// Label-embedding queries attend to the image's appearances (`labelGuided`).
    LabelGuided,
    /// Each object's own label embedding, no attention (`teacher_fill`).
    TeacherFill,
    /// Each object's own pooled appearance, no attention (`student_fill`).
    StudentFill,
}

/// The implicit teacher's modules.
#[derive(Module, Debug)]
pub struct ImplicitTeacher<B: Backend> {
    /// Label encoder.
    pub label_encoder: LabelEncoder<B>,
    /// Appearance projection shared by every level: 3×3 conv, GroupNorm(1), ReLU.
    pub appearance: Conv2d<B>,
    /// Inter-object relation adapter: appearance queries, label keys and values.
    pub relation: MultiHeadAttention<B>,
    /// Projection of each object's vector before rendering.
    pub object_proj: Linear<B>,
    /// Projection of the context token, broadcast over the map (with a context box only).
    pub context_proj: Option<Linear<B>>,
    /// Local 3×3 conv on the rendered map.
    pub local: Conv2d<B>,
    /// Refinement, shared by every level: (conv, GroupNorm(1), ReLU) × 2, conv, GroupNorm(1).
    pub refine: Vec<Conv2d<B>>,
}

/// What the teacher reads of a batch: its objects and their masks on every level.
pub struct Objects<B: Backend> {
    /// Descriptors `[T, 4 + K]` (real objects, then each image's context token).
    desc: Tensor<B, 2>,
    /// The image of each object.
    image_of: Tensor<B, 1, Int>,
    /// Per image, its objects' rows (context token last).
    rows: Vec<Vec<usize>>,
    /// Per level, per image: box masks `[N_b, H·W]` of its objects (context included).
    masks: Vec<Vec<Tensor<B, 2>>>,
    /// Per image: its real objects' count.
    real: Vec<usize>,
    /// `[1, T, T]`: true where two objects belong to different images.
    blocked: Tensor<B, 3, Bool>,
}

/// A box's descriptor: corners clamped to the padded image and divided by its size, the class
/// one-hot (all zeros for the context box), everything mapped to `2d − 1`.
pub fn descriptor(
    b: &[f64; 4],
    class: Option<usize>,
    k: usize,
    (ph, pw): (usize, usize),
) -> Vec<f32> {
    let (fw, fh) = (pw as f64, ph as f64);
    let mut d = vec![
        b[0].clamp(0.0, fw - 1.0) / fw,
        b[1].clamp(0.0, fh - 1.0) / fh,
        b[2].clamp(0.0, fw - 1.0) / fw,
        b[3].clamp(0.0, fh - 1.0) / fh,
    ];
    d.extend((0..k).map(|c| if Some(c) == class { 1.0 } else { 0.0 }));
    d.into_iter().map(|v| (2.0 * v - 1.0) as f32).collect()
}

impl<B: Backend> Objects<B> {
    /// The objects of `images` (each with at least one box) for levels of `shapes`.
    pub fn new(
        images: &[ImageBoxes],
        num_classes: usize,
        context: bool,
        padded: (usize, usize),
        shapes: &[(usize, usize)],
        device: &B::Device,
    ) -> Self {
        let canvas = [0.0, 0.0, padded.1 as f64, padded.0 as f64];
        let mut desc = Vec::new();
        let mut image_of = Vec::new();
        let mut rows = Vec::new();
        let mut real = Vec::new();
        let mut boxes_of = Vec::new();
        for (b, image) in images.iter().enumerate() {
            let mut r = Vec::new();
            let mut boxes = Vec::new();
            for (bx, &c) in image.boxes.iter().zip(&image.classes) {
                r.push(image_of.len());
                image_of.push(b);
                desc.extend(descriptor(bx, Some(c), num_classes, padded));
                boxes.push(*bx);
            }
            real.push(r.len());
            if context {
                r.push(image_of.len());
                image_of.push(b);
                desc.extend(descriptor(&canvas, None, num_classes, padded));
                boxes.push(canvas);
            }
            rows.push(r);
            boxes_of.push(boxes);
        }
        let t = image_of.len();
        let masks = shapes
            .iter()
            .map(|&(h, w)| {
                boxes_of
                    .iter()
                    .map(|boxes| {
                        let data: Vec<f32> = boxes
                            .iter()
                            .flat_map(|b| box_mask(b, padded, (h, w)))
                            .collect();
                        Tensor::from_data(TensorData::new(data, [boxes.len(), h * w]), device)
                    })
                    .collect()
            })
            .collect();
        let blocked: Vec<bool> = (0..t * t)
            .map(|i| image_of[i / t] != image_of[i % t])
            .collect();
        Objects {
            desc: Tensor::from_data(TensorData::new(desc, [t, 4 + num_classes]), device),
            image_of: index(&image_of, device),
            rows,
            masks,
            real,
            blocked: Tensor::from_data(TensorData::new(blocked, [1, t, t]), device),
        }
    }
}

impl<B: Backend> ImplicitTeacher<B> {
    /// A fresh teacher for `num_classes` classes and FPN width `channels`.
    pub fn new(
        num_classes: usize,
        channels: usize,
        heads: usize,
        context: bool,
        identity: bool,
        device: &B::Device,
    ) -> Self {
        ImplicitTeacher {
            label_encoder: LabelEncoder::new(4 + num_classes, channels, identity, device),
            appearance: conv3(channels, device),
            relation: MultiHeadAttentionConfig::new(channels, heads)
                .with_dropout(0.0)
                .init(device),
            object_proj: LinearConfig::new(channels, channels).init(device),
            context_proj: context.then(|| LinearConfig::new(channels, channels).init(device)),
            local: conv3(channels, device),
            refine: (0..3).map(|_| conv3(channels, device)).collect(),
        }
    }

    /// Each object's mean projected appearance `[T, C]` on level `p` (an empty mask pools to
    /// zero).
    fn pooled_appearance(&self, p: &Tensor<B, 4>, masks: &[Tensor<B, 2>]) -> Tensor<B, 2> {
        let [n, c, h, w] = p.dims();
        let q = relu(group_norm1(self.appearance.forward(p.clone()))).reshape([n, c, h * w]);
        let pooled: Vec<Tensor<B, 2>> = masks
            .iter()
            .enumerate()
            .map(|(b, m)| {
                let area = m.clone().sum_dim(1).clamp_min(1.0);
                let qb = q.clone().narrow(0, b, 1).reshape([c, h * w]);
                m.clone().matmul(qb.transpose()) / area
            })
            .collect();
        Tensor::cat(pooled, 0)
    }

    /// The relation adapter: `query` attends to `key_value` within each image.
    fn relate(
        &self,
        query: Tensor<B, 2>,
        key_value: Tensor<B, 2>,
        blocked: &Tensor<B, 3, Bool>,
    ) -> Tensor<B, 2> {
        let [t, c] = query.dims();
        let kv = key_value.reshape([1, t, c]);
        self.relation
            .forward(
                MhaInput::new(query.reshape([1, t, c]), kv.clone(), kv).mask_attn(blocked.clone()),
            )
            .context
            .reshape([t, c])
    }

    /// Teacher maps with the shapes of `fpn` (the student's levels, of the images in
    /// `objects` only).
    pub fn forward(
        &self,
        fpn: &[Tensor<B, 4>],
        objects: &Objects<B>,
        interact: Interact,
    ) -> Vec<Tensor<B, 4>> {
        let labels =
            self.label_encoder
                .forward(objects.desc.clone(), &objects.image_of, &objects.rows);
        fpn.iter()
            .zip(&objects.masks)
            .map(|(p, masks)| {
                let [n, c, h, w] = p.dims();
                let labels = labels.clone();
                let related = match interact {
                    Interact::TeacherFill => labels,
                    Interact::StudentFill => self.pooled_appearance(p, masks),
                    Interact::StuGuided => {
                        let a = self.pooled_appearance(p, masks);
                        self.relate(a, labels, &objects.blocked)
                    }
                    Interact::LabelGuided => {
                        let a = self.pooled_appearance(p, masks);
                        self.relate(labels, a, &objects.blocked)
                    }
                };
                let rendered: Vec<Tensor<B, 4>> = masks
                    .iter()
                    .zip(&objects.rows)
                    .zip(&objects.real)
                    .map(|((m, rows), &real)| {
                        let device = m.device();
                        let objs = related.clone().select(0, index(&rows[..real], &device));
                        let projected = self.object_proj.forward(objs);
                        let mask = m.clone().narrow(0, 0, real);
                        projected.transpose().matmul(mask).reshape([1, c, h, w])
                    })
                    .collect();
                let mut u = self.local.forward(Tensor::cat(rendered, 0));
                if let Some(ctx) = &self.context_proj {
                    let last: Vec<usize> = objects
                        .rows
                        .iter()
                        .filter_map(|r| r.last().copied())
                        .collect();
                    let tokens = related.clone().select(0, index(&last, &u.device()));
                    u = u + ctx.forward(tokens).reshape([n, c, 1, 1]);
                }
                let mut x = relu(u);
                for (i, conv) in self.refine.iter().enumerate() {
                    x = group_norm1(conv.forward(x));
                    if i + 1 < self.refine.len() {
                        x = relu(x);
                    }
                }
                x
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_rescale_clamped_corners_and_one_hot() {
        let d = descriptor(&[-4.0, 8.0, 40.0, 16.0], Some(1), 2, (32, 32));
        let expected = [-1.0, -0.5, 2.0 * 31.0 / 32.0 - 1.0, 0.0, -1.0, 1.0];
        for (a, b) in d.iter().zip(expected) {
            assert!((*a as f64 - b).abs() < 1e-6, "{d:?}");
        }
    }
}
