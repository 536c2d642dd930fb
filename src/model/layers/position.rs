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
        // Columns (rows) with equal counts give equal y (x) values: with padding only at the
        // bottom and right, nearly all do, so each value is computed once and copied.
        let same_col: Vec<bool> = (0..w)
            .map(|x| x > 0 && (0..h).all(|y| y_embed[y * w + x] == y_embed[y * w + x - 1]))
            .collect();
        let same_row: Vec<bool> = (0..h)
            .map(|y| y > 0 && x_embed[y * w..][..w] == x_embed[(y - 1) * w..][..w])
            .collect();
        for (i, d) in dim_t.iter().enumerate() {
            // Even channels take sin, odd ones cos; y's channels come first.
            let trig = |v: f64| (if i % 2 == 0 { v.sin() } else { v.cos() }) as f32;
            let y_chan = &mut out[(n * 2 * f + i) * h * w..][..h * w];
            for y in 0..h {
                for x in 0..w {
                    y_chan[y * w + x] = if same_col[x] {
                        y_chan[y * w + x - 1]
                    } else {
                        trig(y_embed[y * w + x] / (y_embed[(h - 1) * w + x] + 1e-6) * scale / d)
                    };
                }
            }
            let x_chan = &mut out[(n * 2 * f + f + i) * h * w..][..h * w];
            for y in 0..h {
                if same_row[y] {
                    x_chan.copy_within((y - 1) * w..y * w, y * w);
                    continue;
                }
                for x in 0..w {
                    x_chan[y * w + x] =
                        trig(x_embed[y * w + x] / (x_embed[y * w + w - 1] + 1e-6) * scale / d);
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

/// Normalised `(x, y)` centres `[B, H·W, 2]` of a feature map's cells within each image's valid
/// (unpadded) region, for a padding mask `[B, H, W]` of host booleans (true = padding); the same
/// normalisation as [`sine_position_encoding`]. Padded cells get coordinates beyond 1.
pub fn cell_centres(padding: &[bool], [b, h, w]: [usize; 3]) -> Vec<f32> {
    let mut out = Vec::with_capacity(b * h * w * 2);
    for (valid_w, valid_h) in valid_extent(padding, [b, h, w]) {
        for y in 0..h {
            for x in 0..w {
                out.push((x as f32 + 0.5) / valid_w);
                out.push((y as f32 + 0.5) / valid_h);
            }
        }
    }
    out
}

/// Unpadded `(columns, rows)` of each image's map (padding `[b, h, w]`, true = padding, at the
/// right and bottom), at least 1.
pub fn valid_extent(padding: &[bool], [b, h, w]: [usize; 3]) -> Vec<(f32, f32)> {
    (0..b)
        .map(|n| {
            let valid = |y: usize, x: usize| !padding[(n * h + y) * w + x];
            let columns = (0..w).filter(|&x| valid(0, x)).count().max(1);
            let rows = (0..h).filter(|&y| valid(y, 0)).count().max(1);
            (columns as f32, rows as f32)
        })
        .collect()
}

/// Log-domain Gaussian prior `[B, Q, L]` of attending from queries with boxes `[B, Q, 4]`
/// (`cx, cy, w, h`) to memory cells at `centres` `[B, L, 2]`:
/// `−(Δx² / 2(σw)² + Δy² / 2(σh)²)` (SMCA's spatially modulated co-attention, with the box as
/// the Gaussian's extent), so each query starts by pooling its own box.
pub fn box_gaussian_prior<B: Backend>(
    boxes: Tensor<B, 3>,
    centres: Tensor<B, 3>,
    sigma: f64,
) -> Tensor<B, 3> {
    let coord = |t: &Tensor<B, 3>, i: usize| t.clone().narrow(2, i, 1);
    // Boxes narrower than 2% of the image would make the prior a needle.
    let spread = |i: usize| {
        coord(&boxes, i)
            .clamp_min(0.02)
            .mul_scalar(sigma)
            .powi_scalar(2)
            .mul_scalar(2.0)
    };
    let (cx, cy, sx, sy) = (coord(&boxes, 0), coord(&boxes, 1), spread(2), spread(3));
    let px = coord(&centres, 0).swap_dims(1, 2);
    let py = coord(&centres, 1).swap_dims(1, 2);
    let dx = (px - cx).powi_scalar(2) / sx;
    let dy = (py - cy).powi_scalar(2) / sy;
    (dx + dy).neg()
}
