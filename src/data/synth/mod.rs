//! Deterministic synthetic "shapes" dataset for object detection and semantic segmentation.
//!
//! Each sample is a `size`×`size` RGB image with 1–8 (configurable) coloured geometric
//! shapes of [`NUM_CLASSES`] classes ([`CLASS_NAMES`]: filled circle, square, triangle,
//! ellipse, cross and star, plus the outlined ring and frame), rotated where that matters,
//! on a textured, noisy background (gradient, low-frequency colour blobs, optional stripes,
//! per-pixel noise). Object colours are re-drawn until they contrast with what lies beneath.
//! Every sample carries per-object visible masks, pixel-exact COCO boxes and areas, and a
//! VOC-style semantic label map with an ignore band around object boundaries.
//!
//! Sizes scale with `size`. At 128 px about 59% of objects are COCO-small (< 32² pixels),
//! 36% medium and 5% large (>= 96²). Large objects need more than half the image, so they
//! are a dedicated variant of the compact classes (circle, square, thick frame) that keeps
//! at least (0.75·`size`)² pixels visible.
//!
//! Occlusion: objects are placed back to front, larger ones first, and later objects hide
//! earlier ones. A placement that would leave an earlier object with less than half of its
//! pixels (or fewer than 16) visible is re-drawn (and eventually shrunk) before anything is
//! painted, so no object is dropped after the fact: image, masks, boxes and label map always
//! describe exactly the same objects. An object that finds no valid spot at all is left out
//! entirely; even at 64 objects per image this is rarer than 1 image in 1000.
//!
//! A sample is a pure function of `(config, split, index)`, so loaders can fetch samples
//! randomly and in parallel and nothing has to be stored on disk.

use image::{GrayImage, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::f64::consts::{PI, TAU};

mod paint;
mod placement;
mod shapes;
#[cfg(test)]
mod tests;

use paint::*;
use placement::*;
use shapes::*;

/// Class names, index 0..K-1; label-map value = index + 1.
pub const CLASS_NAMES: [&str; 8] = [
    "circle", "square", "triangle", "ellipse", "cross", "star", "ring", "frame",
];
/// Number of object classes (background not included).
pub const NUM_CLASSES: usize = CLASS_NAMES.len();
/// Label-map value of pixels to leave out of the segmentation loss (boundary band).
pub const IGNORE_INDEX: u8 = 255;

// Size constants are expressed at this image size and scale linearly with `size`.
const REF_SIZE: f64 = 128.0;
// Square root of the target object area is log-uniform in this range (at REF_SIZE), which
// makes small objects most common, as in COCO.
const MIN_SQRT_AREA: f64 = 8.0;
const MAX_SQRT_AREA: f64 = 96.0;
// Smallest object extent (at REF_SIZE); smaller shapes would not be recognisable.
const MIN_EXTENT: f64 = 8.0;
// Absolute floor in pixels for both of the above at small image sizes.
const MIN_PX: f64 = 6.0;
// Largest unrotated extent of ordinary objects as a fraction of the image side.
const MAX_EXTENT_FRAC: f64 = 0.8;
// COCO-large needs >= 96² visible pixels, i.e. >= 56% of a 128² image, which only compact
// shapes spanning nearly the whole image reach. So circles, squares and (thick) frames
// are drawn as such a "large" object with this probability, keep at least
// (LARGE_SIDE_FRAC * size)² pixels visible, and give ~5% large objects at size 128.
const LARGE_PROB: f64 = 0.14;
const LARGE_EXTENT_FRAC: (f64, f64) = (0.86, 0.92);
const LARGE_SIDE_FRAC: f64 = 0.75;
// Occlusion limits: every object keeps at least this share of its pixels and this many.
const MIN_VISIBLE_FRAC: f64 = 0.5;
const MIN_VISIBLE_PX: usize = 16;
const PLACEMENT_ATTEMPTS: usize = 64;
// Object count up to which sizes are not reduced for crowding.
const UNCROWDED_OBJECTS: usize = 8;
const SHRINK: f64 = 0.9;
const RELAXED_ATTEMPTS: usize = 8;
const FREE_CENTRE_TRIES: usize = 16;
// Ordinary objects may stick out of the frame by up to ~20% of their extent per side.
const CENTER_MARGIN_FRAC: f64 = 0.3;
// Minimum RGB distance between an object's colour and the mean colour beneath it.
const MIN_CONTRAST: f64 = 100.0;
const COLOUR_ATTEMPTS: usize = 24;
// Config limits enforced by `SynthConfig::validate`.
const MIN_SIZE: u32 = 32;
const MAX_SIZE: u32 = 2048;
const MAX_OBJECTS: usize = 64;
const MIN_PIXELS_PER_OBJECT: usize = 256;
const MAX_BOUNDARY_WIDTH: u32 = 8;

/// Dataset split; each split is an independent stream of samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Split {
    /// Training split.
    Train,
    /// Validation split.
    Val,
}

impl Split {
    /// Lower-case split name: "train" or "val".
    pub fn name(&self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
        }
    }

    // Arbitrary distinct constants mixed into the seed so the splits never share samples.
    fn stream_tag(self) -> u64 {
        match self {
            Split::Train => 0x7472_6169_6e5f_7331,
            Split::Val => 0x7661_6c5f_5f5f_7332,
        }
    }
}

/// Generator settings; call [`SynthConfig::validate`] before use.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SynthConfig {
    /// Image side in pixels (square images), 32..=2048.
    pub size: u32,
    /// Dataset seed; together with split and index it determines every sample.
    pub seed: u64,
    /// Minimum number of objects per image (>= 1).
    pub min_objects: usize,
    /// Maximum number of objects per image (<= 64 and <= size²/256).
    pub max_objects: usize,
    /// Width in pixels of the ignore band around object boundaries (0 disables it), <= 8.
    pub boundary_width: u32,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            size: 128,
            seed: 0,
            min_objects: 1,
            max_objects: 8,
            boundary_width: 1,
        }
    }
}

impl SynthConfig {
    /// Check every field is in its supported range.
    pub fn validate(&self) -> Result<(), String> {
        if !(MIN_SIZE..=MAX_SIZE).contains(&self.size) {
            return Err(format!(
                "synth size must be in [{MIN_SIZE}, {MAX_SIZE}], got {}",
                self.size
            ));
        }
        if self.min_objects < 1 {
            return Err("synth min_objects must be at least 1".to_string());
        }
        if self.min_objects > self.max_objects {
            return Err(format!(
                "synth min_objects ({}) must not exceed max_objects ({})",
                self.min_objects, self.max_objects
            ));
        }
        if self.max_objects > MAX_OBJECTS {
            return Err(format!(
                "synth max_objects must be at most {MAX_OBJECTS}, got {}",
                self.max_objects
            ));
        }
        // Without room per object, placements fail the occlusion limits and get skipped.
        let room = self.size as usize * self.size as usize / MIN_PIXELS_PER_OBJECT;
        if self.max_objects > room {
            return Err(format!(
                "synth max_objects ({}) too many for size {} (at most {room})",
                self.max_objects, self.size
            ));
        }
        if self.boundary_width > MAX_BOUNDARY_WIDTH {
            return Err(format!(
                "synth boundary_width must be at most {MAX_BOUNDARY_WIDTH}, got {}",
                self.boundary_width
            ));
        }
        Ok(())
    }

    // Nearest config that passes `validate` (identity for valid configs), so that
    // `generate` never panics on unchecked input.
    fn clamped(&self) -> Self {
        let size = self.size.clamp(MIN_SIZE, MAX_SIZE);
        let room = size as usize * size as usize / MIN_PIXELS_PER_OBJECT;
        let max_objects = self.max_objects.clamp(1, MAX_OBJECTS.min(room));
        Self {
            size,
            seed: self.seed,
            min_objects: self.min_objects.clamp(1, max_objects),
            max_objects,
            boundary_width: self.boundary_width.min(MAX_BOUNDARY_WIDTH),
        }
    }
}

/// One object as it is visible in the final image (after occlusion by later objects).
#[derive(Debug, Clone)]
pub struct SynthObject {
    /// 0-based class index into [`CLASS_NAMES`].
    pub class: usize,
    /// COCO `[x, y, w, h]` tight box of the visible mask pixels (pixel-exact).
    pub bbox: [f64; 4],
    /// Row-major `size*size` mask, 1 where this object is visible in the final image.
    pub mask: Vec<u8>,
    /// Number of visible mask pixels.
    pub area: u64,
}

/// One generated image with its detection and segmentation targets.
#[derive(Debug, Clone)]
pub struct SynthSample {
    /// The RGB image.
    pub image: image::RgbImage,
    /// Visible objects in drawing order (back to front).
    pub objects: Vec<SynthObject>,
    /// Semantic map: 0 background, class+1 on objects, [`IGNORE_INDEX`] on boundary bands.
    pub label: image::GrayImage,
}

/// Generate sample `index` of `split`; a pure function of (config, split, index) so loaders can access samples randomly and in parallel.
///
/// Expects a config that passes [`SynthConfig::validate`]; out-of-range fields are clamped
/// into range rather than causing a panic.
pub fn generate(cfg: &SynthConfig, split: Split, index: usize) -> SynthSample {
    let cfg = cfg.clamped();
    let size = cfg.size as usize;
    let mut rng = sample_rng(cfg.seed, split, index);

    let count = rng.random_range(cfg.min_objects..=cfg.max_objects);
    let mut specs: Vec<Spec> = (0..count)
        .map(|_| Spec::sample(&mut rng, size as f64, count))
        .collect();
    // Big objects at the back, so small ones on top of them rarely violate the occlusion limit.
    specs.sort_by(|a, b| b.nominal_area().total_cmp(&a.nominal_area()));
    let (placed, owner) = place_objects(&mut rng, &specs, size);

    let mut canvas = background(&mut rng, size);
    for (k, obj) in placed.iter().enumerate() {
        paint_object(&mut rng, &mut canvas, size, obj, &owner, k + 1);
    }
    let image = quantize_with_noise(&mut rng, &canvas, cfg.size);

    let classes: Vec<usize> = placed.iter().map(|p| p.shape.class()).collect();
    let label = label_map(&owner, &classes, cfg.size, cfg.boundary_width as usize);
    let objects = visible_objects(&owner, &classes, size);
    SynthSample {
        image,
        objects,
        label,
    }
}

// Nearby (seed, split, index) triples must give unrelated streams.
fn sample_rng(seed: u64, split: Split, index: usize) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(super::derive_seed(&[
        seed,
        split.stream_tag(),
        index as u64,
    ]))
}
