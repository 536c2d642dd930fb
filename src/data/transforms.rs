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

/// Rotates an image and its label map by `degrees` about the image centre, keeping the size
/// (mmseg `RandomRotate`, OpenCV's sign: positive turns the content counter-clockwise). The image
/// is sampled bilinearly with black outside it, the label map by nearest neighbour with
/// `ignore_index` outside it, so the uncovered corners carry no loss.
pub fn rotate(
    img: &RgbImage,
    label: &LabelMap,
    degrees: f64,
    ignore_index: u8,
) -> (RgbImage, LabelMap) {
    let (w, h) = img.dimensions();
    let (sin, cos) = degrees.to_radians().sin_cos();
    let (cx, cy) = (w as f64 / 2.0, h as f64 / 2.0);
    // Source point (continuous coordinates, pixel i spanning [i, i + 1]) of an output pixel centre.
    let source = |x: u32, y: u32| {
        let (dx, dy) = (x as f64 + 0.5 - cx, y as f64 + 0.5 - cy);
        (cos * dx - sin * dy + cx, sin * dx + cos * dy + cy)
    };
    let pixel = |x: i64, y: i64| {
        if (0..w as i64).contains(&x) && (0..h as i64).contains(&y) {
            img.get_pixel(x as u32, y as u32).0.map(f64::from)
        } else {
            [0.0; 3]
        }
    };
    let mut out_img = RgbImage::new(w, h);
    let mut out_label = LabelMap::filled(w, h, ignore_index);
    for y in 0..h {
        for x in 0..w {
            let (sx, sy) = source(x, y);
            let (u, v) = (sx - 0.5, sy - 0.5);
            let (x0, y0) = (u.floor(), v.floor());
            let (fx, fy) = (u - x0, v - y0);
            let (x0, y0) = (x0 as i64, y0 as i64);
            let corners = [
                (pixel(x0, y0), (1.0 - fx) * (1.0 - fy)),
                (pixel(x0 + 1, y0), fx * (1.0 - fy)),
                (pixel(x0, y0 + 1), (1.0 - fx) * fy),
                (pixel(x0 + 1, y0 + 1), fx * fy),
            ];
            let mut rgb = [0u8; 3];
            for (c, out) in rgb.iter_mut().enumerate() {
                let value: f64 = corners.iter().map(|(p, wgt)| p[c] * wgt).sum();
                *out = value.round().clamp(0.0, 255.0) as u8;
            }
            out_img.put_pixel(x, y, image::Rgb(rgb));
            let (nx, ny) = (sx.floor(), sy.floor());
            if nx >= 0.0 && ny >= 0.0 && nx < w as f64 && ny < h as f64 {
                out_label.data[(y * w + x) as usize] = label.get(nx as u32, ny as u32);
            }
        }
    }
    (out_img, out_label)
}

/// Random colour distortion of an image (mmseg `PhotoMetricDistortion`): each of brightness,
/// contrast, saturation and hue changes with probability 0.5, contrast before or after the
/// other colour changes at random.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Photometric {
    /// Largest brightness offset, in 0..255 pixel units.
    pub brightness_delta: f64,
    /// Contrast factor range.
    pub contrast_range: (f64, f64),
    /// Saturation factor range.
    pub saturation_range: (f64, f64),
    /// Largest hue shift in degrees (mmseg's 18 OpenCV units are 36°).
    pub hue_delta: f64,
}

impl Default for Photometric {
    fn default() -> Self {
        Photometric {
            brightness_delta: 32.0,
            contrast_range: (0.5, 1.5),
            saturation_range: (0.5, 1.5),
            hue_delta: 36.0,
        }
    }
}

impl Photometric {
    /// Checks the ranges; `key` names the table in errors.
    pub fn validate(&self, key: &str) -> crate::error::Result<()> {
        let bad = |field: &str, msg: String| {
            Err(crate::error::Error::config(format!("{key}.{field}"), msg))
        };
        if !(0.0..=255.0).contains(&self.brightness_delta) {
            return bad(
                "brightness_delta",
                format!("must be in [0, 255], got {}", self.brightness_delta),
            );
        }
        for (field, (lo, hi)) in [
            ("contrast_range", self.contrast_range),
            ("saturation_range", self.saturation_range),
        ] {
            if !(lo.is_finite() && hi.is_finite() && 0.0 <= lo && lo <= hi) {
                return bad(
                    field,
                    format!("[{lo}, {hi}] is not a range of non-negative factors"),
                );
            }
        }
        if !(0.0..=180.0).contains(&self.hue_delta) {
            return bad(
                "hue_delta",
                format!("must be in [0, 180] degrees, got {}", self.hue_delta),
            );
        }
        Ok(())
    }

    /// Draws the distortion for one image.
    pub fn draw<R: Rng>(&self, rng: &mut R) -> ColourChange {
        let coin = |rng: &mut R| rng.random_bool(0.5);
        let uniform = |rng: &mut R, (lo, hi): (f64, f64)| {
            if hi > lo {
                rng.random_range(lo..hi)
            } else {
                lo
            }
        };
        let brightness = if coin(rng) {
            uniform(rng, (-self.brightness_delta, self.brightness_delta))
        } else {
            0.0
        };
        let contrast_first = coin(rng);
        let contrast = if coin(rng) {
            uniform(rng, self.contrast_range)
        } else {
            1.0
        };
        let saturation = if coin(rng) {
            uniform(rng, self.saturation_range)
        } else {
            1.0
        };
        let hue = if coin(rng) {
            uniform(rng, (-self.hue_delta, self.hue_delta))
        } else {
            0.0
        };
        ColourChange {
            brightness,
            contrast,
            contrast_first,
            saturation,
            hue,
        }
    }
}

/// One drawn [`Photometric`] distortion.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ColourChange {
    /// Offset added to every channel (0..255 units).
    pub brightness: f64,
    /// Factor on every channel.
    pub contrast: f64,
    /// Whether contrast comes before saturation and hue (else after).
    pub contrast_first: bool,
    /// Factor on the HSV saturation (capped at 1).
    pub saturation: f64,
    /// Hue shift in degrees.
    pub hue: f64,
}

impl ColourChange {
    /// Applies the change, clipping to 0..255 after each step and rounding once at the end.
    pub fn apply(&self, img: &RgbImage) -> RgbImage {
        let clip = |v: f64| v.clamp(0.0, 255.0);
        let mut out = img.clone();
        for px in out.pixels_mut() {
            let mut rgb = px.0.map(|c| clip(c as f64 + self.brightness));
            if self.contrast_first {
                rgb = rgb.map(|c| clip(c * self.contrast));
            }
            if self.saturation != 1.0 || self.hue != 0.0 {
                let (h, s, v) = rgb_to_hsv(rgb);
                rgb = hsv_to_rgb(h + self.hue, (s * self.saturation).min(1.0), v);
            }
            if !self.contrast_first {
                rgb = rgb.map(|c| clip(c * self.contrast));
            }
            px.0 = rgb.map(|c| c.round() as u8);
        }
        out
    }
}

/// RGB (0..255) to hue in degrees, saturation and value (0..1).
fn rgb_to_hsv([r, g, b]: [f64; 3]) -> (f64, f64, f64) {
    let max = r.max(g).max(b);
    let range = max - r.min(g).min(b);
    if range == 0.0 {
        return (0.0, 0.0, max / 255.0);
    }
    let h = if max == r {
        60.0 * ((g - b) / range)
    } else if max == g {
        60.0 * ((b - r) / range + 2.0)
    } else {
        60.0 * ((r - g) / range + 4.0)
    };
    (h.rem_euclid(360.0), range / max, max / 255.0)
}

/// Hue in degrees, saturation and value (0..1) to RGB (0..255); the inverse of [`rgb_to_hsv`].
pub fn hsv_to_rgb(h: f64, s: f64, v: f64) -> [f64; 3] {
    let c = v * s;
    let hp = (h / 60.0).rem_euclid(6.0);
    let x = c * (1.0 - (hp % 2.0 - 1.0).abs());
    let (r, g, b) = match hp as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    [(r + m) * 255.0, (g + m) * 255.0, (b + m) * 255.0]
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
