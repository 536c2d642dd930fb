//! Geometric and photometric transforms on host images, with their effect on boxes and label maps.
//!
//! Random transforms take the caller's RNG, so a sample's augmentation is a pure function of the
//! loader's seed, the epoch and the sample index.

use image::imageops::{self, FilterType};
use image::RgbImage;
use rand::Rng;

use crate::data::labelmap::LabelMap;

/// ImageNet channel means (RGB, 0..1 scale), the normalisation torchvision backbones expect.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations (RGB, 0..1 scale).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// The scale that makes the shorter side `shorter` without the longer side exceeding `max_size`
/// (detectron2 / DETR `RandomResize` convention).
pub fn resize_scale(width: u32, height: u32, shorter: u32, max_size: u32) -> f64 {
    let (short, long) = (width.min(height) as f64, width.max(height) as f64);
    let mut scale = shorter as f64 / short;
    if long * scale > max_size as f64 {
        scale = max_size as f64 / long;
    }
    scale
}

/// Resizes keeping the aspect ratio (bilinear); returns the image and the applied scale.
pub fn resize_keep_aspect(img: &RgbImage, shorter: u32, max_size: u32) -> (RgbImage, f64) {
    let scale = resize_scale(img.width(), img.height(), shorter, max_size);
    let w = ((img.width() as f64 * scale).round() as u32).max(1);
    let h = ((img.height() as f64 * scale).round() as u32).max(1);
    if (w, h) == img.dimensions() {
        return (img.clone(), 1.0);
    }
    (imageops::resize(img, w, h, FilterType::Triangle), scale)
}

/// Scales `[x0, y0, x1, y1]` boxes in place.
pub fn scale_boxes(boxes: &mut [[f32; 4]], sx: f64, sy: f64) {
    for b in boxes {
        b[0] = (b[0] as f64 * sx) as f32;
        b[1] = (b[1] as f64 * sy) as f32;
        b[2] = (b[2] as f64 * sx) as f32;
        b[3] = (b[3] as f64 * sy) as f32;
    }
}

/// Mirrors `[x0, y0, x1, y1]` boxes of an image of width `width` in place.
pub fn hflip_boxes(boxes: &mut [[f32; 4]], width: u32) {
    for b in boxes {
        let (x0, x1) = (b[0], b[2]);
        b[0] = width as f32 - x1;
        b[2] = width as f32 - x0;
    }
}

/// Mirrors a label map in place.
pub fn hflip_label(map: &mut LabelMap) {
    for row in map.data.chunks_exact_mut(map.width as usize) {
        row.reverse();
    }
}

/// Mirrors a label map top to bottom in place.
pub fn vflip_label(map: &mut LabelMap) {
    let width = map.width as usize;
    let rows = map.height as usize;
    for y in 0..rows / 2 {
        let (top, bottom) = map.data.split_at_mut((rows - 1 - y) * width);
        top[y * width..(y + 1) * width].swap_with_slice(&mut bottom[..width]);
    }
}

/// Swaps the rows and columns of a label map.
pub fn transpose_label(map: &LabelMap) -> LabelMap {
    let mut out = LabelMap::filled(map.height, map.width, 0);
    for y in 0..map.height {
        for x in 0..map.width {
            out.data[(x * map.height + y) as usize] = map.get(x, y);
        }
    }
    out
}

/// Nearest-neighbour resize of a label map (class ids must not be interpolated).
pub fn resize_label(map: &LabelMap, width: u32, height: u32) -> LabelMap {
    let mut out = LabelMap::filled(width, height, 0);
    for y in 0..height {
        // Pixel-centre sampling, as PIL/torchvision NEAREST.
        let sy =
            (((y as f64 + 0.5) * map.height as f64 / height as f64) as u32).min(map.height - 1);
        for x in 0..width {
            let sx =
                (((x as f64 + 0.5) * map.width as f64 / width as f64) as u32).min(map.width - 1);
            out.data[(y * width + x) as usize] = map.get(sx, sy);
        }
    }
    out
}

/// Segmentation augmentation (mmseg `RandomResize` + `RandomCrop` + `Pad`): scale by a random
/// factor in `scale_range`, pad to at least `crop` (image with 0, label with `ignore_index`), then
/// take a random `crop`-sized window.
pub fn random_scale_crop<R: Rng>(
    img: &RgbImage,
    label: &LabelMap,
    scale_range: (f64, f64),
    crop: (u32, u32),
    ignore_index: u8,
    rng: &mut R,
) -> (RgbImage, LabelMap) {
    let s = if scale_range.1 > scale_range.0 {
        rng.random_range(scale_range.0..scale_range.1)
    } else {
        scale_range.0
    };
    let w = ((img.width() as f64 * s).round() as u32).max(1);
    let h = ((img.height() as f64 * s).round() as u32).max(1);
    let img = imageops::resize(img, w, h, FilterType::Triangle);
    let label = resize_label(label, w, h);
    let (cw, ch) = crop;
    let (pw, ph) = (w.max(cw), h.max(ch));
    let x0 = rng.random_range(0..=pw - cw);
    let y0 = rng.random_range(0..=ph - ch);
    let mut out_img = RgbImage::new(cw, ch);
    let mut out_label = LabelMap::filled(cw, ch, ignore_index);
    for y in 0..ch {
        let sy = y + y0;
        if sy >= h {
            break;
        }
        for x in 0..cw {
            let sx = x + x0;
            if sx >= w {
                break;
            }
            out_img.put_pixel(x, y, *img.get_pixel(sx, sy));
            out_label.data[(y * cw + x) as usize] = label.get(sx, sy);
        }
    }
    (out_img, out_label)
}

/// Horizontally mirrors an image.
pub fn hflip_image(img: &RgbImage) -> RgbImage {
    imageops::flip_horizontal(img)
}

/// Mirrors an image top to bottom.
pub fn vflip_image(img: &RgbImage) -> RgbImage {
    imageops::flip_vertical(img)
}

/// Swaps the rows and columns of an image.
pub fn transpose_image(img: &RgbImage) -> RgbImage {
    RgbImage::from_fn(img.height(), img.width(), |x, y| *img.get_pixel(y, x))
}

/// Converts to planar CHW f32, scaled to 0..1 and normalised per channel.
pub fn normalize(img: &RgbImage, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    let plane = img.width() as usize * img.height() as usize;
    let mut out = vec![0f32; 3 * plane];
    for (i, px) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (px[c] as f32 / 255.0 - mean[c]) / std[c];
        }
    }
    out
}

/// Fixed-point precision of Pillow's 8-bit resampling (`PRECISION_BITS` in `Resample.c`).
const PIL_PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's per-output-pixel window `(first input index, count)` and fixed-point weights for a
/// bilinear (triangle) filter resampling `in_size` to `out_size` (`precompute_coeffs` followed
/// by `normalize_coeffs_8bpc`).
fn pil_bilinear_coeffs(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i64>)> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    // The bilinear filter's support is 1, widened by the downscale factor (antialiasing).
    let support = filter_scale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C casts truncate toward zero, as `as i64` does.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let weights: Vec<f64> = (xmin..xmax)
                .map(|x| {
                    let t = ((x as f64 - center + 0.5) / filter_scale).abs();
                    if t < 1.0 {
                        1.0 - t
                    } else {
                        0.0
                    }
                })
                .collect();
            let total: f64 = weights.iter().sum();
            let fixed = weights
                .iter()
                .map(|w| {
                    let w = if total != 0.0 { w / total } else { *w };
                    let v = w * (1u64 << PIL_PRECISION_BITS) as f64;
                    (if v < 0.0 { v - 0.5 } else { v + 0.5 }) as i64
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

/// Rounds a fixed-point accumulator to a byte, as Pillow's `clip8`.
fn pil_clip8(acc: i64) -> u8 {
    (acc >> PIL_PRECISION_BITS).clamp(0, 255) as u8
}

/// One fixed-point resampling pass of an interleaved RGB buffer along one axis (Pillow's
/// `ImagingResampleHorizontal/Vertical_8bpc`), rounding to bytes.
fn pil_pass(src: &[u8], (w, h): (usize, usize), out_len: usize, horizontal: bool) -> Vec<u8> {
    let half = 1i64 << (PIL_PRECISION_BITS - 1);
    let coeffs = pil_bilinear_coeffs(if horizontal { w } else { h }, out_len);
    let (ow, oh) = if horizontal {
        (out_len, h)
    } else {
        (w, out_len)
    };
    let mut out = vec![0u8; ow * oh * 3];
    for y in 0..oh {
        for x in 0..ow {
            let (start, k) = &coeffs[if horizontal { x } else { y }];
            for c in 0..3 {
                let acc = k.iter().enumerate().fold(half, |acc, (i, wgt)| {
                    let (sx, sy) = if horizontal {
                        (start + i, y)
                    } else {
                        (x, start + i)
                    };
                    acc + src[(sy * w + sx) * 3 + c] as i64 * wgt
                });
                out[(y * ow + x) * 3 + c] = pil_clip8(acc);
            }
        }
    }
    out
}

/// Resizes exactly as Pillow's `Image.resize(size, BILINEAR)` (antialiased when shrinking): two
/// separable passes in 22-bit fixed point with rounding to bytes in between, an unchanged axis
/// skipped, and Pillow's rule for which axis goes first. torchvision's `Resize` on PIL images is
/// this function.
pub fn pil_resize_bilinear(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let (out_w, out_h) = (width as usize, height as usize);
    let (dw, dh) = (in_w as i64 - out_w as i64, in_h as i64 - out_h as i64);
    // Pillow resamples vertically first only when that axis shrinks much more.
    let horizontal_first = !(dh > 0 && dh > 2 * dw);
    let mut buf = img.as_raw().clone();
    let mut size = (in_w, in_h);
    for horizontal in [horizontal_first, !horizontal_first] {
        let (from, to) = if horizontal {
            (size.0, out_w)
        } else {
            (size.1, out_h)
        };
        if from != to {
            buf = pil_pass(&buf, size, to, horizontal);
            size = if horizontal {
                (to, size.1)
            } else {
                (size.0, to)
            };
        }
    }
    RgbImage::from_raw(width, height, buf)
        .unwrap_or_else(|| unreachable!("both axes resampled to the target size"))
}

/// Python's `round` (half to even), which torchvision's `center_crop` uses for offsets.
fn round_half_even(v: f64) -> i64 {
    let r = v.round();
    if (v - v.trunc()).abs() == 0.5 && (r as i64) % 2 != 0 {
        (r - v.signum()) as i64
    } else {
        r as i64
    }
}

/// torchvision's ImageNet evaluation preprocessing up to the tensor: `Resize(resize)` (shorter
/// side to `resize`, the longer truncated), then `CenterCrop(crop)`.
pub fn imagenet_eval_crop(img: &RgbImage, resize: u32, crop: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let (new_w, new_h) = if w <= h {
        (resize, (resize as u64 * h as u64 / w as u64) as u32)
    } else {
        ((resize as u64 * w as u64 / h as u64) as u32, resize)
    };
    let resized = pil_resize_bilinear(img, new_w, new_h);
    let top = round_half_even((new_h as f64 - crop as f64) / 2.0).max(0) as u32;
    let left = round_half_even((new_w as f64 - crop as f64) / 2.0).max(0) as u32;
    imageops::crop_imm(&resized, left, top, crop.min(new_w), crop.min(new_h)).to_image()
}
