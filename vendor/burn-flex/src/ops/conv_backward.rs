//! densekd patch: 2D convolution gradients.
//!
//! burn's default `conv2d_weight_backward` is one convolution of the swapped batch with the
//! output gradient as a (H_out × W_out) kernel: flex runs it as one narrow product per input
//! channel, each re-reading the whole output gradient, and for grouped convolutions one such
//! convolution per group. Here the weight gradient is one GEMM per image and group,
//! `dW_g += dY_g · im2col(X_g)ᵀ`, and the input gradient `col2im(W_gᵀ · dY_g)`, summed over the
//! batch in a fixed order (bit-reproducible). Depthwise convolutions (one input and one output
//! channel per group) skip im2col and GEMM: direct loops whose inner loop runs over contiguous
//! output columns with analytic bounds, so it vectorises.

use alloc::vec;
use alloc::vec::Vec;
use burn_backend::ops::ConvOptions;
use burn_backend::{DType, Element};
use burn_std::{Bytes, Shape};
use num_traits::Float;

use crate::{FlexTensor, Layout};

use super::module::{cast_from_f32, cast_to_f32};

/// Geometry of one 2D convolution, read from its input, weight and output-gradient shapes.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    batch: usize,
    c_in: usize,
    c_out: usize,
    in_h: usize,
    in_w: usize,
    out_h: usize,
    out_w: usize,
    k_h: usize,
    k_w: usize,
    stride: [usize; 2],
    pad: [usize; 2],
    dil: [usize; 2],
    groups: usize,
}

impl Geometry {
    fn new(x: &Shape, w: &Shape, dy: &Shape, options: &ConvOptions<2>) -> Self {
        Self {
            batch: x[0],
            c_in: x[1],
            in_h: x[2],
            in_w: x[3],
            c_out: w[0],
            k_h: w[2],
            k_w: w[3],
            out_h: dy[2],
            out_w: dy[3],
            stride: options.stride,
            pad: options.padding,
            dil: options.dilation,
            groups: options.groups,
        }
    }

    fn in_per_group(&self) -> usize {
        self.c_in / self.groups
    }

    fn out_per_group(&self) -> usize {
        self.c_out / self.groups
    }

    fn depthwise(&self) -> bool {
        self.in_per_group() == 1 && self.out_per_group() == 1
    }

    /// Input row of output row `o` at kernel row `k`, if inside the image.
    fn in_row(&self, o: usize, k: usize) -> Option<usize> {
        (o * self.stride[0] + k * self.dil[0])
            .checked_sub(self.pad[0])
            .filter(|&i| i < self.in_h)
    }

    /// Output columns `[lo, hi)` whose input column at kernel column `k` is inside the image.
    fn out_cols(&self, k: usize) -> (usize, usize) {
        let (s, off) = (self.stride[1], k * self.dil[1]);
        let lo = self.pad[1].saturating_sub(off).div_ceil(s);
        // Largest o with o*s + off - pad <= in_w - 1.
        let hi = (self.in_w + self.pad[1])
            .checked_sub(off + 1)
            .map_or(0, |last| last / s + 1)
            .min(self.out_w);
        (lo.min(hi), hi)
    }

    /// Input column of output column `o` at kernel column `k` (`o` inside `out_cols(k)`).
    fn in_col(&self, o: usize, k: usize) -> usize {
        o * self.stride[1] + k * self.dil[1] - self.pad[1]
    }
}

/// Gradient of `conv2d` with respect to its weight.
pub fn conv2d_weight_backward(
    x: FlexTensor,
    weight: FlexTensor,
    output_grad: FlexTensor,
    options: &ConvOptions<2>,
) -> FlexTensor {
    match x.dtype() {
        DType::F32 => weight_grad::<f32>(x, weight, output_grad, options),
        DType::F64 => weight_grad::<f64>(x, weight, output_grad, options),
        DType::F16 => via_f32(
            x,
            weight,
            output_grad,
            options,
            half::f16::to_f32,
            half::f16::from_f32,
            conv2d_weight_backward,
        ),
        DType::BF16 => via_f32(
            x,
            weight,
            output_grad,
            options,
            half::bf16::to_f32,
            half::bf16::from_f32,
            conv2d_weight_backward,
        ),
        dtype => panic!("conv2d_weight_backward: unsupported dtype {dtype:?}"),
    }
}

/// Gradient of `conv2d` with respect to its input.
pub fn conv2d_x_backward(
    x: FlexTensor,
    weight: FlexTensor,
    output_grad: FlexTensor,
    options: &ConvOptions<2>,
) -> FlexTensor {
    match x.dtype() {
        DType::F32 => input_grad::<f32>(x, weight, output_grad, options),
        DType::F64 => input_grad::<f64>(x, weight, output_grad, options),
        DType::F16 => via_f32(
            x,
            weight,
            output_grad,
            options,
            half::f16::to_f32,
            half::f16::from_f32,
            conv2d_x_backward,
        ),
        DType::BF16 => via_f32(
            x,
            weight,
            output_grad,
            options,
            half::bf16::to_f32,
            half::bf16::from_f32,
            conv2d_x_backward,
        ),
        dtype => panic!("conv2d_x_backward: unsupported dtype {dtype:?}"),
    }
}

/// Half-precision gradients computed in f32 (as flex's forward does for bf16).
fn via_f32<E: Element + bytemuck::Pod + Copy>(
    x: FlexTensor,
    weight: FlexTensor,
    output_grad: FlexTensor,
    options: &ConvOptions<2>,
    to_f32: fn(E) -> f32,
    from_f32: fn(f32) -> E,
    grad: fn(FlexTensor, FlexTensor, FlexTensor, &ConvOptions<2>) -> FlexTensor,
) -> FlexTensor {
    let out = grad(
        cast_to_f32(x, to_f32),
        cast_to_f32(weight, to_f32),
        cast_to_f32(output_grad, to_f32),
        options,
    );
    cast_from_f32(out, from_f32)
}

fn weight_grad<T: Element + bytemuck::Pod + Float + 'static>(
    x: FlexTensor,
    weight: FlexTensor,
    output_grad: FlexTensor,
    options: &ConvOptions<2>,
) -> FlexTensor {
    let x = x.to_contiguous();
    let dy = output_grad.to_contiguous();
    let w_shape = weight.layout().shape().clone();
    let g = Geometry::new(x.layout().shape(), &w_shape, dy.layout().shape(), options);
    let (xs, dys) = (x.storage::<T>(), dy.storage::<T>());
    let dw = if g.depthwise() {
        depthwise_weight_grad(&g, xs, dys)
    } else {
        gemm_weight_grad(&g, xs, dys)
    };
    FlexTensor::new(
        Bytes::from_elems(dw),
        Layout::contiguous(w_shape),
        T::dtype(),
    )
}

fn input_grad<T: Element + bytemuck::Pod + Float + 'static>(
    x: FlexTensor,
    weight: FlexTensor,
    output_grad: FlexTensor,
    options: &ConvOptions<2>,
) -> FlexTensor {
    let weight = weight.to_contiguous();
    let dy = output_grad.to_contiguous();
    let x_shape = x.layout().shape().clone();
    let g = Geometry::new(
        &x_shape,
        weight.layout().shape(),
        dy.layout().shape(),
        options,
    );
    let (ws, dys) = (weight.storage::<T>(), dy.storage::<T>());
    let dx = if g.depthwise() {
        depthwise_input_grad(&g, ws, dys)
    } else {
        gemm_input_grad(&g, ws, dys)
    };
    FlexTensor::new(
        Bytes::from_elems(dx),
        Layout::contiguous(x_shape),
        T::dtype(),
    )
}

/// Unfolds channels `c0..c0 + channels` of one image (NCHW, `img`) into `col`:
/// rows (channel, kernel row, kernel column), columns the output positions.
fn im2col<T: Float>(g: &Geometry, img: &[T], c0: usize, channels: usize, col: &mut [T]) {
    let (plane, out_hw) = (g.in_h * g.in_w, g.out_h * g.out_w);
    for c in 0..channels {
        let src = &img[(c0 + c) * plane..(c0 + c + 1) * plane];
        for kh in 0..g.k_h {
            for kw in 0..g.k_w {
                let row = (c * g.k_h + kh) * g.k_w + kw;
                let dst = &mut col[row * out_hw..(row + 1) * out_hw];
                let (lo, hi) = g.out_cols(kw);
                for oh in 0..g.out_h {
                    let out = &mut dst[oh * g.out_w..(oh + 1) * g.out_w];
                    let Some(ih) = g.in_row(oh, kh) else {
                        out.fill(T::zero());
                        continue;
                    };
                    out[..lo].fill(T::zero());
                    out[hi..].fill(T::zero());
                    let src_row = &src[ih * g.in_w..(ih + 1) * g.in_w];
                    if g.stride[1] == 1 {
                        let start = g.in_col(lo, kw);
                        out[lo..hi].copy_from_slice(&src_row[start..start + hi - lo]);
                    } else {
                        for (ow, v) in out[lo..hi].iter_mut().enumerate() {
                            *v = src_row[g.in_col(lo + ow, kw)];
                        }
                    }
                }
            }
        }
    }
}

/// Adds `col` (laid out as [`im2col`] writes it) back into channels `c0..c0 + channels` of one
/// image gradient.
fn col2im<T: Float>(g: &Geometry, col: &[T], c0: usize, channels: usize, img: &mut [T]) {
    let (plane, out_hw) = (g.in_h * g.in_w, g.out_h * g.out_w);
    for c in 0..channels {
        let dst = &mut img[(c0 + c) * plane..(c0 + c + 1) * plane];
        for kh in 0..g.k_h {
            for kw in 0..g.k_w {
                let row = (c * g.k_h + kh) * g.k_w + kw;
                let src = &col[row * out_hw..(row + 1) * out_hw];
                let (lo, hi) = g.out_cols(kw);
                for oh in 0..g.out_h {
                    let Some(ih) = g.in_row(oh, kh) else {
                        continue;
                    };
                    scatter_add(
                        g,
                        kw,
                        T::one(),
                        &src[oh * g.out_w..],
                        &mut dst[ih * g.in_w..(ih + 1) * g.in_w],
                        lo,
                        hi,
                    );
                }
            }
        }
    }
}

/// `dst[in_col(o)] += a · src[o]` for output columns `o` in `[lo, hi)`.
#[inline]
fn scatter_add<T: Float>(
    g: &Geometry,
    kw: usize,
    a: T,
    src: &[T],
    dst: &mut [T],
    lo: usize,
    hi: usize,
) {
    if lo >= hi {
        return;
    }
    if g.stride[1] == 1 {
        let start = g.in_col(lo, kw);
        for (d, &s) in dst[start..start + hi - lo].iter_mut().zip(&src[lo..hi]) {
            *d = *d + a * s;
        }
    } else {
        for (o, &s) in src[lo..hi].iter().enumerate() {
            let d = &mut dst[g.in_col(lo + o, kw)];
            *d = *d + a * s;
        }
    }
}

/// `dW_g = Σ_b dY_{b,g} · im2col(X_{b,g})ᵀ`, images in order.
fn gemm_weight_grad<T: Element + bytemuck::Pod + Float + 'static>(
    g: &Geometry,
    x: &[T],
    dy: &[T],
) -> Vec<T> {
    let (cin_g, cout_g) = (g.in_per_group(), g.out_per_group());
    let rows = cin_g * g.k_h * g.k_w;
    let out_hw = g.out_h * g.out_w;
    let mut dw = vec![T::zero(); g.c_out * rows];
    let mut col = vec![T::zero(); rows * out_hw];
    for b in 0..g.batch {
        let img = &x[b * g.c_in * g.in_h * g.in_w..(b + 1) * g.c_in * g.in_h * g.in_w];
        for grp in 0..g.groups {
            im2col(g, img, grp * cin_g, cin_g, &mut col);
            let dy_g = &dy[(b * g.c_out + grp * cout_g) * out_hw..];
            let dw_g = &mut dw[grp * cout_g * rows..(grp + 1) * cout_g * rows];
            // SAFETY: dst is cout_g × rows (row-major), lhs cout_g × out_hw (row-major) inside
            // dy, rhs the transpose of col (rows × out_hw, row-major); all in bounds.
            unsafe {
                gemm::gemm(
                    cout_g,
                    rows,
                    out_hw,
                    dw_g.as_mut_ptr(),
                    1,
                    rows as isize,
                    true,
                    dy_g.as_ptr(),
                    1,
                    out_hw as isize,
                    col.as_ptr(),
                    out_hw as isize,
                    1,
                    T::one(),
                    T::one(),
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        }
    }
    dw
}

/// `dX_{b,g} = col2im(W_gᵀ · dY_{b,g})`.
fn gemm_input_grad<T: Element + bytemuck::Pod + Float + 'static>(
    g: &Geometry,
    w: &[T],
    dy: &[T],
) -> Vec<T> {
    let (cin_g, cout_g) = (g.in_per_group(), g.out_per_group());
    let rows = cin_g * g.k_h * g.k_w;
    let out_hw = g.out_h * g.out_w;
    let image = g.c_in * g.in_h * g.in_w;
    let mut dx = vec![T::zero(); g.batch * image];
    let mut col = vec![T::zero(); rows * out_hw];
    for b in 0..g.batch {
        for grp in 0..g.groups {
            let w_g = &w[grp * cout_g * rows..(grp + 1) * cout_g * rows];
            let dy_g = &dy[(b * g.c_out + grp * cout_g) * out_hw..];
            // SAFETY: dst is rows × out_hw (row-major), lhs the transpose of w_g (cout_g × rows,
            // row-major), rhs cout_g × out_hw (row-major) inside dy; all in bounds.
            unsafe {
                gemm::gemm(
                    rows,
                    out_hw,
                    cout_g,
                    col.as_mut_ptr(),
                    1,
                    out_hw as isize,
                    false,
                    w_g.as_ptr(),
                    rows as isize,
                    1,
                    dy_g.as_ptr(),
                    1,
                    out_hw as isize,
                    T::zero(),
                    T::one(),
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            col2im(
                g,
                &col,
                grp * cin_g,
                cin_g,
                &mut dx[b * image..(b + 1) * image],
            );
        }
    }
    dx
}

/// Depthwise weight gradient: per channel and kernel tap, the sum over images and output rows
/// of a dot product along the row, in eight partial sums so that it vectorises.
fn depthwise_weight_grad<T: Float>(g: &Geometry, x: &[T], dy: &[T]) -> Vec<T> {
    let (plane, out_hw, taps) = (g.in_h * g.in_w, g.out_h * g.out_w, g.k_h * g.k_w);
    let mut dw = vec![T::zero(); g.c_out * taps];
    for c in 0..g.c_out {
        for kh in 0..g.k_h {
            for kw in 0..g.k_w {
                let (lo, hi) = g.out_cols(kw);
                let mut acc = [T::zero(); 8];
                for b in 0..g.batch {
                    let xp = &x[(b * g.c_in + c) * plane..(b * g.c_in + c + 1) * plane];
                    let dyp = &dy[(b * g.c_out + c) * out_hw..(b * g.c_out + c + 1) * out_hw];
                    for oh in 0..g.out_h {
                        let Some(ih) = g.in_row(oh, kh) else {
                            continue;
                        };
                        if lo >= hi {
                            continue;
                        }
                        let d = &dyp[oh * g.out_w + lo..oh * g.out_w + hi];
                        let xr = &xp[ih * g.in_w..(ih + 1) * g.in_w];
                        if g.stride[1] == 1 {
                            let start = g.in_col(lo, kw);
                            dot_into(&mut acc, d, &xr[start..start + hi - lo]);
                        } else {
                            for (o, &v) in d.iter().enumerate() {
                                acc[o % 8] = acc[o % 8] + v * xr[g.in_col(lo + o, kw)];
                            }
                        }
                    }
                }
                dw[c * taps + kh * g.k_w + kw] = acc.iter().fold(T::zero(), |s, &v| s + v);
            }
        }
    }
    dw
}

/// `acc[i % 8] += a[i] · b[i]`.
#[inline]
fn dot_into<T: Float>(acc: &mut [T; 8], a: &[T], b: &[T]) {
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (ra, rb) in (&mut ca).zip(&mut cb) {
        for i in 0..8 {
            acc[i] = acc[i] + ra[i] * rb[i];
        }
    }
    for (i, (&va, &vb)) in ca.remainder().iter().zip(cb.remainder()).enumerate() {
        acc[i] = acc[i] + va * vb;
    }
}

/// Depthwise input gradient: per channel and kernel tap, each output row's gradient scaled by
/// the tap's weight and added to the input row it read.
fn depthwise_input_grad<T: Float>(g: &Geometry, w: &[T], dy: &[T]) -> Vec<T> {
    let (plane, out_hw, taps) = (g.in_h * g.in_w, g.out_h * g.out_w, g.k_h * g.k_w);
    let mut dx = vec![T::zero(); g.batch * g.c_in * plane];
    for b in 0..g.batch {
        for c in 0..g.c_in {
            let dxp = &mut dx[(b * g.c_in + c) * plane..(b * g.c_in + c + 1) * plane];
            let dyp = &dy[(b * g.c_out + c) * out_hw..(b * g.c_out + c + 1) * out_hw];
            for kh in 0..g.k_h {
                for kw in 0..g.k_w {
                    let a = w[c * taps + kh * g.k_w + kw];
                    let (lo, hi) = g.out_cols(kw);
                    for oh in 0..g.out_h {
                        let Some(ih) = g.in_row(oh, kh) else {
                            continue;
                        };
                        scatter_add(
                            g,
                            kw,
                            a,
                            &dyp[oh * g.out_w..],
                            &mut dxp[ih * g.in_w..(ih + 1) * g.in_w],
                            lo,
                            hi,
                        );
                    }
                }
            }
        }
    }
    dx
}
