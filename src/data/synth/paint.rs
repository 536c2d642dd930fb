//! Painting: background texture, object colours, pixel noise, the label map and the visible
//! objects' boxes.

use super::*;
use crate::data::transforms::hsv_to_rgb;

// Smooth lattice noise: random values on a coarse grid, smoothstep-interpolated.
pub(super) struct ValueNoise {
    pub(super) cells: usize,
    pub(super) grid: Vec<f64>,
}

impl ValueNoise {
    pub(super) fn new(rng: &mut ChaCha8Rng, cells: usize) -> Self {
        let grid = (0..(cells + 1) * (cells + 1))
            .map(|_| rng.random_range(-1.0..=1.0))
            .collect();
        Self { cells, grid }
    }

    // Lattice cell and smoothed fraction for a coordinate in [0, 1].
    pub(super) fn axis(&self, t: f64) -> (usize, f64) {
        let f = t * self.cells as f64;
        let i = (f.floor() as usize).min(self.cells - 1);
        let fr = f - i as f64;
        (i, fr * fr * (3.0 - 2.0 * fr))
    }

    pub(super) fn at(&self, (ix, tx): (usize, f64), (iy, ty): (usize, f64)) -> f64 {
        let n = self.cells + 1;
        let g = |x: usize, y: usize| self.grid[y * n + x];
        let top = g(ix, iy) + (g(ix + 1, iy) - g(ix, iy)) * tx;
        let bottom = g(ix, iy + 1) + (g(ix + 1, iy + 1) - g(ix, iy + 1)) * tx;
        top + (bottom - top) * ty
    }
}

// Textured background as linear RGB floats (3 per pixel): gradient between two muted
// colours, low-frequency colour blobs and, in half the images, luminance stripes.
pub(super) fn background(rng: &mut ChaCha8Rng, size: usize) -> Vec<f64> {
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

pub(super) fn random_colour(rng: &mut ChaCha8Rng) -> [f64; 3] {
    hsv_to_rgb(
        rng.random_range(0.0..360.0),
        rng.random_range(0.35..=1.0),
        rng.random_range(0.3..=1.0),
    )
}

// Paint the visible pixels of object `id` with a contrasting colour and a linear shading
// ramp, so objects are not perfectly flat.
pub(super) fn paint_object(
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
pub(super) fn quantize_with_noise(rng: &mut ChaCha8Rng, canvas: &[f64], size: u32) -> RgbImage {
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
pub(super) fn label_map(owner: &[u8], classes: &[usize], size: u32, width: usize) -> GrayImage {
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
pub(super) fn visible_objects(owner: &[u8], classes: &[usize], size: usize) -> Vec<SynthObject> {
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
