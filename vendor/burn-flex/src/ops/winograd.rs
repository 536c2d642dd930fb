//! densekd patch: dense 3×3 convolutions with stride 1 and dilation 1 by Winograd's minimal
//! filtering F(2×2, 3×3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks",
//! 2016): `Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A` for each 2×2 output tile, with `d` the 4×4 input
//! tile around it. Over all tiles this is 16 products `M_ξ = U_ξ · V_ξ` (`U_ξ`: one transformed
//! weight entry per output × input channel, `V_ξ`: one transformed input entry per input
//! channel × tile) with 9 / 4 = 2.25× fewer multiply-adds than im2col + GEMM, and a transformed
//! input 4× the input's size where im2col's is 9×. The transforms' coefficients are 0, ±1 and
//! ±½, so the results differ from the direct sum by rounding only.
//!
//! The input gradient of such a convolution is one too (the weight flipped and transposed,
//! padding `2 − p`), so it runs here as well. Images go in chunks whose transforms fit in
//! [`CHUNK_ELEMENTS`], fixed by the shapes; chunks are split over threads, so every element is
//! computed by the same operations whatever the thread count.

use alloc::vec;
use alloc::vec::Vec;
use core::mem::MaybeUninit;
use num_traits::Float;

use super::scratch::{Buffer, written_by};
use super::simd::gather;
use super::threads::{PASS_FLOPS, split_mut, split_mut_scratch};

/// Elements of the transformed input and products of one chunk of images (16 ×
/// (c_in + c_out) × tiles): 8 MiB of f32, so that they are read back from cache.
const CHUNK_ELEMENTS: usize = 1 << 21;

/// The most images in one chunk, so that a batch of 8 still splits over cores.
const MAX_CHUNK_IMAGES: usize = 4;

/// The fewest input and output channels for which the transforms pay.
const MIN_CHANNELS: usize = 32;

/// One convolution's shapes: NCHW input `[batch, c_in, in_h, in_w]`, weight
/// `[c_out, c_in, 3, 3]`, padding `pad` (at most 2), output `[batch, c_out, out_h, out_w]`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Winograd {
    /// Images.
    pub batch: usize,
    /// Input channels.
    pub c_in: usize,
    /// Output channels.
    pub c_out: usize,
    /// Input height and width.
    pub input: [usize; 2],
    /// Zero padding of the rows and columns.
    pub pad: [usize; 2],
}

impl Winograd {
    /// Whether F(2×2, 3×3) computes this convolution (and pays for its transforms).
    pub fn applies(
        c_in: usize,
        c_out: usize,
        kernel: [usize; 2],
        stride: [usize; 2],
        pad: [usize; 2],
        dil: [usize; 2],
        groups: usize,
    ) -> bool {
        groups == 1
            && kernel == [3, 3]
            && stride == [1, 1]
            && dil == [1, 1]
            && pad[0] <= 2
            && pad[1] <= 2
            && c_in >= MIN_CHANNELS
            && c_out >= MIN_CHANNELS
    }

    fn output(&self) -> [usize; 2] {
        [
            self.input[0] + 2 * self.pad[0] - 2,
            self.input[1] + 2 * self.pad[1] - 2,
        ]
    }

    /// 2×2 tiles per column and row of the output.
    fn tiles(&self) -> [usize; 2] {
        let [h, w] = self.output();
        [h.div_ceil(2), w.div_ceil(2)]
    }

    /// The input gradient's convolution: the output gradient as input, padding `2 − p`.
    fn transposed(&self) -> Self {
        let [h, w] = self.output();
        Self {
            batch: self.batch,
            c_in: self.c_out,
            c_out: self.c_in,
            input: [h, w],
            pad: [2 - self.pad[0], 2 - self.pad[1]],
        }
    }
}

/// `y = conv(x, w)` (no bias) for NCHW `x` and `[c_out, c_in, 3, 3]` `w`: chunks of images
/// split over threads, each thread transforming and multiplying its chunks in turn.
pub(super) fn forward<T: Float + bytemuck::Pod + Send + Sync + 'static>(
    wg: &Winograd,
    x: &[T],
    w: &[T],
) -> Vec<T> {
    let mut u = Buffer::take(16 * wg.c_out * wg.c_in);
    let u = u.as_mut();
    weight_transform(wg, w, u);
    let [out_h, out_w] = wg.output();
    let [th, tw] = wg.tiles();
    let tiles = th * tw;
    let (in_image, out_image) = (
        wg.c_in * wg.input[0] * wg.input[1],
        wg.c_out * out_h * out_w,
    );
    // The chunks depend on the shapes only, so every product has the same columns whatever
    // the thread count.
    let per_chunk = (CHUNK_ELEMENTS / (16 * (wg.c_in + wg.c_out) * tiles))
        .clamp(1, MAX_CHUNK_IMAGES)
        .min(wg.batch);
    let chunks = wg.batch.div_ceil(per_chunk);
    let flops = wg.batch * wg.c_out * wg.c_in * tiles * 16;
    let (v_len, m_len) = (
        16 * wg.c_in * per_chunk * tiles,
        16 * wg.c_out * per_chunk * tiles,
    );
    let scratch = v_len + m_len;
    // Every output plane's rows are written by the output transform.
    let write = |y: &mut [MaybeUninit<T>]| {
        split_mut_scratch(
            y,
            chunks,
            per_chunk * out_image,
            flops,
            scratch,
            |range, y, vm| {
                let (v, m) = vm.split_at_mut(v_len);
                let mut scratch = Scratch::new(wg);
                let mut rows = Rows::new(tw);
                for (chunk, y) in range.zip(y.chunks_mut(per_chunk * out_image)) {
                    let (b0, nb) = (chunk * per_chunk, y.len() / out_image);
                    let n = nb * tiles;
                    let (v, m) = (&mut v[..16 * wg.c_in * n], &mut m[..16 * wg.c_out * n]);
                    input_transform(
                        wg,
                        &x[b0 * in_image..(b0 + nb) * in_image],
                        nb,
                        v,
                        &mut scratch,
                    );
                    for xi in 0..16 {
                        // U_ξ: c_out rows of c_in, 16·c_in apart.
                        let u = &u[xi * wg.c_in..];
                        let v = &v[xi * wg.c_in * n..(xi + 1) * wg.c_in * n];
                        let m = &mut m[xi * wg.c_out * n..(xi + 1) * wg.c_out * n];
                        // SAFETY: `u` holds c_out rows 16·c_in apart of c_in each, `v` is c_in × n and
                        // `m` c_out × n, both row-major.
                        unsafe {
                            super::conv2d_gemm::gemm_into(
                                [wg.c_out, n, wg.c_in],
                                m.as_mut_ptr(),
                                n as isize,
                                false,
                                (u.as_ptr(), 1, (16 * wg.c_in) as isize),
                                (v.as_ptr(), 1, n as isize),
                            );
                        }
                    }
                    for (plane, y) in y.chunks_mut(out_h * out_w).enumerate() {
                        output_transform(wg, m, n, plane, y, &mut rows);
                    }
                }
            },
        )
    };
    // SAFETY: `write` writes every output.
    unsafe { written_by(wg.batch * out_image, write) }
}

/// The input gradient `dx = conv(dy, flip(wᵀ))` with padding `2 − p`.
pub(super) fn input_grad<T: Float + bytemuck::Pod + Send + Sync + 'static>(
    wg: &Winograd,
    w: &[T],
    dy: &[T],
) -> Vec<T> {
    let mut flipped = Buffer::take(w.len());
    let flipped = flipped.as_mut();
    for co in 0..wg.c_out {
        for ci in 0..wg.c_in {
            let src = &w[(co * wg.c_in + ci) * 9..][..9];
            let dst = &mut flipped[(ci * wg.c_out + co) * 9..][..9];
            for (k, d) in dst.iter_mut().enumerate() {
                *d = src[8 - k];
            }
        }
    }
    forward(&wg.transposed(), dy, flipped)
}

/// `U_ξ = G g Gᵀ` for every weight into `u`, laid out `[c_out][16][c_in]` (output channels
/// split over threads).
fn weight_transform<T: Float + Send + Sync>(wg: &Winograd, w: &[T], u: &mut [T]) {
    let half = T::from(0.5).expect("½ is representable");
    let c_in = wg.c_in;
    let flops = 16 * wg.c_out * c_in * PASS_FLOPS;
    split_mut(u, wg.c_out, 16 * c_in, flops, |outputs, u| {
        for (co, u) in outputs.zip(u.chunks_mut(16 * c_in)) {
            for (ci, g) in w[co * c_in * 9..(co + 1) * c_in * 9]
                .chunks_exact(9)
                .enumerate()
            {
                // G g: 4 rows of 3.
                let mut gg = [[T::zero(); 3]; 4];
                for c in 0..3 {
                    let (g0, g1, g2) = (g[c], g[3 + c], g[6 + c]);
                    gg[0][c] = g0;
                    gg[1][c] = (g0 + g1 + g2) * half;
                    gg[2][c] = (g0 - g1 + g2) * half;
                    gg[3][c] = g2;
                }
                for (r, row) in gg.iter().enumerate() {
                    let [g0, g1, g2] = *row;
                    let t = [g0, (g0 + g1 + g2) * half, (g0 - g1 + g2) * half, g2];
                    for (c, &value) in t.iter().enumerate() {
                        u[(r * 4 + c) * c_in + ci] = value;
                    }
                }
            }
        }
    });
}

/// Row buffers of [`input_transform`]: a padded input plane's even and odd columns, and
/// `Bᵀ`'s column combinations of each of its rows.
struct Scratch<T> {
    even: Vec<T>,
    odd: Vec<T>,
    across: Vec<T>,
}

impl<T: Float> Scratch<T> {
    fn new(wg: &Winograd) -> Self {
        let [th, tw] = wg.tiles();
        let rows = 2 * th + 2;
        Self {
            even: vec![T::zero(); rows * (tw + 1)],
            odd: vec![T::zero(); rows * (tw + 1)],
            across: vec![T::zero(); 4 * rows * tw],
        }
    }
}

/// `V_ξ = Bᵀ d B` for every input channel and every tile of the `nb` images of `x`, into `v`
/// (`[ξ][c_in][image, tile]`).
///
/// Each input plane is zero-padded to `2·th + 2` rows of `2·tw + 2` and split into its even
/// and odd columns, so that tile column `t` reads columns `t` and `t + 1` of the two phases:
/// every step below is an add or subtract of contiguous rows.
fn input_transform<T: Float>(
    wg: &Winograd,
    x: &[T],
    nb: usize,
    v: &mut [T],
    scratch: &mut Scratch<T>,
) {
    let [th, tw] = wg.tiles();
    let [in_h, in_w] = wg.input;
    let [pad_h, pad_w] = wg.pad;
    let rows = 2 * th + 2;
    let cols = tw + 1;
    let n = nb * th * tw;
    let Scratch { even, odd, across } = scratch;
    for b in 0..nb {
        for c in 0..wg.c_in {
            let plane = &x[(b * wg.c_in + c) * in_h * in_w..][..in_h * in_w];
            for r in 0..rows {
                let (e, o) = (
                    &mut even[r * cols..(r + 1) * cols],
                    &mut odd[r * cols..(r + 1) * cols],
                );
                let Some(ih) = r.checked_sub(pad_h).filter(|&ih| ih < in_h) else {
                    e.fill(T::zero());
                    o.fill(T::zero());
                    continue;
                };
                let src = &plane[ih * in_w..(ih + 1) * in_w];
                for (q, phase) in [e, o].into_iter().enumerate() {
                    // Phase column t holds padded column 2t + q, input column 2t + q − pad_w.
                    let t0 = pad_w.saturating_sub(q).div_ceil(2);
                    let start = (2 * t0 + q).saturating_sub(pad_w);
                    let count = in_w
                        .saturating_sub(start)
                        .div_ceil(2)
                        .min(cols.saturating_sub(t0));
                    phase[..t0.min(cols)].fill(T::zero());
                    if count > 0 {
                        gather(&mut phase[t0..t0 + count], &src[start..], 2);
                    }
                    phase[(t0 + count).min(cols)..].fill(T::zero());
                }
            }
            for r in 0..rows {
                let e = &even[r * cols..(r + 1) * cols];
                let o = &odd[r * cols..(r + 1) * cols];
                for j in 0..4 {
                    let dst = &mut across[(j * rows + r) * tw..][..tw];
                    match j {
                        0 => combine(dst, &e[..tw], &e[1..], false),
                        1 => combine(dst, &o[..tw], &e[1..], true),
                        2 => combine(dst, &e[1..], &o[..tw], false),
                        _ => combine(dst, &o[..tw], &o[1..], false),
                    }
                }
            }
            for xi in 0..16 {
                let (i, j) = (xi / 4, xi % 4);
                let a = &across[j * rows * tw..(j + 1) * rows * tw];
                let row = |r: usize| &a[r * tw..(r + 1) * tw];
                let dst = &mut v[(xi * wg.c_in + c) * n + b * th * tw..][..th * tw];
                for (ty, dst) in dst.chunks_exact_mut(tw).enumerate() {
                    let r = 2 * ty;
                    match i {
                        0 => combine(dst, row(r), row(r + 2), false),
                        1 => combine(dst, row(r + 1), row(r + 2), true),
                        2 => combine(dst, row(r + 2), row(r + 1), false),
                        _ => combine(dst, row(r + 1), row(r + 3), false),
                    }
                }
            }
        }
    }
}

/// `dst = a + b` (`add`) or `a − b`.
#[inline]
fn combine<T: Float>(dst: &mut [T], a: &[T], b: &[T], add: bool) {
    if add {
        for ((d, &a), &b) in dst.iter_mut().zip(a).zip(b) {
            *d = a + b;
        }
    } else {
        for ((d, &a), &b) in dst.iter_mut().zip(a).zip(b) {
            *d = a - b;
        }
    }
}

/// Row buffers of [`output_transform`]: `Aᵀ` along the tile columns (`along[v][i]`), and the
/// two output columns of a tile row.
struct Rows<T> {
    along: [[Vec<T>; 4]; 2],
    out: [Vec<T>; 2],
}

impl<T: Float> Rows<T> {
    fn new(tw: usize) -> Self {
        let row = || vec![T::zero(); tw];
        Self {
            along: [[row(), row(), row(), row()], [row(), row(), row(), row()]],
            out: [row(), row()],
        }
    }
}

/// One output plane (`plane` = image × c_out + channel, images counted from the chunk's first)
/// from the products `m` (`[ξ][c_out][image, tile]`, `n` columns): `Y = Aᵀ M A` per tile.
fn output_transform<T: Float>(
    wg: &Winograd,
    m: &[T],
    n: usize,
    plane: usize,
    y: &mut [MaybeUninit<T>],
    rows: &mut Rows<T>,
) {
    let [out_h, out_w] = wg.output();
    let [th, tw] = wg.tiles();
    let (b, co) = (plane / wg.c_out, plane % wg.c_out);
    let at = |xi: usize, ty: usize| &m[(xi * wg.c_out + co) * n + (b * th + ty) * tw..][..tw];
    for ty in 0..th {
        for i in 0..4 {
            let (m0, m1, m2, m3) = (
                at(4 * i, ty),
                at(4 * i + 1, ty),
                at(4 * i + 2, ty),
                at(4 * i + 3, ty),
            );
            let [s0, s1] = &mut rows.along;
            for t in 0..tw {
                s0[i][t] = m0[t] + m1[t] + m2[t];
                s1[i][t] = m1[t] - m2[t] - m3[t];
            }
        }
        for u in 0..2 {
            let oh = 2 * ty + u;
            if oh >= out_h {
                break;
            }
            for (s, o) in rows.along.iter().zip(rows.out.iter_mut()) {
                for t in 0..tw {
                    o[t] = if u == 0 {
                        s[0][t] + s[1][t] + s[2][t]
                    } else {
                        s[1][t] - s[2][t] - s[3][t]
                    };
                }
            }
            let row = &mut y[oh * out_w..(oh + 1) * out_w];
            let [even, odd] = &rows.out;
            for (pair, (&e, &o)) in row.chunks_mut(2).zip(even.iter().zip(odd)) {
                pair[0].write(e);
                if let Some(last) = pair.get_mut(1) {
                    last.write(o);
                }
            }
        }
    }
}
