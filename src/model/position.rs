//! DETR's sine positional encoding (`PositionEmbeddingSine`, normalised, scale 2π) of feature
//! maps with padding, and the sine embedding of box coordinates used for query positions.

use burn::tensor::{backend::Backend, Bool, Tensor, TensorData};

/// Temperature of the frequency ladder, as DETR.
const TEMPERATURE: f64 = 10000.0;

/// Positional encoding `[B, 2F, H, W]` for a padding mask `[B, H, W]` (true = padding), given as
/// host booleans; `F = channels / 2`. Positions count only valid pixels, normalised to `(0, 2π]`.
pub fn sine_position_encoding(
    padding: &[bool],
    [b, h, w]: [usize; 3],
    channels: usize,
) -> Vec<f32> {
    let f = channels / 2;
    let scale = 2.0 * std::f64::consts::PI;
    let dim_t: Vec<f64> = (0..f)
        .map(|i| TEMPERATURE.powf(2.0 * (i / 2) as f64 / f as f64))
        .collect();
    let mut out = vec![0f32; b * 2 * f * h * w];
    for n in 0..b {
        let valid = |y: usize, x: usize| !padding[(n * h + y) * w + x];
        // Cumulative counts of valid pixels down each column and along each row.
        let mut y_embed = vec![0f64; h * w];
        let mut x_embed = vec![0f64; h * w];
        for y in 0..h {
            for x in 0..w {
                let v = valid(y, x) as u32 as f64;
                y_embed[y * w + x] = v + if y > 0 { y_embed[(y - 1) * w + x] } else { 0.0 };
                x_embed[y * w + x] = v + if x > 0 { x_embed[y * w + x - 1] } else { 0.0 };
            }
        }
        for y in 0..h {
            for x in 0..w {
                let ye = y_embed[y * w + x] / (y_embed[(h - 1) * w + x] + 1e-6) * scale;
                let xe = x_embed[y * w + x] / (x_embed[y * w + w - 1] + 1e-6) * scale;
                for (i, d) in dim_t.iter().enumerate() {
                    // Even channels take sin, odd ones cos; y's channels come first.
                    let trig = |v: f64| if i % 2 == 0 { v.sin() } else { v.cos() };
                    out[((n * 2 * f + i) * h + y) * w + x] = trig(ye / d) as f32;
                    out[((n * 2 * f + f + i) * h + y) * w + x] = trig(xe / d) as f32;
                }
            }
        }
    }
    out
}

/// Nearest-neighbour downsampling of a padding mask to a feature map's size (PyTorch's legacy
/// `nearest`: source index `floor(dst · in / out)`), on the host.
pub fn downsample_padding(
    padding: &[bool],
    [b, h, w]: [usize; 3],
    (fh, fw): (usize, usize),
) -> Vec<bool> {
    let mut out = Vec::with_capacity(b * fh * fw);
    for n in 0..b {
        for y in 0..fh {
            let sy = (y * h) / fh;
            for x in 0..fw {
                out.push(padding[(n * h + sy) * w + (x * w) / fw]);
            }
        }
    }
    out
}

/// The padding mask as a `[B, H·W]` bool tensor (true = padding), for attention key masks.
pub fn padding_tensor<B: Backend>(
    padding: Vec<bool>,
    [b, h, w]: [usize; 3],
    device: &B::Device,
) -> Tensor<B, 2, Bool> {
    Tensor::from_data(TensorData::new(padding, [b, h * w]), device)
}

/// Sine embedding `[B, Q, 4F]` of normalised boxes `[B, Q, 4]` (each coordinate scaled by 2π and
/// mapped through `F/2` sines and `F/2` cosines of a geometric frequency ladder).
pub fn sine_box_embedding<B: Backend>(boxes: Tensor<B, 3>, f: usize) -> Tensor<B, 3> {
    let [b, q, c] = boxes.dims();
    let half = f / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| (2.0 * std::f64::consts::PI / TEMPERATURE.powf(2.0 * i as f64 / f as f64)) as f32)
        .collect();
    let inv = Tensor::<B, 1>::from_data(TensorData::new(inv, [half]), &boxes.device())
        .reshape([1, 1, 1, half]);
    let phase = boxes.unsqueeze_dim::<4>(3) * inv;
    Tensor::cat(vec![phase.clone().sin(), phase.cos()], 3).reshape([b, q, c * 2 * half])
}
