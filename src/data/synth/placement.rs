//! Back-to-front placement of objects under the visibility rules of the module docs.

use super::*;

pub(super) struct Placed {
    pub(super) shape: Shape,
    pub(super) large: bool,
    pub(super) cx: f64,
    pub(super) cy: f64,
    pub(super) half: f64,
    pub(super) pixels: Vec<u32>,
}

// A spec rasterised once at a fixed angle and sub-pixel phase, as pixel offsets from the
// integer part of the centre, so retried placements only translate it.
pub(super) struct Template {
    pub(super) frac: (f64, f64),
    pub(super) offsets: Vec<(i32, i32)>,
}

impl Template {
    pub(super) fn new(rng: &mut ChaCha8Rng, spec: &Spec) -> Self {
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
    pub(super) fn place(
        &self,
        rng: &mut ChaCha8Rng,
        spec: &Spec,
        size: usize,
        free: Option<&[u8]>,
    ) -> Placed {
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
pub(super) fn min_visible(obj: &Placed, size: usize, keep_large: bool) -> usize {
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
pub(super) fn place_objects(
    rng: &mut ChaCha8Rng,
    specs: &[Spec],
    size: usize,
) -> (Vec<Placed>, Vec<u8>) {
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
