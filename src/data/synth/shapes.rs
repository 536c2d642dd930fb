//! The shape classes in local coordinates, and object specs (shape and size) before placement.

use super::*;

// Shapes live in local coordinates (u, v) in [-1, 1]², scaled by the half extent in
// pixels and rotated about the centre.
#[derive(Debug, Clone, Copy)]
pub(super) enum Shape {
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
    pub(super) fn sample(rng: &mut ChaCha8Rng) -> Self {
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

    pub(super) fn class(&self) -> usize {
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
    pub(super) fn fill(&self) -> f64 {
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
    pub(super) fn can_be_large(&self) -> bool {
        matches!(self, Shape::Circle | Shape::Square | Shape::Frame { .. })
    }

    // Thicker frame border for large instances, so they have enough area to be COCO-large.
    pub(super) fn thickened(self) -> Self {
        match self {
            Shape::Frame { inner } => Shape::Frame { inner: inner * 0.6 },
            other => other,
        }
    }

    // Circles and rings look the same at any angle; skip the rotation draw for them.
    pub(super) fn rotates(&self) -> bool {
        !matches!(self, Shape::Circle | Shape::Ring { .. })
    }

    // Keep outlines ~2 px and bars ~3 px thick so small instances survive rasterisation.
    pub(super) fn with_min_thickness(self, half_px: f64) -> Self {
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

    pub(super) fn contains(&self, u: f64, v: f64) -> bool {
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
pub(super) const STAR_TIPS: [(f64, f64); 5] = [
    (1.0, 0.0),
    (0.309_016_994_374_947_45, 0.951_056_516_295_153_5),
    (-0.809_016_994_374_947_3, 0.587_785_252_292_473_2),
    (-0.809_016_994_374_947_3, -0.587_785_252_292_473_2),
    (0.309_016_994_374_947_45, -0.951_056_516_295_153_5),
];
pub(super) const COS_36: f64 = 0.809_016_994_374_947_5;
pub(super) const SIN_36: f64 = 0.587_785_252_292_473_1;

// An object's shape and size before it is given a position.
#[derive(Clone, Copy)]
pub(super) struct Spec {
    pub(super) shape: Shape,
    pub(super) half: f64,
    pub(super) large: bool,
}

impl Spec {
    pub(super) fn sample(rng: &mut ChaCha8Rng, size: f64, count: usize) -> Self {
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

    pub(super) fn nominal_area(&self) -> f64 {
        self.shape.fill() * 4.0 * self.half * self.half
    }
}

// Smallest extent for `shape`: recognisable, and with about twice the pixels an object
// must keep visible, so that even the smallest instance can be placed.
pub(super) fn min_extent(shape: Shape, size: f64) -> f64 {
    let enough_pixels = (2.0 * MIN_VISIBLE_PX as f64 / shape.fill()).sqrt();
    (MIN_EXTENT * size / REF_SIZE)
        .max(MIN_PX)
        .max(enough_pixels)
}

// A positioned object and the in-frame pixels (row-major indices) its shape covers.
