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

// Shapes live in local coordinates (u, v) in [-1, 1]², scaled by the half extent in
// pixels and rotated about the centre.
#[derive(Debug, Clone, Copy)]
enum Shape {
    Circle,
    Square,
    // Isosceles: apex at v = -1, base at v = 1 spanning u in [-half_base, half_base].
    Triangle { half_base: f64 },
    // Semi-axes 1 (along u) and `ratio` (along v).
    Ellipse { ratio: f64 },
    // Two bars of half-thickness `half_width` crossing at the centre.
    Cross { half_width: f64 },
    // Five points at radius 1, notches at radius `inner`.
    Star { inner: f64 },
    // Annulus between radius `inner` and 1.
    Ring { inner: f64 },
    // Square outline: Chebyshev radius between `inner` and 1.
    Frame { inner: f64 },
}

impl Shape {
    fn sample(rng: &mut ChaCha8Rng) -> Self {
        match rng.random_range(0..NUM_CLASSES) {
            0 => Shape::Circle,
            1 => Shape::Square,
            2 => Shape::Triangle {
                half_base: rng.random_range(0.6..=1.0),
            },
            3 => Shape::Ellipse {
                ratio: rng.random_range(0.4..=0.8),
            },
            4 => Shape::Cross {
                half_width: rng.random_range(0.22..=0.4),
            },
            5 => Shape::Star {
                inner: rng.random_range(0.38..=0.55),
            },
            6 => Shape::Ring {
                inner: rng.random_range(0.45..=0.72),
            },
            _ => Shape::Frame {
                inner: rng.random_range(0.45..=0.75),
            },
        }
    }

    fn class(&self) -> usize {
        match self {
            Shape::Circle => 0,
            Shape::Square => 1,
            Shape::Triangle { .. } => 2,
            Shape::Ellipse { .. } => 3,
            Shape::Cross { .. } => 4,
            Shape::Star { .. } => 5,
            Shape::Ring { .. } => 6,
            Shape::Frame { .. } => 7,
        }
    }

    // Shape area as a fraction of the [-1, 1]² box, to turn a target area into an extent.
    fn fill(&self) -> f64 {
        match *self {
            Shape::Circle => PI / 4.0,
            Shape::Square => 1.0,
            Shape::Triangle { half_base } => half_base / 2.0,
            Shape::Ellipse { ratio } => PI * ratio / 4.0,
            Shape::Cross { half_width } => 2.0 * half_width - half_width * half_width,
            Shape::Star { inner } => 5.0 * inner * (TAU / 10.0).sin() / 4.0,
            Shape::Ring { inner } => PI / 4.0 * (1.0 - inner * inner),
            Shape::Frame { inner } => 1.0 - inner * inner,
        }
    }

    // Classes compact enough to reach the COCO-large area inside the frame.
    fn can_be_large(&self) -> bool {
        matches!(self, Shape::Circle | Shape::Square | Shape::Frame { .. })
    }

    // Thicker frame border for large instances, so they have enough area to be COCO-large.
    fn thickened(self) -> Self {
        match self {
            Shape::Frame { inner } => Shape::Frame { inner: inner * 0.6 },
            other => other,
        }
    }

    // Circles and rings look the same at any angle; skip the rotation draw for them.
    fn rotates(&self) -> bool {
        !matches!(self, Shape::Circle | Shape::Ring { .. })
    }

    // Keep outlines ~2 px and bars ~3 px thick so small instances survive rasterisation.
    fn with_min_thickness(self, half_px: f64) -> Self {
        match self {
            Shape::Cross { half_width } => Shape::Cross {
                half_width: half_width.max((1.5 / half_px).min(0.6)),
            },
            Shape::Ring { inner } => Shape::Ring {
                inner: inner.min(1.0 - 2.0 / half_px).max(0.0),
            },
            Shape::Frame { inner } => Shape::Frame {
                inner: inner.min(1.0 - 2.0 / half_px).max(0.0),
            },
            other => other,
        }
    }

    fn contains(&self, u: f64, v: f64) -> bool {
        let r2 = u * u + v * v;
        match *self {
            Shape::Circle => r2 <= 1.0,
            Shape::Square => u.abs() <= 1.0 && v.abs() <= 1.0,
            Shape::Triangle { half_base } => v <= 1.0 && u.abs() <= half_base * (v + 1.0) / 2.0,
            Shape::Ellipse { ratio } => u * u + (v / ratio) * (v / ratio) <= 1.0,
            Shape::Cross { half_width } => {
                u.abs() <= 1.0 && v.abs() <= 1.0 && (u.abs() <= half_width || v.abs() <= half_width)
            }
            Shape::Star { inner } => {
                if r2 > 1.0 {
                    return false;
                }
                // Rotate the point onto the nearest tip (at 0°) and mirror it into the upper
                // half, then test it against the edge from that tip to the notch at 36°.
                let k = (v.atan2(u) / (TAU / 5.0)).round() as i32;
                let (c, s) = STAR_TIPS[k.rem_euclid(5) as usize];
                let qx = u * c + v * s;
                let qy = (v * c - u * s).abs();
                let (bx, by) = (inner * COS_36, inner * SIN_36);
                (bx - 1.0) * qy - by * (qx - 1.0) >= 0.0
            }
            Shape::Ring { inner } => r2 <= 1.0 && r2 >= inner * inner,
            Shape::Frame { inner } => {
                let m = u.abs().max(v.abs());
                m <= 1.0 && m > inner
            }
        }
    }
}

// (cos, sin) of the star's tip directions k * 72°, and of the notch direction 36°.
const STAR_TIPS: [(f64, f64); 5] = [
    (1.0, 0.0),
    (0.309_016_994_374_947_45, 0.951_056_516_295_153_5),
    (-0.809_016_994_374_947_3, 0.587_785_252_292_473_2),
    (-0.809_016_994_374_947_3, -0.587_785_252_292_473_2),
    (0.309_016_994_374_947_45, -0.951_056_516_295_153_5),
];
const COS_36: f64 = 0.809_016_994_374_947_5;
const SIN_36: f64 = 0.587_785_252_292_473_1;

// An object's shape and size before it is given a position.
#[derive(Clone, Copy)]
struct Spec {
    shape: Shape,
    half: f64,
    large: bool,
}

impl Spec {
    fn sample(rng: &mut ChaCha8Rng, size: f64, count: usize) -> Self {
        let scale = size / REF_SIZE;
        // Sizes scale with the image, so crowding depends on the count alone. Beyond the
        // default maximum, shrink the size range (and skip large objects) so that crowded
        // images keep roughly the default total object area and fit all their objects.
        let crowded = count > UNCROWDED_OBJECTS;
        let crowding = (UNCROWDED_OBJECTS as f64 / count as f64).sqrt().min(1.0);
        let shape = Shape::sample(rng);
        if !crowded && shape.can_be_large() && rng.random_bool(LARGE_PROB) {
            let (lo, hi) = LARGE_EXTENT_FRAC;
            return Self {
                shape: shape.thickened(),
                half: rng.random_range(lo..=hi) * size / 2.0,
                large: true,
            };
        }
        let hi = (MAX_SQRT_AREA * scale * crowding).ln();
        let lo = (MIN_SQRT_AREA * scale).max(MIN_PX).ln().min(hi);
        let sqrt_area = rng.random_range(lo..=hi).exp();
        // max/min rather than clamp: never panics, even if the bounds were to cross.
        let extent = (sqrt_area / shape.fill().sqrt())
            .max(min_extent(shape, size))
            .min(MAX_EXTENT_FRAC * size);
        let half = extent / 2.0;
        Self {
            shape: shape.with_min_thickness(half),
            half,
            large: false,
        }
    }

    fn nominal_area(&self) -> f64 {
        self.shape.fill() * 4.0 * self.half * self.half
    }
}

// Smallest extent for `shape`: recognisable, and with about twice the pixels an object
// must keep visible, so that even the smallest instance can be placed.
fn min_extent(shape: Shape, size: f64) -> f64 {
    let enough_pixels = (2.0 * MIN_VISIBLE_PX as f64 / shape.fill()).sqrt();
    (MIN_EXTENT * size / REF_SIZE)
        .max(MIN_PX)
        .max(enough_pixels)
}

// A positioned object and the in-frame pixels (row-major indices) its shape covers.
struct Placed {
    shape: Shape,
    large: bool,
    cx: f64,
    cy: f64,
    half: f64,
    pixels: Vec<u32>,
}

// A spec rasterised once at a fixed angle and sub-pixel phase, as pixel offsets from the
// integer part of the centre, so retried placements only translate it.
struct Template {
    frac: (f64, f64),
    offsets: Vec<(i32, i32)>,
}

impl Template {
    fn new(rng: &mut ChaCha8Rng, spec: &Spec) -> Self {
        let frac = (rng.random_range(0.0..1.0), rng.random_range(0.0..1.0));
        let angle = if spec.shape.rotates() {
            rng.random_range(0.0..TAU)
        } else {
            0.0
        };
        let (sin, cos) = angle.sin_cos();
        // Half-size of the axis-aligned box around the rotated [-half, half]² square.
        let reach = (spec.half * (cos.abs() + sin.abs())).ceil() as i32 + 1;
        let inv = 1.0 / spec.half;
        let mut offsets = Vec::new();
        for oy in -reach..=reach {
            let dy = oy as f64 + 0.5 - frac.1;
            for ox in -reach..=reach {
                let dx = ox as f64 + 0.5 - frac.0;
                let u = (cos * dx + sin * dy) * inv;
                let v = (cos * dy - sin * dx) * inv;
                if spec.shape.contains(u, v) {
                    offsets.push((ox, oy));
                }
            }
        }
        Self { frac, offsets }
    }

    // With `free`, prefer a centre on a background pixel of that owner map.
    fn place(&self, rng: &mut ChaCha8Rng, spec: &Spec, size: usize, free: Option<&[u8]>) -> Placed {
        let side = size as f64;
        // Large objects stay inside the frame (up to rotated corners) to keep their area.
        let frac = if spec.large { 0.5 } else { CENTER_MARGIN_FRAC };
        let margin = (frac * 2.0 * spec.half).min(side / 2.0);
        let lo = margin.floor() as i32;
        let hi = ((side - margin).floor() as i32).clamp(lo, size as i32 - 1);
        let mut centre = (rng.random_range(lo..=hi), rng.random_range(lo..=hi));
        if let Some(owner) = free {
            for _ in 0..FREE_CENTRE_TRIES {
                if owner[centre.1 as usize * size + centre.0 as usize] == 0 {
                    break;
                }
                centre = (rng.random_range(lo..=hi), rng.random_range(lo..=hi));
            }
        }
        let (ix, iy) = centre;
        let pixels = self
            .offsets
            .iter()
            .map(|&(ox, oy)| (ix + ox, iy + oy))
            .filter(|&(x, y)| x >= 0 && y >= 0 && x < size as i32 && y < size as i32)
            .map(|(x, y)| (y as usize * size + x as usize) as u32)
            .collect();
        Placed {
            shape: spec.shape,
            large: spec.large,
            cx: ix as f64 + self.frac.0,
            cy: iy as f64 + self.frac.1,
            half: spec.half,
            pixels,
        }
    }
}

// Fewest pixels of `obj` that must stay visible under later objects; `keep_large` also
// keeps large objects COCO-large.
fn min_visible(obj: &Placed, size: usize, keep_large: bool) -> usize {
    let own = obj.pixels.len();
    let share = (own as f64 * MIN_VISIBLE_FRAC).ceil() as usize;
    let large_px = if keep_large && obj.large {
        let side = LARGE_SIDE_FRAC * size as f64;
        ((side * side).ceil() as usize).min(own)
    } else {
        0
    };
    MIN_VISIBLE_PX.max(share).max(large_px)
}

// Place objects back to front, re-drawing positions that would hide too much of an
// earlier object. Returns the kept objects and the owner map (0 = background, k + 1 =
// object k visible). An object that finds no valid position is left out entirely.
fn place_objects(rng: &mut ChaCha8Rng, specs: &[Spec], size: usize) -> (Vec<Placed>, Vec<u8>) {
    let mut owner = vec![0u8; size * size];
    let mut kept: Vec<Placed> = Vec::with_capacity(specs.len());
    let mut visible: Vec<usize> = Vec::with_capacity(specs.len());
    let mut lost = vec![0usize; specs.len() + 1];
    for &spec in specs {
        let mut spec = spec;
        let min_half = min_extent(spec.shape, size as f64) / 2.0;
        let mut template = Template::new(rng, &spec);
        for attempt in 0..PLACEMENT_ATTEMPTS {
            // Crowded image: after half the attempts, shrink the object a little each time;
            // in the last few, let it eat into large objects below to keep the count.
            if attempt >= PLACEMENT_ATTEMPTS / 2 {
                spec.half = (spec.half * SHRINK).max(min_half);
                spec.large = false;
                template = Template::new(rng, &spec);
            }
            let relaxed = attempt >= PLACEMENT_ATTEMPTS - RELAXED_ATTEMPTS;
            let free = (attempt >= PLACEMENT_ATTEMPTS / 2).then_some(owner.as_slice());
            let candidate = template.place(rng, &spec, size, free);
            if candidate.pixels.len() < MIN_VISIBLE_PX {
                continue;
            }
            lost.fill(0);
            for &p in &candidate.pixels {
                lost[owner[p as usize] as usize] += 1;
            }
            // Only objects the candidate overlaps are checked: one already eaten into by a
            // relaxed placement may sit below its large-object limit.
            let fits = kept
                .iter()
                .zip(&visible)
                .enumerate()
                .all(|(k, (obj, &vis))| {
                    lost[k + 1] == 0 || vis - lost[k + 1] >= min_visible(obj, size, !relaxed)
                });
            if fits {
                // Owner ids fit in u8: validate caps the object count at 64.
                let id = (kept.len() + 1) as u8;
                for &p in &candidate.pixels {
                    owner[p as usize] = id;
                }
                for (k, vis) in visible.iter_mut().enumerate() {
                    *vis -= lost[k + 1];
                }
                visible.push(candidate.pixels.len());
                kept.push(candidate);
                break;
            }
        }
    }
    (kept, owner)
}

fn hsv_to_rgb(h: f64, s: f64, v: f64) -> [f64; 3] {
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

// Smooth lattice noise: random values on a coarse grid, smoothstep-interpolated.
struct ValueNoise {
    cells: usize,
    grid: Vec<f64>,
}

impl ValueNoise {
    fn new(rng: &mut ChaCha8Rng, cells: usize) -> Self {
        let grid = (0..(cells + 1) * (cells + 1))
            .map(|_| rng.random_range(-1.0..=1.0))
            .collect();
        Self { cells, grid }
    }

    // Lattice cell and smoothed fraction for a coordinate in [0, 1].
    fn axis(&self, t: f64) -> (usize, f64) {
        let f = t * self.cells as f64;
        let i = (f.floor() as usize).min(self.cells - 1);
        let fr = f - i as f64;
        (i, fr * fr * (3.0 - 2.0 * fr))
    }

    fn at(&self, (ix, tx): (usize, f64), (iy, ty): (usize, f64)) -> f64 {
        let n = self.cells + 1;
        let g = |x: usize, y: usize| self.grid[y * n + x];
        let top = g(ix, iy) + (g(ix + 1, iy) - g(ix, iy)) * tx;
        let bottom = g(ix, iy + 1) + (g(ix + 1, iy + 1) - g(ix, iy + 1)) * tx;
        top + (bottom - top) * ty
    }
}

// Textured background as linear RGB floats (3 per pixel): gradient between two muted
// colours, low-frequency colour blobs and, in half the images, luminance stripes.
fn background(rng: &mut ChaCha8Rng, size: usize) -> Vec<f64> {
    let side = size as f64;
    let c0 = hsv_to_rgb(
        rng.random_range(0.0..360.0),
        rng.random_range(0.0..0.5),
        rng.random_range(0.25..0.85),
    );
    let c1: [f64; 3] = std::array::from_fn(|i| c0[i] + rng.random_range(-70.0..70.0));
    let (gs, gc) = rng.random_range(0.0..TAU).sin_cos();
    let blob_amp = rng.random_range(10.0..40.0);
    let cells = rng.random_range(2..=5);
    let blobs: [ValueNoise; 3] = std::array::from_fn(|_| ValueNoise::new(rng, cells));
    let stripes = rng.random_bool(0.5).then(|| {
        let (s, c) = rng.random_range(0.0..TAU).sin_cos();
        let wavenumber = TAU / (rng.random_range(6.0..40.0) * side / REF_SIZE);
        let amp = rng.random_range(6.0..24.0);
        let phase = rng.random_range(0.0..TAU);
        (s * wavenumber, c * wavenumber, amp, phase)
    });

    let xs: Vec<(usize, f64)> = (0..size)
        .map(|x| blobs[0].axis((x as f64 + 0.5) / side))
        .collect();
    let mut stripe_row = vec![0.0; size];
    let mut out = vec![0.0; size * size * 3];
    for y in 0..size {
        let fy = y as f64 + 0.5;
        let ya = blobs[0].axis(fy / side);
        if let Some((ky, kx, amp, phase)) = stripes {
            // The phase is linear along a row: step a unit phasor instead of calling sin().
            let (step_s, step_c) = kx.sin_cos();
            let (mut ps, mut pc) = (0.5 * kx + fy * ky + phase).sin_cos();
            for v in stripe_row.iter_mut() {
                *v = amp * ps;
                (ps, pc) = (ps * step_c + pc * step_s, pc * step_c - ps * step_s);
            }
        }
        for (x, (&xa, &stripe)) in xs.iter().zip(&stripe_row).enumerate() {
            let fx = x as f64 + 0.5;
            let t =
                (0.5 + ((fx - side / 2.0) * gc + (fy - side / 2.0) * gs) / side).clamp(0.0, 1.0);
            let px = &mut out[(y * size + x) * 3..][..3];
            for (i, v) in px.iter_mut().enumerate() {
                *v = c0[i] + (c1[i] - c0[i]) * t + blob_amp * blobs[i].at(xa, ya) + stripe;
            }
        }
    }
    out
}

fn random_colour(rng: &mut ChaCha8Rng) -> [f64; 3] {
    hsv_to_rgb(
        rng.random_range(0.0..360.0),
        rng.random_range(0.35..=1.0),
        rng.random_range(0.3..=1.0),
    )
}

// Paint the visible pixels of object `id` with a contrasting colour and a linear shading
// ramp, so objects are not perfectly flat.
fn paint_object(
    rng: &mut ChaCha8Rng,
    canvas: &mut [f64],
    size: usize,
    obj: &Placed,
    owner: &[u8],
    id: usize,
) {
    let visible: Vec<usize> = obj
        .pixels
        .iter()
        .map(|&p| p as usize)
        .filter(|&p| owner[p] as usize == id)
        .collect();
    let mut mean = [0.0; 3];
    for &p in &visible {
        for (m, v) in mean.iter_mut().zip(&canvas[p * 3..p * 3 + 3]) {
            *m += v;
        }
    }
    let n = visible.len().max(1) as f64;
    let mean = mean.map(|m| m / n);
    let dist = |c: &[f64; 3]| {
        c.iter()
            .zip(&mean)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f64>()
            .sqrt()
    };
    // Re-draw until the colour stands out against what lies beneath; keep the best try.
    let mut colour = random_colour(rng);
    for _ in 1..COLOUR_ATTEMPTS {
        if dist(&colour) >= MIN_CONTRAST {
            break;
        }
        let other = random_colour(rng);
        if dist(&other) > dist(&colour) {
            colour = other;
        }
    }
    let (ss, sc) = rng.random_range(0.0..TAU).sin_cos();
    let shade = rng.random_range(0.0..30.0) / obj.half;
    for &p in &visible {
        let dx = (p % size) as f64 + 0.5 - obj.cx;
        let dy = (p / size) as f64 + 0.5 - obj.cy;
        let ramp = shade * (dx * sc + dy * ss);
        for (v, c) in canvas[p * 3..p * 3 + 3].iter_mut().zip(&colour) {
            *v = c + ramp;
        }
    }
}

// Add uniform per-pixel noise of a per-image strength and round to 8-bit RGB.
fn quantize_with_noise(rng: &mut ChaCha8Rng, canvas: &[f64], size: u32) -> RgbImage {
    let amp = rng.random_range(3.0..14.0) / 128.0;
    let mut image = RgbImage::new(size, size);
    for (dst, src) in image.chunks_exact_mut(3).zip(canvas.chunks_exact(3)) {
        // One 32-bit draw supplies the noise bytes of all three channels.
        let bytes = rng.random::<u32>().to_le_bytes();
        for ((d, s), b) in dst.iter_mut().zip(src).zip(bytes) {
            // Truncating a value in [0.5, 256) rounds to nearest without a libm call.
            *d = (s + (b as f64 - 127.5) * amp + 0.5).clamp(0.5, 255.5) as u8;
        }
    }
    image
}

// Semantic map from the owner map. The ignore band lies on the outer side of each
// boundary: a pixel is ignored when an object drawn above it (background counts as
// lowest) lies within `width` pixels (Chebyshev distance). Every visible object pixel that
// is not next to an occluder therefore keeps its class, which matters for thin outlines.
fn label_map(owner: &[u8], classes: &[usize], size: u32, width: usize) -> GrayImage {
    let n = size as usize;
    let mut label = GrayImage::new(size, size);
    let buf: &mut [u8] = &mut label;
    for (l, &o) in buf.iter_mut().zip(owner) {
        *l = if o == 0 {
            0
        } else {
            classes[o as usize - 1] as u8 + 1
        };
    }
    if width == 0 {
        return label;
    }
    // Separable max filter over a (2w+1)² window: rows first, then columns.
    let mut rows = vec![0u8; n * n];
    for y in 0..n {
        let line = &owner[y * n..(y + 1) * n];
        for x in 0..n {
            rows[y * n + x] = line[x.saturating_sub(width)..(x + width + 1).min(n)]
                .iter()
                .copied()
                .max()
                .unwrap_or(0);
        }
    }
    for y in 0..n {
        for x in 0..n {
            let above = (y.saturating_sub(width)..(y + width + 1).min(n))
                .map(|yy| rows[yy * n + x])
                .max()
                .unwrap_or(0);
            if above > owner[y * n + x] {
                buf[y * n + x] = IGNORE_INDEX;
            }
        }
    }
    label
}

// Masks, pixel-exact boxes and areas of the kept objects, read from the owner map.
fn visible_objects(owner: &[u8], classes: &[usize], size: usize) -> Vec<SynthObject> {
    let mut objects: Vec<SynthObject> = classes
        .iter()
        .map(|&class| SynthObject {
            class,
            bbox: [0.0; 4],
            mask: vec![0; size * size],
            area: 0,
        })
        .collect();
    // Per object: min x, min y, max x, max y.
    let mut bounds = vec![[usize::MAX, usize::MAX, 0, 0]; classes.len()];
    for (p, &o) in owner.iter().enumerate() {
        if o == 0 {
            continue;
        }
        let k = o as usize - 1;
        let (x, y) = (p % size, p / size);
        let b = &mut bounds[k];
        *b = [b[0].min(x), b[1].min(y), b[2].max(x), b[3].max(y)];
        objects[k].mask[p] = 1;
        objects[k].area += 1;
    }
    for (obj, b) in objects.iter_mut().zip(&bounds) {
        // Placement guarantees at least MIN_VISIBLE_PX visible pixels, so bounds are set.
        obj.bbox = [
            b[0] as f64,
            b[1] as f64,
            (b[2] - b[0] + 1) as f64,
            (b[3] - b[1] + 1) as f64,
        ];
    }
    objects
}

#[cfg(test)]
mod tests {
    use super::*;

    // COCO area ranges: small < 32², medium < 96², large otherwise.
    fn area_range(area: u64) -> usize {
        match area {
            a if a < 32 * 32 => 0,
            a if a < 96 * 96 => 1,
            _ => 2,
        }
    }

    fn assert_identical(a: &SynthSample, b: &SynthSample) {
        assert_eq!(a.image.as_raw(), b.image.as_raw());
        assert_eq!(a.label.as_raw(), b.label.as_raw());
        assert_eq!(a.objects.len(), b.objects.len());
        for (x, y) in a.objects.iter().zip(&b.objects) {
            assert_eq!(x.class, y.class);
            assert_eq!(x.bbox, y.bbox);
            assert_eq!(x.area, y.area);
            assert_eq!(x.mask, y.mask);
        }
    }

    // Owner map rebuilt from the public masks: 0 background, k + 1 where object k is visible.
    fn owner_from_masks(sample: &SynthSample, n: usize) -> Vec<usize> {
        let mut owner = vec![0; n * n];
        for (k, obj) in sample.objects.iter().enumerate() {
            for (o, &m) in owner.iter_mut().zip(&obj.mask) {
                if m == 1 {
                    assert_eq!(*o, 0, "masks overlap");
                    *o = k + 1;
                }
            }
        }
        owner
    }

    #[test]
    fn default_config_is_valid() {
        assert_eq!(SynthConfig::default().validate(), Ok(()));
    }

    #[test]
    fn validate_rejects_bad_configs() {
        let base = SynthConfig::default();
        let bad = [
            SynthConfig {
                size: 31,
                ..base.clone()
            },
            SynthConfig {
                size: 4096,
                ..base.clone()
            },
            SynthConfig {
                min_objects: 0,
                ..base.clone()
            },
            SynthConfig {
                min_objects: 5,
                max_objects: 4,
                ..base.clone()
            },
            SynthConfig {
                min_objects: 1,
                max_objects: 65,
                size: 512,
                ..base.clone()
            },
            SynthConfig {
                size: 32,
                max_objects: 5,
                ..base.clone()
            },
            SynthConfig {
                boundary_width: 9,
                ..base.clone()
            },
        ];
        for cfg in &bad {
            assert!(cfg.validate().is_err(), "accepted {cfg:?}");
        }
        let good = [
            SynthConfig {
                size: 32,
                max_objects: 4,
                ..base.clone()
            },
            SynthConfig {
                size: 2048,
                min_objects: 64,
                max_objects: 64,
                ..base.clone()
            },
            SynthConfig {
                boundary_width: 0,
                ..base.clone()
            },
            SynthConfig {
                boundary_width: 8,
                seed: u64::MAX,
                ..base.clone()
            },
        ];
        for cfg in &good {
            assert_eq!(cfg.validate(), Ok(()), "rejected {cfg:?}");
            assert_eq!(&cfg.clamped(), cfg);
        }
    }

    #[test]
    fn invalid_configs_are_clamped_not_panicking() {
        let cfg = SynthConfig {
            size: 0,
            seed: 1,
            min_objects: 9,
            max_objects: 0,
            boundary_width: 100,
        };
        assert_eq!(cfg.clamped().validate(), Ok(()));
        let sample = generate(&cfg, Split::Train, 0);
        assert_eq!(sample.image.dimensions(), (MIN_SIZE, MIN_SIZE));
        assert_eq!(sample.objects.len(), 1);
    }

    #[test]
    fn split_names() {
        assert_eq!(Split::Train.name(), "train");
        assert_eq!(Split::Val.name(), "val");
    }

    #[test]
    fn generation_is_deterministic() {
        let cfg = SynthConfig::default();
        for (split, index) in [(Split::Train, 0), (Split::Train, 17), (Split::Val, 3)] {
            assert_identical(&generate(&cfg, split, index), &generate(&cfg, split, index));
        }
        // Order of generation must not matter (no hidden shared state).
        let later = generate(&cfg, Split::Val, 3);
        let _ = generate(&cfg, Split::Train, 99);
        assert_identical(&later, &generate(&cfg, Split::Val, 3));
    }

    #[test]
    fn different_inputs_give_different_samples() {
        let cfg = SynthConfig::default();
        let base = generate(&cfg, Split::Train, 5);
        let other_seed = SynthConfig {
            seed: 1,
            ..cfg.clone()
        };
        for other in [
            generate(&cfg, Split::Train, 6),
            generate(&cfg, Split::Val, 5),
            generate(&other_seed, Split::Train, 5),
        ] {
            assert_ne!(base.image.as_raw(), other.image.as_raw());
            assert_ne!(base.label.as_raw(), other.label.as_raw());
        }
    }

    #[test]
    fn object_count_in_range() {
        let base = SynthConfig::default();
        let configs = [
            base.clone(),
            SynthConfig {
                min_objects: 3,
                max_objects: 3,
                ..base.clone()
            },
            SynthConfig {
                min_objects: 8,
                max_objects: 8,
                ..base.clone()
            },
            SynthConfig {
                size: 32,
                min_objects: 2,
                max_objects: 4,
                ..base.clone()
            },
            SynthConfig {
                size: 64,
                min_objects: 4,
                max_objects: 16,
                ..base.clone()
            },
        ];
        for cfg in &configs {
            let mut seen = vec![false; cfg.max_objects + 1];
            for index in 0..60 {
                let n = generate(cfg, Split::Train, index).objects.len();
                assert!(
                    (cfg.min_objects..=cfg.max_objects).contains(&n),
                    "{n} objects for {cfg:?} index {index}"
                );
                seen[n] = true;
            }
            assert!(seen[cfg.min_objects] && seen[cfg.max_objects], "{cfg:?}");
        }
        // The densest valid setting still fits every object.
        let dense = SynthConfig {
            min_objects: 64,
            max_objects: 64,
            ..base
        };
        for index in 0..20 {
            assert_eq!(generate(&dense, Split::Val, index).objects.len(), 64);
        }
    }

    #[test]
    fn masks_boxes_and_areas_agree() {
        let base = SynthConfig::default();
        for cfg in [
            base.clone(),
            SynthConfig {
                size: 96,
                seed: 7,
                ..base
            },
        ] {
            let n = cfg.size as usize;
            for index in 0..40 {
                let sample = generate(&cfg, Split::Val, index);
                assert_eq!(sample.image.dimensions(), (cfg.size, cfg.size));
                assert_eq!(sample.label.dimensions(), (cfg.size, cfg.size));
                // Also checks that masks are disjoint.
                owner_from_masks(&sample, n);
                for obj in &sample.objects {
                    assert!(obj.class < NUM_CLASSES);
                    assert_eq!(obj.mask.len(), n * n);
                    assert!(obj.mask.iter().all(|&m| m <= 1));
                    let pixels: Vec<(usize, usize)> = (0..n * n)
                        .filter(|&p| obj.mask[p] == 1)
                        .map(|p| (p % n, p / n))
                        .collect();
                    assert_eq!(obj.area, pixels.len() as u64);
                    assert!(obj.area >= MIN_VISIBLE_PX as u64);
                    let x0 = pixels.iter().map(|p| p.0).min().unwrap_or(0);
                    let x1 = pixels.iter().map(|p| p.0).max().unwrap_or(0);
                    let y0 = pixels.iter().map(|p| p.1).min().unwrap_or(0);
                    let y1 = pixels.iter().map(|p| p.1).max().unwrap_or(0);
                    let expected = [x0, y0, x1 - x0 + 1, y1 - y0 + 1].map(|v| v as f64);
                    assert_eq!(obj.bbox, expected);
                }
            }
        }
    }

    #[test]
    fn label_map_matches_masks() {
        for width in [0usize, 1, 2] {
            let cfg = SynthConfig {
                boundary_width: width as u32,
                ..SynthConfig::default()
            };
            let n = cfg.size as usize;
            let (mut object_px, mut labelled_px) = (0usize, 0usize);
            for index in 0..40 {
                let sample = generate(&cfg, Split::Train, index);
                let owner = owner_from_masks(&sample, n);
                let label = sample.label.as_raw();
                for y in 0..n {
                    for x in 0..n {
                        let p = y * n + x;
                        let o = owner[p];
                        let expected = if o == 0 {
                            0
                        } else {
                            sample.objects[o - 1].class as u8 + 1
                        };
                        let window_differs =
                            (y.saturating_sub(width)..(y + width + 1).min(n)).any(|yy| {
                                (x.saturating_sub(width)..(x + width + 1).min(n))
                                    .any(|xx| owner[yy * n + xx] != o)
                            });
                        if label[p] == IGNORE_INDEX {
                            assert!(window_differs, "ignored pixel away from any boundary");
                        } else {
                            assert_eq!(label[p], expected, "pixel ({x}, {y})");
                            // The band must exist: an object pixel next to background is
                            // labelled, so the background pixel beside it is ignored.
                        }
                        if width == 0 || !window_differs {
                            assert_ne!(label[p], IGNORE_INDEX);
                        }
                        if o > 0 {
                            object_px += 1;
                            labelled_px += usize::from(label[p] == expected);
                        }
                    }
                }
                // Every background pixel touching an object must be in the band.
                if width > 0 {
                    for y in 0..n {
                        for x in 1..n {
                            let (a, b) = (owner[y * n + x - 1], owner[y * n + x]);
                            if a == 0 && b > 0 {
                                assert_eq!(label[y * n + x - 1], IGNORE_INDEX);
                            }
                        }
                    }
                }
            }
            // The band sits outside objects, so most object pixels keep their class.
            let kept = labelled_px as f64 / object_px as f64;
            assert!(
                kept > 0.9,
                "width {width}: only {kept:.3} object pixels labelled"
            );
        }
    }

    #[test]
    fn objects_stand_out_from_their_surroundings() {
        // Image and masks agree: an object's mean colour differs clearly from the pixels
        // just outside it (its ignore band), whatever lies there.
        let cfg = SynthConfig::default();
        let n = cfg.size as usize;
        let (mut total, mut distinct) = (0usize, 0usize);
        for index in 0..100 {
            let sample = generate(&cfg, Split::Val, index);
            let label = sample.label.as_raw();
            let pixels = sample.image.as_raw();
            for obj in &sample.objects {
                let in_mask = |x: usize, y: usize| obj.mask[y * n + x] == 1;
                let (mut inside, mut outside) = (([0.0f64; 3], 0.0), ([0.0f64; 3], 0.0));
                for y in 0..n {
                    for x in 0..n {
                        let p = y * n + x;
                        let touches = (x > 0 && in_mask(x - 1, y))
                            || (x + 1 < n && in_mask(x + 1, y))
                            || (y > 0 && in_mask(x, y - 1))
                            || (y + 1 < n && in_mask(x, y + 1));
                        let acc = if in_mask(x, y) {
                            &mut inside
                        } else if touches && label[p] == IGNORE_INDEX {
                            &mut outside
                        } else {
                            continue;
                        };
                        for (a, &v) in acc.0.iter_mut().zip(&pixels[p * 3..p * 3 + 3]) {
                            *a += v as f64;
                        }
                        acc.1 += 1.0;
                    }
                }
                if outside.1 == 0.0 {
                    continue;
                }
                let dist = (0..3)
                    .map(|i| (inside.0[i] / inside.1 - outside.0[i] / outside.1).powi(2))
                    .sum::<f64>()
                    .sqrt();
                total += 1;
                distinct += usize::from(dist > 40.0);
            }
        }
        let share = distinct as f64 / total as f64;
        eprintln!("{distinct} of {total} objects contrast with their surroundings");
        assert!(share > 0.9, "only {share:.3} of objects stand out");
    }

    #[test]
    fn all_classes_appear() {
        let cfg = SynthConfig::default();
        let mut counts = [0usize; NUM_CLASSES];
        for index in 0..200 {
            for obj in generate(&cfg, Split::Train, index).objects {
                counts[obj.class] += 1;
            }
        }
        assert!(counts.iter().all(|&c| c > 0), "class counts {counts:?}");
    }

    #[test]
    fn area_ranges_cover_coco_buckets() {
        let cfg = SynthConfig::default();
        let mut ranges = [0usize; 3];
        let mut classes = [0usize; NUM_CLASSES];
        for index in 0..500 {
            for obj in generate(&cfg, Split::Train, index).objects {
                ranges[area_range(obj.area)] += 1;
                classes[obj.class] += 1;
            }
        }
        let total: usize = ranges.iter().sum();
        let frac = ranges.map(|r| r as f64 / total as f64);
        eprintln!(
            "{total} objects: small {:.3} medium {:.3} large {:.3}; classes {classes:?}",
            frac[0], frac[1], frac[2]
        );
        assert!(
            frac[0] > 0.3 && frac[1] > 0.2 && frac[2] >= 0.03,
            "{frac:?}"
        );
    }
}
