//! densekd patch: 2D max pooling of f32 NCHW tensors, plane by plane.
//!
//! flex pools every rank through one 3D loop that checks each tap's three coordinates
//! against the input and tracks an index even when none is asked for: a ResNet stem's 3×3
//! pool took 14 % of a ResNet-18 inference step. Here each output row's valid kernel rows and
//! each kernel column's valid output columns are found once, a whole output row is updated tap
//! by tap with branch-free selects (a per-window compare branch mispredicted on most taps;
//! compiled for AVX-512 where the CPU has it, as SSE2 code branches per lane), the stride
//! phases of an input row are split with vector loads, planes are split over cores, and the
//! result is the same: the first maximum in kernel-row-major order (a NaN found first stays),
//! its index `ih · W + iw` within the plane, `-inf` and `-1` for an empty window.

use alloc::vec;
use alloc::vec::Vec;
use burn_backend::DType;
use burn_std::{Bytes, Shape};

use super::pool::pool_output_size;
use super::simd::{gather, vectorized};
use super::threads::split_mut;
use crate::{FlexTensor, Layout};

/// Valid kernel taps `[lo, hi)` of output position `o` along one axis: those with
/// `0 ≤ o·s + k·d − p < size`.
fn taps(o: usize, s: usize, d: usize, p: usize, kernel: usize, size: usize) -> (usize, usize) {
    let start = o * s;
    let lo = (0..kernel).find(|&k| start + k * d >= p).unwrap_or(kernel);
    let hi = (lo..kernel)
        .find(|&k| start + k * d - p >= size)
        .unwrap_or(kernel);
    (lo, hi)
}

/// Max pooling of `x` (`[N, C, H, W]`) into `[N, C, out_h, out_w]`; indices too if asked.
#[allow(clippy::too_many_arguments)]
pub(crate) fn max_pool2d_f32(
    x: FlexTensor,
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    ceil_mode: bool,
    with_indices: bool,
) -> (FlexTensor, Option<FlexTensor>) {
    let x = x.to_contiguous();
    let shape = x.layout().shape();
    let size = |i: usize| {
        pool_output_size(
            shape[2 + i],
            kernel[i],
            padding[i],
            stride[i],
            dilation[i],
            ceil_mode,
        )
    };
    let out = [size(0), size(1)];
    let (planes, in_h, in_w) = (shape[0] * shape[1], shape[2], shape[3]);
    let out_shape = Shape::from(vec![shape[0], shape[1], out[0], out[1]]);
    let data: &[f32] = x.storage();
    let rows: Vec<(usize, usize)> = (0..out[0])
        .map(|o| taps(o, stride[0], dilation[0], padding[0], kernel[0], in_h))
        .collect();
    let out_hw = out[0] * out[1];
    let work = planes * out_hw * kernel[0] * kernel[1];
    // Per kernel column: the output columns whose tap lies inside the row, and the first one's
    // input column.
    let cols: Vec<(usize, usize, usize)> = (0..kernel[1])
        .map(|kw| {
            let off = kw * dilation[1];
            let lo = padding[1].saturating_sub(off).div_ceil(stride[1]);
            let hi = (in_w + padding[1])
                .checked_sub(off + 1)
                .map_or(0, |last| last / stride[1] + 1)
                .min(out[1]);
            let lo = lo.min(hi);
            (lo, hi, (lo * stride[1] + off).saturating_sub(padding[1]))
        })
        .collect();
    // One input row split into its `stride[1]` phases (`row[q·s + r]` at `r·phase + q`), so
    // that each kernel column's taps of an output row are contiguous.
    let phase = in_w.div_ceil(stride[1]);
    // The first maximum of every window of one output row, taps visited in kernel-row-major
    // order for all columns at once with selects (so it vectorises): values, and indices
    // within the plane in `at` (a plane holds fewer than 2³¹ values: 8 GiB).
    let pool_row =
        |plane: &[f32], oh: usize, phases: &mut [f32], best: &mut [f32], at: &mut [i32]| {
            best.fill(f32::NEG_INFINITY);
            at.fill(-1);
            let (kh_lo, kh_hi) = rows[oh];
            for kh in kh_lo..kh_hi {
                let ih = oh * stride[0] + kh * dilation[0] - padding[0];
                let row = &plane[ih * in_w..(ih + 1) * in_w];
                let src: &[f32] = if stride[1] == 1 {
                    row
                } else {
                    for r in 0..stride[1].min(in_w) {
                        let n = (in_w - r).div_ceil(stride[1]);
                        gather(&mut phases[r * phase..r * phase + n], &row[r..], stride[1]);
                    }
                    phases
                };
                for &(lo, hi, iw0) in cols.iter().filter(|c| c.0 < c.1) {
                    let n = hi - lo;
                    let start = (iw0 % stride[1]) * phase + iw0 / stride[1];
                    let taps = &src[start..start + n];
                    let (base, step) = ((ih * in_w + iw0) as i32, stride[1] as i32);
                    take_max(&mut best[lo..hi], &mut at[lo..hi], taps, base, step);
                }
            }
        };
    let plane_of = |p: usize| &data[p * in_h * in_w..(p + 1) * in_h * in_w];
    let tensor = |bytes: Bytes, dtype: DType| {
        FlexTensor::new(bytes, Layout::contiguous(out_shape.clone()), dtype)
    };
    if !with_indices {
        let mut y = vec![0.0f32; planes * out_hw];
        split_mut(&mut y, planes, out_hw, work, |range, y| {
            let (mut phases, mut at) = (
                vec![0f32; if stride[1] > 1 { phase * stride[1] } else { 0 }],
                vec![0i32; out[1]],
            );
            for (p, y) in range.zip(y.chunks_mut(out_hw)) {
                for (oh, y) in y.chunks_mut(out[1].max(1)).enumerate() {
                    pool_row(plane_of(p), oh, &mut phases, y, &mut at);
                }
            }
        });
        return (tensor(Bytes::from_elems(y), DType::F32), None);
    }
    let mut indices = vec![0i64; planes * out_hw];
    split_mut(&mut indices, planes, out_hw, work, |range, idx| {
        let (mut phases, mut best) = (
            vec![0f32; if stride[1] > 1 { phase * stride[1] } else { 0 }],
            vec![0f32; out[1]],
        );
        let mut at = vec![0i32; out[1]];
        for (p, idx) in range.zip(idx.chunks_mut(out_hw)) {
            for (oh, idx) in idx.chunks_mut(out[1].max(1)).enumerate() {
                pool_row(plane_of(p), oh, &mut phases, &mut best, &mut at);
                for (i, &a) in idx.iter_mut().zip(&at) {
                    *i = a as i64;
                }
            }
        }
    });
    let y: Vec<f32> = indices
        .chunks(out_hw)
        .enumerate()
        .flat_map(|(p, idx)| {
            let plane = plane_of(p);
            idx.iter().map(move |&i| {
                if i < 0 {
                    f32::NEG_INFINITY
                } else {
                    plane[i as usize]
                }
            })
        })
        .collect();
    (
        tensor(Bytes::from_elems(y), DType::F32),
        Some(tensor(Bytes::from_elems(indices), DType::I64)),
    )
}

/// Takes `taps[j]` into window `j` where it is the window's first tap or above its maximum so
/// far, recording its index `base + j · step`. Compiled for AVX-512 or AVX2, whose masks and
/// blends keep the selects branch-free (SSE2 code tests each lane with a branch).
fn take_max(best: &mut [f32], at: &mut [i32], taps: &[f32], base: i32, step: i32) {
    vectorized(#[inline(always)] || take_max_body(best, at, taps, base, step));
}

#[inline(always)]
fn take_max_body(best: &mut [f32], at: &mut [i32], taps: &[f32], base: i32, step: i32) {
    for (j, ((b, a), &v)) in best.iter_mut().zip(at.iter_mut()).zip(taps).enumerate() {
        let take = (v > *b) | (*a < 0);
        *b = if take { v } else { *b };
        *a = if take { base + j as i32 * step } else { *a };
    }
}
