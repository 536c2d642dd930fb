//! FCOS's points and target assignment, on the host, as torchvision's `FCOS.compute_loss`:
//! a point is a positive of a box when it lies inside it, within the centre-sampling radius of
//! its centre, and the box's largest side distance is in the point's level range; a point
//! claimed by several boxes takes the smallest.

/// One point of the pyramid in padded-image pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// Centre x.
    pub x: f64,
    /// Centre y.
    pub y: f64,
    /// Anchor size (the level's stride): the unit of the box distances.
    pub size: f64,
}

/// Every point of a padded image's pyramid, level by level, each level row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Points {
    /// The points.
    pub points: Vec<Point>,
    /// Points per level.
    pub per_level: Vec<usize>,
}

/// The `(H, W)` of each level of an `(h, w)` padded image: every stride-2 stage rounds up
/// (3×3, padding 1), so a level of stride `s` has `⌈h / s⌉` rows when `s` is a power of two.
pub fn level_shapes((h, w): (usize, usize), strides: &[usize]) -> Vec<(usize, usize)> {
    strides
        .iter()
        .map(|&s| {
            let (mut lh, mut lw, mut k) = (h, w, 1);
            while k < s {
                lh = lh.div_ceil(2);
                lw = lw.div_ceil(2);
                k *= 2;
            }
            (lh, lw)
        })
        .collect()
}

impl Points {
    /// torchvision's `AnchorGenerator` with one square anchor of size `strides[l]` per
    /// location: the step between points is `image / grid` (integer division) and the first
    /// point sits at the image's corner.
    pub fn new((h, w): (usize, usize), shapes: &[(usize, usize)], strides: &[usize]) -> Self {
        let mut points = Vec::new();
        let mut per_level = Vec::new();
        for (&(lh, lw), &s) in shapes.iter().zip(strides) {
            let (step_y, step_x) = ((h / lh.max(1)) as f64, (w / lw.max(1)) as f64);
            for y in 0..lh {
                for x in 0..lw {
                    points.push(Point {
                        x: x as f64 * step_x,
                        y: y as f64 * step_y,
                        size: s as f64,
                    });
                }
            }
            per_level.push(lh * lw);
        }
        Points { points, per_level }
    }

    /// Number of points.
    pub fn len(&self) -> usize {
        self.points.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// The level of each point.
    pub fn levels(&self) -> Vec<usize> {
        self.per_level
            .iter()
            .enumerate()
            .flat_map(|(l, &n)| std::iter::repeat_n(l, n))
            .collect()
    }
}

/// Distances from `p` to the sides of `b` (`[x0, y0, x1, y1]`): left, top, right, bottom.
fn distances(p: &Point, b: &[f64; 4]) -> [f64; 4] {
    [p.x - b[0], p.y - b[1], b[2] - p.x, b[3] - p.y]
}

/// The box each point is a positive of (`None` = background). `boxes` are `[x0, y0, x1, y1]`
/// in padded-image pixels; `radius` is the centre-sampling radius in anchor sizes.
pub fn assign(points: &Points, boxes: &[[f64; 4]], radius: f64) -> Vec<Option<usize>> {
    let levels = points.levels();
    let last = points.per_level.len().saturating_sub(1);
    points
        .points
        .iter()
        .zip(levels)
        .map(|(p, level)| {
            // Level ranges in anchor sizes: (4, 8) but open-ended below the finest level and
            // above the coarsest.
            let lower = if level == 0 { 0.0 } else { 4.0 * p.size };
            let upper = if level == last {
                f64::INFINITY
            } else {
                8.0 * p.size
            };
            let mut best: Option<(usize, f64)> = None;
            for (j, b) in boxes.iter().enumerate() {
                let (cx, cy) = ((b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0);
                if (p.x - cx).abs().max((p.y - cy).abs()) >= radius * p.size {
                    continue;
                }
                let d = distances(p, b);
                if d.iter().copied().fold(f64::INFINITY, f64::min) <= 0.0 {
                    continue;
                }
                let far = d.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                if !(far > lower && far < upper) {
                    continue;
                }
                let area = (b[2] - b[0]) * (b[3] - b[1]);
                if best.is_none_or(|(_, a)| area < a) {
                    best = Some((j, area));
                }
            }
            best.map(|(j, _)| j)
        })
        .collect()
}

/// The box distances of `p` to `b` in anchor sizes: torchvision's `BoxLinearCoder.encode`
/// with `normalize_by_size`.
pub fn encode(p: &Point, b: &[f64; 4]) -> [f64; 4] {
    distances(p, b).map(|d| d / p.size)
}

/// The box at `p` from distances in anchor sizes (the inverse of [`encode`]).
pub fn decode(p: &Point, d: [f64; 4]) -> [f64; 4] {
    [
        p.x - d[0] * p.size,
        p.y - d[1] * p.size,
        p.x + d[2] * p.size,
        p.y + d[3] * p.size,
    ]
}

/// FCOS's centerness of distances `(l, t, r, b)`: `√(min(l, r)/max(l, r) · min(t, b)/max(t, b))`.
pub fn centerness(d: [f64; 4]) -> f64 {
    let ratio = |a: f64, b: f64| a.min(b) / a.max(b);
    (ratio(d[0], d[2]) * ratio(d[1], d[3])).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_shapes_round_up() {
        assert_eq!(
            level_shapes((96, 130), &[8, 16, 32, 64, 128]),
            vec![(12, 17), (6, 9), (3, 5), (2, 3), (1, 2)]
        );
    }

    #[test]
    fn points_start_at_the_corner() {
        let p = Points::new((32, 32), &[(4, 4), (2, 2)], &[8, 16]);
        assert_eq!(p.per_level, vec![16, 4]);
        assert_eq!(
            p.points[5],
            Point {
                x: 8.0,
                y: 8.0,
                size: 8.0
            }
        );
        assert_eq!(
            p.points[17],
            Point {
                x: 16.0,
                y: 0.0,
                size: 16.0
            }
        );
        assert_eq!(p.levels()[16], 1);
    }

    #[test]
    fn encode_decode_round_trip_and_centerness() {
        let p = Point {
            x: 16.0,
            y: 24.0,
            size: 8.0,
        };
        let b = [4.0, 20.0, 40.0, 32.0];
        let d = encode(&p, &b);
        assert_eq!(d, [1.5, 0.5, 3.0, 1.0]);
        assert_eq!(decode(&p, d), b);
        assert!((centerness(d) - (0.5f64 * 0.5).sqrt()).abs() < 1e-12);
    }
}
