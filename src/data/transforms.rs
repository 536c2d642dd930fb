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
