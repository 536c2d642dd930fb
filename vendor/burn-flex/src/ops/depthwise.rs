//! densekd patch: depthwise 2D convolutions (one input and one output channel per group),
//! forward and backward, as direct loops.
//!
//! Each input plane is first copied into zero-padded stride phases: phase `(p, q)` holds the
//! padded input's rows `p, p + s_h, …` and columns `q, q + s_w, …`, every phase with the same row
//! length `C`. Kernel tap `(kh, kw)` then reads phase `(kh·d_h mod s_h, kw·d_w mod s_w)` at one
//! fixed offset from the output position, so with the output plane laid out in rows of length
//! `C` a tap is a single contiguous multiply-add over the whole plane: no bounds or strided
//! gathers inside the loop, and a 7×7 map is one 63-long loop instead of seven 7-long ones. The
//! `C − out_w` columns after each output row are scratch (zero where they feed a gradient). The
//! inner loops (multiply-adds, dot products, stride-2 copies) are compiled three times (AVX-512,
//! AVX2 and the SSE2 baseline) and picked at run time; all versions multiply and add separately
//! in the same order, so they give the same bits.

use alloc::vec;
use alloc::vec::Vec;
use num_traits::Float;

#[cfg(all(feature = "std", target_arch = "x86_64"))]
use super::simd::{gather, vectorized};
use super::threads::split_mut;

/// The shapes of one depthwise convolution and its phase layout.
#[derive(Clone, Debug)]
pub(super) struct Depthwise {
    batch: usize,
    channels: usize,
    input: [usize; 2],
    output: [usize; 2],
    stride: [usize; 2],
    pad: [usize; 2],
    /// Per kernel tap, in `(kh, kw)` order: its phase and its offset inside the phase.
    taps: Vec<(usize, usize)>,
    /// Which phases some tap reads.
    used: Vec<bool>,
    /// Rows and row length of a phase.
    rows: usize,
    cols: usize,
    /// Multiply-adds of the forward pass.
    flops: usize,
}

impl Depthwise {
    /// The layout for `batch` images of `channels` planes of size `input`, kernel `kernel`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        batch: usize,
        channels: usize,
        input: [usize; 2],
        output: [usize; 2],
        kernel: [usize; 2],
        stride: [usize; 2],
        pad: [usize; 2],
        dil: [usize; 2],
    ) -> Self {
        let reach = |d: usize| (kernel[d] - 1) * dil[d] / stride[d];
        let (rows, cols) = (output[0] + reach(0), output[1] + reach(1));
        let mut used = vec![false; stride[0] * stride[1]];
        let mut taps = Vec::with_capacity(kernel[0] * kernel[1]);
        for kh in 0..kernel[0] {
            for kw in 0..kernel[1] {
                let (h, w) = (kh * dil[0], kw * dil[1]);
                let phase = (h % stride[0]) * stride[1] + w % stride[1];
                used[phase] = true;
                taps.push((phase, (h / stride[0]) * cols + w / stride[1]));
            }
        }
        Self {
            batch,
            channels,
            input,
            output,
            stride,
            pad,
            taps,
            used,
            rows,
            cols,
            flops: batch * channels * output[0] * output[1] * kernel[0] * kernel[1],
        }
    }

    fn phase_len(&self) -> usize {
        self.rows * self.cols
    }

    /// Length of an output plane in rows of `cols`, up to its last real element.
    fn span(&self) -> usize {
        (self.output[0] - 1) * self.cols + self.output[1]
    }

    fn in_plane(&self) -> usize {
        self.input[0] * self.input[1]
    }

    fn out_plane(&self) -> usize {
        self.output[0] * self.output[1]
    }

    /// The input row of row `r` of the phases with row offset `p`, if inside the input.
    fn source_row(&self, p: usize, r: usize) -> Option<usize> {
        (r * self.stride[0] + p)
            .checked_sub(self.pad[0])
            .filter(|&v| v < self.input[0])
    }

    /// Phase columns `[lo, hi)` of phase column offset `q` that lie inside the input.
    fn inside_cols(&self, q: usize) -> (usize, usize) {
        let (s, pad, len) = (self.stride[1], self.pad[1], self.input[1]);
        let lo = pad.saturating_sub(q).div_ceil(s);
        let hi = (len + pad).saturating_sub(q).div_ceil(s).min(self.cols);
        (lo.min(hi), hi)
    }

    /// Copies `plane` into its zero-padded phases (`phases` is zero outside the input already).
    fn split<T: Float>(&self, plane: &[T], phases: &mut [T]) {
        let sw = self.stride[1];
        for (phase, out) in phases.chunks_mut(self.phase_len()).enumerate() {
            if !self.used[phase] {
                continue;
            }
            let (p, q) = (phase / sw, phase % sw);
            let (lo, hi) = self.inside_cols(q);
            if lo >= hi {
                continue;
            }
            let first = lo * sw + q - self.pad[1];
            for r in 0..self.rows {
                let Some(ih) = self.source_row(p, r) else {
                    continue;
                };
                let src = &plane[ih * self.input[1] + first..(ih + 1) * self.input[1]];
                gather(&mut out[r * self.cols + lo..r * self.cols + hi], src, sw);
            }
        }
    }

    /// The input-plane gradient read back from its phases (inputs no tap reads get 0).
    fn merge<T: Float>(&self, phases: &[T], plane: &mut [T]) {
        let (sw, pad, width) = (self.stride[1], self.pad[1], self.input[1]);
        for (ih, row) in plane.chunks_mut(width).enumerate() {
            let padded = ih + self.pad[0];
            let (p, r) = (padded % self.stride[0], padded / self.stride[0]);
            if r >= self.rows {
                row.fill(T::zero());
                continue;
            }
            // Stride 2 with every column's phase entry inside the phase: even and odd input
            // columns in one interleaving pass.
            let pairs = width / 2;
            if sw == 2
                && (1 + pad) / 2 + pairs <= self.cols
                && pad / 2 + width.div_ceil(2) <= self.cols
            {
                let at = |q: usize, cc: usize| (p * 2 + q) * self.phase_len() + r * self.cols + cc;
                let even = at(pad % 2, pad / 2);
                let odd = at((pad + 1) % 2, (pad + 1) / 2);
                interleave(row, &phases[even..even + pairs], &phases[odd..odd + pairs]);
                if width % 2 == 1 {
                    row[width - 1] = phases[even + pairs];
                }
                continue;
            }
            for q in 0..sw {
                // The first input column of phase column offset q, and its phase column.
                let first = (q + sw - pad % sw) % sw;
                if first >= width {
                    continue;
                }
                let count = (width - first).div_ceil(sw);
                let cc = (first + pad) / sw;
                let n = count.min(self.cols.saturating_sub(cc));
                let start = (p * sw + q) * self.phase_len() + r * self.cols + cc;
                let row = &mut row[first..];
                if n > 0 {
                    scatter(row, &phases[start..start + n], sw);
                }
                for i in n..count {
                    row[i * sw] = T::zero();
                }
            }
        }
    }

    /// Copies an output-sized plane into rows of `cols` (the scratch columns stay as they are).
    fn widen<T: Float>(&self, plane: &[T], wide: &mut [T]) {
        let w = self.output[1];
        for (oh, row) in plane.chunks(w).enumerate() {
            wide[oh * self.cols..oh * self.cols + w].copy_from_slice(row);
        }
    }
}

/// Forward pass: `y[b, c] = Σ_taps w[c, tap] · x[b, c] at the tap's offset`; planes in parallel.
pub(super) fn forward<T: Float + Send + Sync>(dw: &Depthwise, x: &[T], w: &[T]) -> Vec<T> {
    let (out_plane, k) = (dw.out_plane(), dw.taps.len());
    let mut y = vec![T::zero(); dw.batch * dw.channels * out_plane];
    split_mut(
        &mut y,
        dw.batch * dw.channels,
        out_plane,
        dw.flops,
        |planes, y| {
            let mut phases = vec![T::zero(); dw.used.len() * dw.phase_len()];
            let mut acc = vec![T::zero(); dw.span()];
            for (plane, y) in planes.zip(y.chunks_mut(out_plane)) {
                let c = plane % dw.channels;
                dw.split(
                    &x[plane * dw.in_plane()..(plane + 1) * dw.in_plane()],
                    &mut phases,
                );
                acc.fill(T::zero());
                // Every tap over one block of outputs at a time, so the block's sums stay in
                // L1 between taps. Each output still adds its taps in order: the same bits.
                for (b, acc) in acc.chunks_mut(BLOCK).enumerate() {
                    for (&(phase, off), &a) in dw.taps.iter().zip(&w[c * k..(c + 1) * k]) {
                        let src = &phases[phase * dw.phase_len() + off + b * BLOCK..];
                        axpy(acc, a, &src[..acc.len()]);
                    }
                }
                for (oh, row) in y.chunks_mut(dw.output[1]).enumerate() {
                    row.copy_from_slice(&acc[oh * dw.cols..oh * dw.cols + dw.output[1]]);
                }
            }
        },
    );
    y
}

/// Input gradient: each tap's weight times the output gradient, added to the phases at the
/// tap's offset, then read back into the input plane; planes in parallel.
pub(super) fn input_grad<T: Float + Send + Sync>(dw: &Depthwise, w: &[T], dy: &[T]) -> Vec<T> {
    let (in_plane, out_plane, k) = (dw.in_plane(), dw.out_plane(), dw.taps.len());
    let mut dx = vec![T::zero(); dw.batch * dw.channels * in_plane];
    split_mut(
        &mut dx,
        dw.batch * dw.channels,
        in_plane,
        dw.flops,
        |planes, dx| {
            let mut phases = vec![T::zero(); dw.used.len() * dw.phase_len()];
            let mut wide = vec![T::zero(); dw.span()];
            for (plane, dx) in planes.zip(dx.chunks_mut(in_plane)) {
                let c = plane % dw.channels;
                dw.widen(&dy[plane * out_plane..(plane + 1) * out_plane], &mut wide);
                phases.fill(T::zero());
                for (&(phase, off), &a) in dw.taps.iter().zip(&w[c * k..(c + 1) * k]) {
                    let dst = &mut phases[phase * dw.phase_len() + off..];
                    axpy(&mut dst[..wide.len()], a, &wide);
                }
                dw.merge(&phases, dx);
            }
        },
    );
    dx
}

/// Weight gradient: per channel and tap, the dot product of the output gradient with the
/// input at the tap's offset, summed over the images in order; channels in parallel.
pub(super) fn weight_grad<T: Float + Send + Sync>(dw: &Depthwise, x: &[T], dy: &[T]) -> Vec<T> {
    let (in_plane, out_plane, k) = (dw.in_plane(), dw.out_plane(), dw.taps.len());
    let mut grad = vec![T::zero(); dw.channels * k];
    split_mut(&mut grad, dw.channels, k, dw.flops, |channels, grad| {
        let mut phases = vec![T::zero(); dw.used.len() * dw.phase_len()];
        let mut wide = vec![T::zero(); dw.span()];
        let mut acc = vec![[T::zero(); LANES]; k];
        for (c, grad) in channels.zip(grad.chunks_mut(k)) {
            acc.iter_mut().for_each(|a| *a = [T::zero(); LANES]);
            for b in 0..dw.batch {
                let plane = b * dw.channels + c;
                dw.split(&x[plane * in_plane..(plane + 1) * in_plane], &mut phases);
                dw.widen(&dy[plane * out_plane..(plane + 1) * out_plane], &mut wide);
                // Blocks of whole lane groups: each lane sums the same products in the same
                // order as over the whole row.
                for (b, wide) in wide.chunks(BLOCK).enumerate() {
                    for (&(phase, off), acc) in dw.taps.iter().zip(acc.iter_mut()) {
                        let src = &phases[phase * dw.phase_len() + off + b * BLOCK..];
                        dot(acc, wide, &src[..wide.len()]);
                    }
                }
            }
            for (g, acc) in grad.iter_mut().zip(&acc) {
                *g = acc.iter().fold(T::zero(), |s, &v| s + v);
            }
        }
    });
    grad
}

/// `dst[i · step] = src[i]` for every `i` of `src`.
fn scatter<T: Float>(dst: &mut [T], src: &[T], step: usize) {
    if step == 1 {
        dst[..src.len()].copy_from_slice(src);
        return;
    }
    for (d, &s) in dst.iter_mut().step_by(step).zip(src) {
        *d = s;
    }
}

/// `dst[2i] = even[i]`, `dst[2i + 1] = odd[i]` for every pair of `dst`.
fn interleave<T: Float>(dst: &mut [T], even: &[T], odd: &[T]) {
    vectorized(#[inline(always)] || interleave_body(dst, even, odd));
}

#[inline(always)]
fn interleave_body<T: Float>(dst: &mut [T], even: &[T], odd: &[T]) {
    for ((pair, &e), &o) in dst.chunks_exact_mut(2).zip(even).zip(odd) {
        pair[0] = e;
        pair[1] = o;
    }
}

/// Partial sums of a dot product, one per lane of a 512-bit f32 vector.
const LANES: usize = 16;

/// Outputs per cache block of the tap loops (a multiple of [`LANES`]; 2 KiB of f32).
const BLOCK: usize = 32 * LANES;

/// `dst[i] += a · src[i]`.
fn axpy<T: Float>(dst: &mut [T], a: T, src: &[T]) {
    vectorized(#[inline(always)] || axpy_body(dst, a, src));
}

#[inline(always)]
fn axpy_body<T: Float>(dst: &mut [T], a: T, src: &[T]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = *d + a * s;
    }
}

/// `acc[i mod LANES] += a[i] · b[i]`.
fn dot<T: Float>(acc: &mut [T; LANES], a: &[T], b: &[T]) {
    vectorized(#[inline(always)] || dot_body(acc, a, b));
}

#[inline(always)]
fn dot_body<T: Float>(acc: &mut [T; LANES], a: &[T], b: &[T]) {
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (ra, rb) in (&mut ca).zip(&mut cb) {
        for i in 0..LANES {
            acc[i] = acc[i] + ra[i] * rb[i];
        }
    }
    for (i, (&va, &vb)) in ca.remainder().iter().zip(cb.remainder()).enumerate() {
        acc[i] = acc[i] + va * vb;
    }
}
