//! Multi-scale deformable cross-attention (Deformable DETR, Zhu et al. 2021, eq. 3): each query
//! reads `points` bilinearly sampled values per head and level, at offsets it predicts around its
//! reference box, weighted by attention it predicts too. Global attention spreads a query over
//! every token; sampling reads sub-cell positions, which is what localises small boxes.
//!
//! Sampling is a weighted sum of value rows: the four bilinear corners of every sample each
//! weight the row of the token they fall on (`sampling::weighted_rows`). Gradients reach the
//! values through that sum, the attention weights and the sampling offsets through the corner
//! weights.

use burn::module::Module;
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::model::layers::activation::softmax;
use crate::model::layers::sampling::weighted_rows;

/// One feature level's place in the memory.
#[derive(Debug, Clone, PartialEq)]
pub struct LevelGrid {
    /// Rows of the (padded) map.
    pub h: usize,
    /// Columns of the (padded) map.
    pub w: usize,
    /// Index of its first token in the memory.
    pub start: usize,
    /// Unpadded `(columns, rows)` per image: boxes are normalised to the unpadded image.
    pub valid: Vec<(f32, f32)>,
}

/// Deformable cross-attention: offsets and weights from the query, values from the memory.
#[derive(Module, Debug)]
pub struct DeformableAttention<B: Backend> {
    /// Sampling offsets per head, level and point (`x, y`), relative to the reference box.
    pub sampling_offsets: Linear<B>,
    /// Attention logits per head, level and point (softmax over levels × points).
    pub attention_weights: Linear<B>,
    /// Value projection.
    pub value_proj: Linear<B>,
    /// Output projection.
    pub output_proj: Linear<B>,
    /// Attention heads.
    pub heads: usize,
    /// Feature levels.
    pub levels: usize,
    /// Samples per head and level.
    pub points: usize,
}

impl<B: Backend> DeformableAttention<B> {
    /// Fresh weights as Deformable DETR initialises them: zero offset weights with a bias that
    /// places head `h`'s point `p` at `(p + 1)` steps in direction `2πh / heads`, and uniform
    /// attention.
    pub fn new(d: usize, heads: usize, levels: usize, points: usize, device: &B::Device) -> Self {
        let mut bias = Vec::with_capacity(heads * levels * points * 2);
        for h in 0..heads {
            let theta = 2.0 * std::f32::consts::PI * h as f32 / heads as f32;
            let (x, y) = (theta.cos(), theta.sin());
            let scale = x.abs().max(y.abs());
            for _ in 0..levels {
                for p in 0..points {
                    bias.push(x / scale * (p + 1) as f32);
                    bias.push(y / scale * (p + 1) as f32);
                }
            }
        }
        let n = bias.len();
        let mut sampling_offsets = LinearConfig::new(d, n)
            .with_initializer(Initializer::Zeros)
            .init(device);
        sampling_offsets.bias = Some(burn::module::Param::from_tensor(Tensor::from_data(
            TensorData::new(bias, [n]),
            device,
        )));
        DeformableAttention {
            sampling_offsets,
            attention_weights: LinearConfig::new(d, heads * levels * points)
                .with_initializer(Initializer::Zeros)
                .init(device),
            value_proj: LinearConfig::new(d, d).init(device),
            output_proj: LinearConfig::new(d, d).init(device),
            heads,
            levels,
            points,
        }
    }

    /// `query [B, Q, D]` with `reference` boxes `[B, Q, 4]` (normalised `cx, cy, w, h`) reads
    /// `memory [B, T, D]`, whose tokens are the levels of `grids` in order.
    pub fn forward(
        &self,
        query: Tensor<B, 3>,
        reference: Tensor<B, 3>,
        memory: Tensor<B, 3>,
        grids: &[LevelGrid],
    ) -> Tensor<B, 3> {
        let [b, q, d] = query.dims();
        let t = memory.dims()[1];
        let (heads, levels, points) = (self.heads, self.levels, self.points);
        assert_eq!(grids.len(), levels, "one grid per level");
        let dh = d / heads;
        let device = query.device();
        let offsets = self
            .sampling_offsets
            .forward(query.clone())
            .reshape([b, q, heads, levels, points, 2]);
        let attention = softmax(
            self.attention_weights
                .forward(query)
                .reshape([b, q, heads, levels * points]),
            3,
        )
        .reshape([b, q, heads, levels, points]);
        let reference = reference.reshape([b, q, 1, 1, 1, 4]);
        let centre = reference.clone().narrow(5, 0, 2);
        let size = reference.narrow(5, 2, 2);
        // Within the box: the outermost initial point lies on its edge (Deformable DETR).
        let location = centre + offsets * size.div_scalar(2.0 * points as f64);
        // Continuous cell coordinates, cell centres at integers.
        let scale: Vec<f32> = (0..b)
            .flat_map(|i| grids.iter().flat_map(move |g| [g.valid[i].0, g.valid[i].1]))
            .collect();
        let scale =
            Tensor::<B, 6>::from_data(TensorData::new(scale, [b, 1, 1, levels, 1, 2]), &device);
        let cell = (location * scale).sub_scalar(0.5);
        let host: Vec<f32> = cell
            .clone()
            .into_data()
            .convert::<f32>()
            .to_vec()
            .unwrap_or_default();
        let n = levels * points * 4;
        // Corner indices in [B, H, Q, L·P·4] order, their validity in [B, Q, H, L, P, 4] order
        // (the weights' layout before their transpose).
        let mut index = vec![0u32; b * heads * q * n];
        let mut valid = vec![0f32; b * q * heads * n];
        let mut floor = vec![0f32; host.len()];
        for i in 0..b {
            for j in 0..q {
                for h in 0..heads {
                    for (l, g) in grids.iter().enumerate() {
                        for p in 0..points {
                            let at = ((((i * q + j) * heads + h) * levels + l) * points + p) * 2;
                            let (x, y) = (host[at], host[at + 1]);
                            let (x0, y0) = (x.floor(), y.floor());
                            floor[at] = x0;
                            floor[at + 1] = y0;
                            for (c, (dx, dy)) in
                                [(0, 0), (1, 0), (0, 1), (1, 1)].into_iter().enumerate()
                            {
                                let (cx, cy) = (x0 as i64 + dx, y0 as i64 + dy);
                                let inside = x.is_finite()
                                    && y.is_finite()
                                    && (0..g.w as i64).contains(&cx)
                                    && (0..g.h as i64).contains(&cy);
                                let k = (l * points + p) * 4 + c;
                                if inside {
                                    index[((i * heads + h) * q + j) * n + k] =
                                        (g.start + cy as usize * g.w + cx as usize) as u32;
                                    valid[((i * q + j) * heads + h) * n + k] = 1.0;
                                }
                            }
                        }
                    }
                }
            }
        }
        let floor = Tensor::<B, 6>::from_data(
            TensorData::new(floor, [b, q, heads, levels, points, 2]),
            &device,
        );
        let frac = cell - floor;
        let fx = frac.clone().narrow(5, 0, 1);
        let fy = frac.narrow(5, 1, 1);
        let (gx, gy) = (
            fx.clone().neg().add_scalar(1.0),
            fy.clone().neg().add_scalar(1.0),
        );
        let corners = Tensor::cat(
            vec![
                gx.clone() * gy.clone(),
                fx.clone() * gy,
                gx * fy.clone(),
                fx * fy,
            ],
            5,
        );
        let valid = Tensor::<B, 6>::from_data(
            TensorData::new(valid, [b, q, heads, levels, points, 4]),
            &device,
        );
        let weights = (corners * valid * attention.unsqueeze_dim::<6>(5))
            .reshape([b, q, heads, n])
            .swap_dims(1, 2)
            .reshape([b * heads, q, n]);
        let values = self
            .value_proj
            .forward(memory)
            .reshape([b, t, heads, dh])
            .swap_dims(1, 2)
            .reshape([b * heads, t, dh]);
        let context = weighted_rows(weights, index, values)
            .reshape([b, heads, q, dh])
            .swap_dims(1, 2)
            .reshape([b, q, d]);
        self.output_proj.forward(context)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Inference as B;
    use burn::tensor::ops::GridSampleOptions;
    use burn::tensor::Distribution;

    /// The weighted sum of sampled rows equals reading each level with `grid_sample` (bilinear,
    /// zero padding, `align_corners = false`, as Deformable DETR's PyTorch reference), including
    /// points that fall outside the map.
    #[test]
    fn sampling_matches_grid_sample() {
        let device = Default::default();
        let (b, q, d, heads, points) = (2, 3, 8, 2, 3);
        let shapes = [(4usize, 5usize), (2, 3)];
        let levels = shapes.len();
        let mut module = DeformableAttention::<B>::new(d, heads, levels, points, &device);
        // Random offsets and attention, large enough to leave the maps.
        let random = |n: usize, m: usize, s: f64| {
            burn::module::Param::from_tensor(Tensor::random(
                [n, m],
                Distribution::Normal(0.0, s),
                &device,
            ))
        };
        module.sampling_offsets.weight = random(d, heads * levels * points * 2, 3.0);
        module.attention_weights.weight = random(d, heads * levels * points, 1.0);
        let grids: Vec<LevelGrid> = shapes
            .iter()
            .scan(0, |start, &(h, w)| {
                let g = LevelGrid {
                    h,
                    w,
                    start: *start,
                    valid: vec![(w as f32, h as f32); b],
                };
                *start += h * w;
                Some(g)
            })
            .collect();
        let t: usize = shapes.iter().map(|(h, w)| h * w).sum();
        let query = Tensor::<B, 3>::random([b, q, d], Distribution::Normal(0.0, 1.0), &device);
        let memory = Tensor::<B, 3>::random([b, t, d], Distribution::Normal(0.0, 1.0), &device);
        let reference = Tensor::<B, 3>::random([b, q, 4], Distribution::Uniform(0.1, 0.9), &device);
        let got = module.forward(query.clone(), reference.clone(), memory.clone(), &grids);

        // Reference: locations and weights as the module defines them, sampled per level.
        let offsets = module
            .sampling_offsets
            .forward(query.clone())
            .reshape([b, q, heads, levels, points, 2]);
        let attention = softmax(
            module
                .attention_weights
                .forward(query)
                .reshape([b, q, heads, levels * points]),
            3,
        )
        .reshape([b, q, heads, levels, points]);
        let r = reference.reshape([b, q, 1, 1, 1, 4]);
        let location =
            r.clone().narrow(5, 0, 2) + offsets * r.narrow(5, 2, 2).div_scalar(2.0 * points as f64);
        let values = module.value_proj.forward(memory);
        let dh = d / heads;
        let mut context = Tensor::<B, 4>::zeros([b, heads, q, dh], &device);
        for (l, g) in grids.iter().enumerate() {
            for h in 0..heads {
                let map = values
                    .clone()
                    .narrow(1, g.start, g.h * g.w)
                    .narrow(2, h * dh, dh)
                    .swap_dims(1, 2)
                    .reshape([b, dh, g.h, g.w]);
                let grid = location
                    .clone()
                    .narrow(2, h, 1)
                    .narrow(3, l, 1)
                    .reshape([b, q, points, 2])
                    .mul_scalar(2.0)
                    .sub_scalar(1.0);
                let sampled = map.grid_sample_2d(grid, GridSampleOptions::default());
                let a = attention
                    .clone()
                    .narrow(2, h, 1)
                    .narrow(3, l, 1)
                    .reshape([b, 1, q, points]);
                let read = (sampled * a)
                    .sum_dim(3)
                    .reshape([b, 1, dh, q])
                    .swap_dims(2, 3);
                let sum = context.clone().narrow(1, h, 1) + read;
                context = context.slice_assign([0..b, h..h + 1, 0..q, 0..dh], sum);
            }
        }
        let want = module
            .output_proj
            .forward(context.swap_dims(1, 2).reshape([b, q, d]));
        let (got, want) = (
            got.into_data().to_vec::<f32>().expect("f32"),
            want.into_data().to_vec::<f32>().expect("f32"),
        );
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-4, "max |diff| {worst}");
    }
}
