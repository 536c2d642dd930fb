//! densekd patch: batch and group normalisation as single kernels.
//!
//! burn writes both as chains of element-wise ops and reductions: about 6 passes over the
//! activation forward and 15 backward, each allocating a full-size buffer, which was about 30 %
//! of a MobileNetV2 training step. Here the forward pass reads the input three times (mean,
//! centred variance, output) and the backward pass reads input and output gradient twice.
//!
//! An activation after the normalisation (`NormAct`) runs inside the same kernels: forward on
//! the output as it is written, backward as a mask on the output gradient recomputed from the
//! input, so neither pass needs a sweep of its own.
//!
//! Every reduction is a row (one image's one channel) summed by one thread in a fixed order,
//! then rows summed into their group in row order, so results do not depend on the thread
//! count.

use alloc::vec;
use alloc::vec::Vec;

use super::scratch::written_by;
use super::simd::vectorized;
use super::threads::{PASS_FLOPS, split_mut};

/// Which rows of an `[N, C, S]` tensor share statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormGroups {
    /// Batch norm: one group per channel, over every image.
    Channel,
    /// Group norm: this many groups of consecutive channels per image.
    Image(usize),
}

/// The activation applied to a normalisation's output, with the same values and gradient mask
/// as flex's own `relu` and `clamp(0, 6)` followed by their backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormAct {
    /// None.
    Identity,
    /// `max(y, 0)`.
    Relu,
    /// `min(max(y, 0), 6)`.
    Relu6,
}

impl NormAct {
    /// The activation of `y`.
    #[inline(always)]
    pub fn apply(self, y: f32) -> f32 {
        match self {
            NormAct::Identity => y,
            NormAct::Relu => y.max(0.0),
            NormAct::Relu6 => y.clamp(0.0, 6.0),
        }
    }

    /// Whether the gradient passes at the pre-activation value `y` (written without a
    /// short-circuit, so that loops over it vectorise).
    #[inline(always)]
    pub fn passes(self, y: f32) -> bool {
        match self {
            NormAct::Identity => true,
            NormAct::Relu => y > 0.0,
            NormAct::Relu6 => (y > 0.0) & (y < 6.0),
        }
    }
}

/// Runs `$body` with `$f` bound to the activation's function and `$keep` to its gradient mask,
/// one monomorphised copy per activation so the inner loops carry no branch on it.
macro_rules! with_act {
    ($act:expr, |$f:ident, $keep:ident| $body:expr) => {
        match $act {
            NormAct::Identity => {
                let ($f, $keep) = (
                    |y| NormAct::Identity.apply(y),
                    |y| NormAct::Identity.passes(y),
                );
                $body
            }
            NormAct::Relu => {
                let ($f, $keep) = (|y| NormAct::Relu.apply(y), |y| NormAct::Relu.passes(y));
                $body
            }
            NormAct::Relu6 => {
                let ($f, $keep) = (|y| NormAct::Relu6.apply(y), |y| NormAct::Relu6.passes(y));
                $body
            }
        }
    };
}
pub(crate) use with_act;

/// The layout a normalisation kernel works on: `n` images of `c` channels of `s` elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NormShape {
    /// Images.
    pub n: usize,
    /// Channels.
    pub c: usize,
    /// Elements per channel (height × width).
    pub s: usize,
    /// How channels share statistics.
    pub groups: NormGroups,
}

impl NormShape {
    /// Number of statistics groups.
    pub fn group_count(&self) -> usize {
        match self.groups {
            NormGroups::Channel => self.c,
            NormGroups::Image(g) => self.n * g,
        }
    }

    /// Elements per statistics group.
    fn group_size(&self) -> usize {
        match self.groups {
            NormGroups::Channel => self.n * self.s,
            NormGroups::Image(g) => self.c / g * self.s,
        }
    }

    /// The group of row `r` (image `r / c`, channel `r % c`).
    fn group_of(&self, r: usize) -> usize {
        match self.groups {
            NormGroups::Channel => r % self.c,
            NormGroups::Image(g) => r / self.c * g + r % self.c / (self.c / g),
        }
    }

    fn rows(&self) -> usize {
        self.n * self.c
    }

    fn check(&self, len: usize) {
        assert_eq!(len, self.n * self.c * self.s, "norm: input size");
        if let NormGroups::Image(g) = self.groups {
            assert!(
                g > 0 && self.c % g == 0,
                "norm: groups must divide channels"
            );
        }
    }
}

/// `Σ f(x)` over a row with eight partial sums, so the loop vectorises; the order is fixed.
#[inline(always)]
fn row_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += f(v);
        }
    }
    let mut total =
        ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for &v in tail {
        total += f(v);
    }
    total
}

/// `d` where `keep` holds, else +0.0 (a select's result, without a branch, so the loops
/// vectorise: an activation's mask is unpredictable).
#[inline(always)]
pub fn masked(keep: bool, d: f32) -> f32 {
    f32::from_bits(d.to_bits() & 0u32.wrapping_sub(keep as u32))
}

/// `(Σ a, Σ a·f(b))` over two rows, eight partial sums each.
#[inline(always)]
fn row_sums2(a: &[f32], b: &[f32], f: impl Fn(f32) -> f32) -> [f32; 2] {
    let mut acc = [[0.0f32; 8]; 2];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (xa, xb) in ca.zip(cb) {
        for i in 0..8 {
            acc[0][i] += xa[i];
            acc[1][i] += xa[i] * f(xb[i]);
        }
    }
    let fold = |s: &[f32; 8]| ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
    let (mut sa, mut sb) = (fold(&acc[0]), fold(&acc[1]));
    for (&va, &vb) in ta.iter().zip(tb) {
        sa += va;
        sb += va * f(vb);
    }
    [sa, sb]
}

/// A row of output gradients `dy` with an activation's mask applied (`keep` of the
/// pre-activation value `x · scale + shift`), written into `buf` in a loop of its own so that
/// it vectorises; `dy` itself when `masking` is off.
#[inline(always)]
fn masked_row<'a>(
    (dy, x): (&'a [f32], &[f32]),
    (scale, shift): (f32, f32),
    keep: &impl Fn(f32) -> bool,
    masking: bool,
    buf: &'a mut Vec<f32>,
) -> &'a [f32] {
    if !masking {
        return dy;
    }
    buf.resize(dy.len(), 0.0);
    for ((o, &d), &v) in buf.iter_mut().zip(dy).zip(x) {
        *o = masked(keep(v * scale + shift), d);
    }
    buf
}

/// Per-group means of per-row values, rows summed in order.
fn group_means(shape: &NormShape, per_row: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0f32; shape.group_count()];
    for (r, v) in per_row.iter().enumerate() {
        out[shape.group_of(r)] += v;
    }
    let m = shape.group_size() as f32;
    out.iter_mut().for_each(|v| *v /= m);
    out
}

/// `1 / √(var + ε)`, the one expression both passes use.
fn rstd(var: f32, eps: f32) -> f32 {
    1.0 / (var + eps).sqrt()
}

/// The per-channel scale and shift that row `r` is normalised with.
fn row_affine(
    shape: &NormShape,
    r: usize,
    (mean, var): (&[f32], &[f32]),
    (gamma, beta): (&[f32], &[f32]),
    eps: f32,
) -> (f32, f32) {
    let (g, ch) = (shape.group_of(r), r % shape.c);
    let scale = rstd(var[g], eps) * gamma[ch];
    (scale, beta[ch] - mean[g] * scale)
}

/// Normalises `x` (`[N, C, S]`, contiguous) by its group statistics, applies the per-channel
/// `gamma`, `beta`, then `act`. Returns the output, and each group's mean and biased variance.
pub fn norm_forward_f32(
    x: &[f32],
    shape: &NormShape,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    act: NormAct,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    shape.check(x.len());
    let (rows, s) = (shape.rows(), shape.s);
    let work = x.len() * PASS_FLOPS;
    let mut sums = vec![0.0f32; rows];
    split_mut(&mut sums, rows, 1, work, |range, out| {
        vectorized(
            #[inline(always)]
            || {
                for (o, r) in out.iter_mut().zip(range) {
                    *o = row_sum(&x[r * s..(r + 1) * s], |v| v);
                }
            },
        )
    });
    let mean = group_means(shape, &sums);
    split_mut(&mut sums, rows, 1, work, |range, out| {
        vectorized(
            #[inline(always)]
            || {
                for (o, r) in out.iter_mut().zip(range) {
                    let mu = mean[shape.group_of(r)];
                    *o = row_sum(&x[r * s..(r + 1) * s], |v| (v - mu) * (v - mu));
                }
            },
        )
    });
    let var = group_means(shape, &sums);
    // SAFETY: the blocks cover every row, and each row's loop writes all its elements.
    let y = unsafe {
        written_by(x.len(), |y| {
            with_act!(act, |f, _keep| split_mut(y, rows, s, work, |range, out| {
                vectorized(
                    #[inline(always)]
                    || {
                        for (o, r) in out.chunks_exact_mut(s).zip(range) {
                            let (scale, shift) =
                                row_affine(shape, r, (&mean, &var), (gamma, beta), eps);
                            for (o, &v) in o.iter_mut().zip(&x[r * s..(r + 1) * s]) {
                                o.write(f(v * scale + shift));
                            }
                        }
                    },
                )
            }))
        })
    };
    (y, mean, var)
}

/// Gradients of [`norm_forward_f32`] for the output gradient `dy`, from the input and the
/// forward pass's statistics: `(dx, dgamma, dbeta)`. `act`'s mask is recomputed from the input
/// exactly as the forward pass computed its argument.
pub fn norm_backward_f32(
    x: &[f32],
    dy: &[f32],
    shape: &NormShape,
    (mean, var): (&[f32], &[f32]),
    (gamma, beta): (&[f32], &[f32]),
    eps: f32,
    act: NormAct,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let masking = act != NormAct::Identity;
    with_act!(act, |_f, keep| backward_masked(
        (x, dy),
        shape,
        (mean, var),
        (gamma, beta),
        eps,
        (keep, masking)
    ))
}

/// [`norm_backward_f32`] for one activation's gradient mask `keep` of the pre-activation value.
fn backward_masked(
    (x, dy): (&[f32], &[f32]),
    shape: &NormShape,
    (mean, var): (&[f32], &[f32]),
    (gamma, beta): (&[f32], &[f32]),
    eps: f32,
    (keep, masking): (impl Fn(f32) -> bool + Sync, bool),
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    shape.check(x.len());
    assert_eq!(dy.len(), x.len(), "norm: gradient size");
    let (rows, s, c) = (shape.rows(), shape.s, shape.c);
    let work = 2 * x.len() * PASS_FLOPS;
    // Per row: Σ dy and Σ dy · x̂.
    let mut sums = vec![[0.0f32; 2]; rows];
    split_mut(&mut sums, rows, 1, work, |range, out| {
        let mut buf = Vec::new();
        vectorized(
            #[inline(always)]
            || {
                for (o, r) in out.iter_mut().zip(range) {
                    let (g, x_r) = (shape.group_of(r), &x[r * s..(r + 1) * s]);
                    let affine = row_affine(shape, r, (mean, var), (gamma, beta), eps);
                    let dy_r = &dy[r * s..(r + 1) * s];
                    let d = masked_row((dy_r, x_r), affine, &keep, masking, &mut buf);
                    let mu = mean[g];
                    let [a, b] = row_sums2(d, x_r, |v| v - mu);
                    *o = [a, b * rstd(var[g], eps)];
                }
            },
        )
    });
    let (mut dgamma, mut dbeta) = (vec![0.0f32; c], vec![0.0f32; c]);
    for (r, [a, b]) in sums.iter().enumerate() {
        dbeta[r % c] += a;
        dgamma[r % c] += b;
    }
    let weighted = |i: usize| -> Vec<f32> {
        let per_row: Vec<f32> = sums
            .iter()
            .enumerate()
            .map(|(r, v)| v[i] * gamma[r % c])
            .collect();
        group_means(shape, &per_row)
    };
    let (mean_g, mean_gx) = (weighted(0), weighted(1));
    // dx = r·(γ·dy − mean(γ·dy) − x̂·mean(γ·dy·x̂)), as dy·p + x·q + k per row.
    // SAFETY: the blocks cover every row, and each row's loop writes all its elements.
    let dx = unsafe {
        written_by(x.len(), |dx| {
            split_mut(dx, rows, s, work, |range, out| {
                let mut buf = Vec::new();
                vectorized(
                    #[inline(always)]
                    || {
                        for (o, r) in out.chunks_exact_mut(s).zip(range) {
                            let g = shape.group_of(r);
                            let rs = rstd(var[g], eps);
                            let p = rs * gamma[r % c];
                            let q = -rs * rs * mean_gx[g];
                            let k = -rs * mean_g[g] - mean[g] * q;
                            let x_r = &x[r * s..(r + 1) * s];
                            let affine = row_affine(shape, r, (mean, var), (gamma, beta), eps);
                            let dy_r = &dy[r * s..(r + 1) * s];
                            let d = masked_row((dy_r, x_r), affine, &keep, masking, &mut buf);
                            for (o, (&d, &v)) in o.iter_mut().zip(d.iter().zip(x_r)) {
                                o.write(d * p + v * q + k);
                            }
                        }
                    },
                )
            })
        })
    };
    (dx, dgamma, dbeta)
}
