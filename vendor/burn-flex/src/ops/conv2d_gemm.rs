//! densekd patch: 2D convolutions as im2col + GEMM on NCHW data, forward and backward.
//!
//! burn's default `conv2d_weight_backward` is one convolution of the swapped batch with the
//! output gradient as an (H_out × W_out) kernel: flex runs it as one narrow product per input
//! channel, each re-reading the whole output gradient, and for grouped convolutions one such
//! convolution per group. Here the weight gradient is one GEMM per image (batch) and group,
//! `dW_g += dY_g · im2col(X_g)ᵀ`, summed over the images in a fixed order, and the input
//! gradient `col2im(W_gᵀ · dY_g)`. Pointwise convolutions use the input as its own im2col.
//! Depthwise convolutions (one input and one output channel per group) skip im2col and GEMM:
//! direct loops on stride phases (`depthwise.rs`). Dense 3×3 stride-1 convolutions with enough
//! channels go through Winograd's F(2×2, 3×3) instead, forward and input gradient
//! (`winograd.rs`).
//!
//! The forward pass `Y_g = W_g · im2col(X_g)` writes each image's output rows in place; flex's
//! own path converts the input to NHWC and writes the product back transposed. All three passes
//! split their work over threads in fixed blocks (`threads.rs`).
//!
//! Small output maps (a ResNet's last stage: 7×7) make thin products: the GEMM re-packs the
//! whole weight for 49 columns, wastes a quarter of its 64-row tiles, and the weight gradient
//! reads and writes all of `dW` for a 49-long reduction. Such images are batched, a few per
//! product (their columns side by side, [`Geometry::images_per_gemm`]); the grouping depends on
//! the shapes only, so results stay independent of the thread count.

use alloc::vec;
use alloc::vec::Vec;
use burn_backend::ops::ConvOptions;
use burn_backend::ops::conv::calculate_conv_output_size;
use burn_backend::{DType, Element};
use burn_std::{Bytes, Shape};
use core::mem::MaybeUninit;
use num_traits::Float;

use crate::{FlexTensor, Layout};

use super::depthwise::{self, Depthwise};
use super::module::{cast_from_f32, cast_to_f32};
use super::norm::{NormAct, with_act};
use super::scratch::{Buffer, written_by};
use super::simd::gather;
use super::threads::{PASS_FLOPS, split_mut, split_mut_scratch};
use super::winograd::{self, Winograd};

/// Whether [`conv2d`] handles this convolution: every f32 and f64 one. Short reductions too: a
/// 3×3 RGB stem (27 products per output) runs 4× faster as a product than in flex's direct
/// kernel.
pub fn conv2d_applies(x: &FlexTensor) -> bool {
    matches!(x.dtype(), DType::F32 | DType::F64)
}

/// 2D convolution of an f32 or f64 tensor (see [`conv2d_applies`]).
pub fn conv2d(
    x: FlexTensor,
    weight: FlexTensor,
    bias: Option<FlexTensor>,
    options: &ConvOptions<2>,
) -> FlexTensor {
    match x.dtype() {
        DType::F32 => forward::<f32>(x, weight, bias, options, |y, b| y + b),
        DType::F64 => forward::<f64>(x, weight, bias, options, |y, b| y + b),
        dtype => panic!("conv2d: unsupported dtype {dtype:?}"),
    }
}

/// [`conv2d`] of an f32 tensor followed by `act`, applied to each output as its bias is added
/// (one pass over the output instead of two, the same values); `None` for other element types.
pub fn conv2d_act(
    x: FlexTensor,
    weight: FlexTensor,
    bias: FlexTensor,
    options: &ConvOptions<2>,
    act: NormAct,
) -> Option<FlexTensor> {
    (x.dtype() == DType::F32).then(|| {
        with_act!(act, |f, _keep| forward::<f32>(
            x,
            weight,
            Some(bias),
            options,
            |y, b| f(y + b)
        ))
    })
}

/// The convolution, then `epilogue(output, bias)` on every output when there is a bias.
fn forward<T: Element + bytemuck::Pod + Float + 'static>(
    x: FlexTensor,
    weight: FlexTensor,
    bias: Option<FlexTensor>,
    options: &ConvOptions<2>,
    epilogue: impl Fn(T, T) -> T,
) -> FlexTensor {
    let x = x.to_contiguous();
    let weight = weight.to_contiguous();
    let (x_shape, w_shape) = (x.layout().shape(), weight.layout().shape());
    let out_size = |d: usize| {
        calculate_conv_output_size(
            w_shape[2 + d],
            options.stride[d],
            options.padding[d],
            options.dilation[d],
            x_shape[2 + d],
        )
    };
    let out_shape = Shape::from(vec![x_shape[0], w_shape[0], out_size(0), out_size(1)]);
    let g = Geometry::new(x_shape, w_shape, &out_shape, options);
    let (xs, ws) = (x.storage::<T>(), weight.storage::<T>());
    let mut y = if g.depthwise() {
        depthwise::forward(&g.depthwise_layout(), xs, ws)
    } else if let Some(wg) = g.winograd() {
        winograd::forward(&wg, xs, ws)
    } else {
        gemm_forward(&g, xs, ws)
    };
    if let Some(bias) = bias {
        let bias = bias.to_contiguous();
        let bias = bias.storage::<T>();
        for (plane, y) in y.chunks_exact_mut(g.out_h * g.out_w).enumerate() {
            let b = bias[plane % g.c_out];
            y.iter_mut().for_each(|v| *v = epilogue(*v, b));
        }
    }
    FlexTensor::new(
        Bytes::from_elems(y),
        Layout::contiguous(out_shape),
        T::dtype(),
    )
}

/// `Y_{b,g} = W_g · im2col(X_{b,g})`, image batches in parallel.
fn gemm_forward<T: Element + bytemuck::Pod + Float + 'static>(
    g: &Geometry,
    xs: &[T],
    ws: &[T],
) -> Vec<T> {
    let (cin_g, cout_g) = (g.in_per_group(), g.out_per_group());
    let rows = cin_g * g.k_h * g.k_w;
    let out_hw = g.out_h * g.out_w;
    let ib = g.images_per_gemm();
    let out_image = g.c_out * out_hw;
    let batches = g.batch.div_ceil(ib);
    let product_len = g.batched_rows_len(ib);
    let scratch = Columns::<T>::len(g, ib) + product_len;
    // Each image's groups write all its outputs: their products, or copies of them.
    let write = |y: &mut [MaybeUninit<T>]| {
        split_mut_scratch(
            y,
            batches,
            ib * out_image,
            g.flops(),
            scratch,
            |range, y, scratch| {
                let (mut columns, product) = Columns::split(g, ib, scratch);
                for (batch, y) in range.zip(y.chunks_mut(ib * out_image)) {
                    let (b0, nb) = (batch * ib, ib.min(g.batch - batch * ib));
                    let n = nb * out_hw;
                    for grp in 0..g.groups {
                        let col = columns.of(g, xs, b0, nb, grp * cin_g, cin_g);
                        let w_g = &ws[grp * cout_g * rows..(grp + 1) * cout_g * rows];
                        let dst = if nb == 1 {
                            y[grp * cout_g * out_hw..].as_mut_ptr().cast::<T>()
                        } else {
                            product.as_mut_ptr()
                        };
                        // SAFETY: each matrix lies inside its slice (shapes from the geometry).
                        unsafe {
                            gemm_into(
                                [cout_g, n, rows],
                                dst,
                                n as isize,
                                false,
                                (w_g.as_ptr(), 1, rows as isize),
                                (col.as_ptr(), 1, n as isize),
                            );
                        }
                        if nb > 1 {
                            for (c, row) in product[..cout_g * n].chunks(n).enumerate() {
                                for (i, part) in row.chunks(out_hw).enumerate() {
                                    let at = (i * g.c_out + grp * cout_g + c) * out_hw;
                                    for (d, &v) in y[at..at + out_hw].iter_mut().zip(part) {
                                        d.write(v);
                                    }
                                }
                            }
                        }
                    }
                }
            },
        )
    };
    // SAFETY: `write` writes every output.
    unsafe { written_by(g.batch * out_image, write) }
}

/// Output positions below which a product takes several images' columns.
const GEMM_COLUMNS: usize = 512;

/// The most images one product takes.
const MAX_IMAGES_PER_GEMM: usize = 4;

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

    /// Multiply-adds of the forward pass (each gradient costs about as much).
    fn flops(&self) -> usize {
        self.batch
            * self.c_out
            * self.out_h
            * self.out_w
            * self.in_per_group()
            * self.k_h
            * self.k_w
    }

    /// Elements of a buffer for the output-channel rows of one group over `images` images
    /// side by side; none for one image, whose rows are used in place.
    fn batched_rows_len(&self, images: usize) -> usize {
        if images > 1 {
            self.out_per_group() * images * self.out_h * self.out_w
        } else {
            0
        }
    }

    /// Images per GEMM: as many as bring a product to about [`GEMM_COLUMNS`] output positions,
    /// at most [`MAX_IMAGES_PER_GEMM`] (so a batch of 8 still splits over cores).
    fn images_per_gemm(&self) -> usize {
        (GEMM_COLUMNS / (self.out_h * self.out_w).max(1)).clamp(1, MAX_IMAGES_PER_GEMM)
    }

    /// 1×1, stride 1, no padding: the input already is its own im2col.
    fn pointwise(&self) -> bool {
        self.k_h == 1 && self.k_w == 1 && self.stride == [1, 1] && self.pad == [0, 0]
    }

    fn depthwise(&self) -> bool {
        self.in_per_group() == 1 && self.out_per_group() == 1
    }

    fn depthwise_layout(&self) -> Depthwise {
        Depthwise::new(
            self.batch,
            self.c_out,
            [self.in_h, self.in_w],
            [self.out_h, self.out_w],
            [self.k_h, self.k_w],
            self.stride,
            self.pad,
            self.dil,
        )
    }

    /// The Winograd layout, where F(2×2, 3×3) computes this convolution (never an empty one).
    fn winograd(&self) -> Option<Winograd> {
        let empty = self.batch == 0 || self.out_h == 0 || self.out_w == 0;
        (!empty
            && Winograd::applies(
                self.c_in,
                self.c_out,
                [self.k_h, self.k_w],
                self.stride,
                self.pad,
                self.dil,
                self.groups,
            ))
        .then_some(Winograd {
            batch: self.batch,
            c_in: self.c_in,
            c_out: self.c_out,
            input: [self.in_h, self.in_w],
            pad: self.pad,
        })
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
        depthwise::weight_grad(&g.depthwise_layout(), xs, dys)
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
        depthwise::input_grad(&g.depthwise_layout(), ws, dys)
    } else if let Some(wg) = g.winograd() {
        winograd::input_grad(&wg, ws, dys)
    } else {
        gemm_input_grad(&g, ws, dys)
    };
    FlexTensor::new(
        Bytes::from_elems(dx),
        Layout::contiguous(x_shape),
        T::dtype(),
    )
}

/// `dst = (read_dst ? dst : 0) + lhs · rhs` for an `m × n` row-major `dst` with row stride
/// `dst_rs`; `lhs` (m × k) and `rhs` (k × n) are given as (pointer, column stride, row stride).
///
/// # Safety
/// The three buffers must hold every element their strides reach.
#[allow(clippy::type_complexity)]
pub(super) unsafe fn gemm_into<T: 'static + Float>(
    [m, n, k]: [usize; 3],
    dst: *mut T,
    dst_rs: isize,
    read_dst: bool,
    (lhs, lhs_cs, lhs_rs): (*const T, isize, isize),
    (rhs, rhs_cs, rhs_rs): (*const T, isize, isize),
) {
    // SAFETY: the caller guarantees the extents.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs,
            read_dst,
            lhs,
            lhs_cs,
            lhs_rs,
            rhs,
            rhs_cs,
            rhs_rs,
            if read_dst { T::one() } else { T::zero() },
            T::one(),
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// One thread's im2col buffer, for up to `images` images side by side.
struct Columns<'b, T> {
    buf: &'b mut [T],
}

impl<'b, T: Float> Columns<'b, T> {
    /// The buffer's elements: none for a single pointwise image (its input is its matrix).
    fn len(g: &Geometry, images: usize) -> usize {
        if g.pointwise() && images == 1 {
            0
        } else {
            g.in_per_group() * g.k_h * g.k_w * images * g.out_h * g.out_w
        }
    }

    /// The first [`Columns::len`] elements of `scratch` as the buffer, and the rest.
    fn split(g: &Geometry, images: usize, scratch: &'b mut [T]) -> (Self, &'b mut [T]) {
        let (buf, rest) = scratch.split_at_mut(Self::len(g, images));
        (Self { buf }, rest)
    }

    /// The im2col matrix of channels `c0..c0 + channels` of images `b0..b0 + nb` of `x`, their
    /// columns side by side: a single image's own rows for a pointwise convolution.
    fn of<'a>(
        &'a mut self,
        g: &Geometry,
        x: &'a [T],
        b0: usize,
        nb: usize,
        c0: usize,
        channels: usize,
    ) -> &'a [T] {
        let image = g.c_in * g.in_h * g.in_w;
        if g.pointwise() && nb == 1 {
            return image_rows(x, (g.c_in, g.in_h * g.in_w), b0, 1, c0, channels, &mut []);
        }
        let n = nb * g.out_h * g.out_w;
        for i in 0..nb {
            let img = &x[(b0 + i) * image..(b0 + i + 1) * image];
            im2col(g, img, c0, channels, self.buf, n, i * g.out_h * g.out_w);
        }
        &self.buf[..channels * g.k_h * g.k_w * n]
    }
}

/// Rows `c0..c0 + channels` of images `b0..b0 + nb` of an NCHW tensor with `c` channels of
/// `hw` positions, as one `[channels, nb · hw]` matrix (copied into `buf` unless `nb` is 1).
#[allow(clippy::too_many_arguments)]
fn image_rows<'a, T: Copy>(
    t: &'a [T],
    (c, hw): (usize, usize),
    b0: usize,
    nb: usize,
    c0: usize,
    channels: usize,
    buf: &'a mut [T],
) -> &'a [T] {
    if nb == 1 {
        return &t[(b0 * c + c0) * hw..(b0 * c + c0 + channels) * hw];
    }
    let n = nb * hw;
    for (r, row) in buf[..channels * n].chunks_mut(n).enumerate() {
        for (i, part) in row.chunks_mut(hw).enumerate() {
            let at = ((b0 + i) * c + c0 + r) * hw;
            part.copy_from_slice(&t[at..at + hw]);
        }
    }
    &buf[..channels * n]
}

/// Unfolds channels `c0..c0 + channels` of one image (NCHW, `img`) into `col`: rows (channel,
/// kernel row, kernel column) `ld` apart, the image's output positions from column `off`.
fn im2col<T: Float>(
    g: &Geometry,
    img: &[T],
    c0: usize,
    channels: usize,
    col: &mut [T],
    ld: usize,
    off: usize,
) {
    let (plane, out_hw) = (g.in_h * g.in_w, g.out_h * g.out_w);
    for c in 0..channels {
        let src = &img[(c0 + c) * plane..(c0 + c + 1) * plane];
        for kh in 0..g.k_h {
            for kw in 0..g.k_w {
                let row = (c * g.k_h + kh) * g.k_w + kw;
                let dst = &mut col[row * ld + off..row * ld + off + out_hw];
                let (lo, hi) = g.out_cols(kw);
                for oh in 0..g.out_h {
                    let out = &mut dst[oh * g.out_w..(oh + 1) * g.out_w];
                    let Some(ih) = g.in_row(oh, kh) else {
                        out.fill(T::zero());
                        continue;
                    };
                    out[..lo].fill(T::zero());
                    out[hi..].fill(T::zero());
                    if lo < hi {
                        let src_row = &src[ih * g.in_w..(ih + 1) * g.in_w];
                        gather(&mut out[lo..hi], &src_row[g.in_col(lo, kw)..], g.stride[1]);
                    }
                }
            }
        }
    }
}

/// Adds `col` (laid out as [`im2col`] writes it: rows `ld` apart, this image's positions from
/// column `off`) back into channels `c0..c0 + channels` of one image gradient.
fn col2im<T: Float>(
    g: &Geometry,
    col: &[T],
    (ld, off): (usize, usize),
    c0: usize,
    channels: usize,
    img: &mut [T],
) {
    let (plane, out_hw) = (g.in_h * g.in_w, g.out_h * g.out_w);
    for c in 0..channels {
        let dst = &mut img[(c0 + c) * plane..(c0 + c + 1) * plane];
        for kh in 0..g.k_h {
            for kw in 0..g.k_w {
                let row = (c * g.k_h + kh) * g.k_w + kw;
                let src = &col[row * ld + off..row * ld + off + out_hw];
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

/// Output channels per group up to which the weight gradient is computed transposed (one
/// 64-row tile of gemm's kernel: with more, the unpacked im2col matrix is re-read per tile).
const TRANSPOSED_WEIGHT_GRAD_MAX_OUT: usize = 64;

/// Image blocks of the weight gradient: each block's images are summed in order, then the
/// blocks in order. A fixed count (not the thread count) keeps results machine-independent.
const WEIGHT_GRAD_BLOCKS: usize = 4;

/// `dW_g = Σ_b dY_{b,g} · im2col(X_{b,g})ᵀ`: image batches summed in order within each of
/// [`WEIGHT_GRAD_BLOCKS`] blocks (computed in parallel, the first product of a block written
/// rather than added), then the blocks in order from zero (split over output channels). With
/// few output channels a block accumulates `dW_gᵀ` (`[rows, C_out]`): gemm then packs `dY`
/// instead of transposing the whole im2col matrix into panels, and reads that unpacked once.
fn gemm_weight_grad<T: Element + bytemuck::Pod + Float + 'static>(
    g: &Geometry,
    x: &[T],
    dy: &[T],
) -> Vec<T> {
    let (cin_g, cout_g) = (g.in_per_group(), g.out_per_group());
    let rows = cin_g * g.k_h * g.k_w;
    let out_hw = g.out_h * g.out_w;
    let size = g.c_out * rows;
    let ib = g.images_per_gemm();
    let per_block = g.batch.div_ceil(WEIGHT_GRAD_BLOCKS.min(g.batch));
    // Blocks with images only: an empty one would add zero.
    let blocks = g.batch.div_ceil(per_block);
    let transposed = cout_g <= TRANSPOSED_WEIGHT_GRAD_MAX_OUT;
    let mut partial = Buffer::take(blocks * size);
    let partial = partial.as_mut();
    let dy_len = g.batched_rows_len(ib);
    let scratch = Columns::<T>::len(g, ib) + dy_len;
    split_mut_scratch(
        partial,
        blocks,
        size,
        g.flops(),
        scratch,
        |blocks, dw_blocks, scratch| {
            let (mut columns, dy_buf) = Columns::split(g, ib, scratch);
            for (blk, dw) in blocks.zip(dw_blocks.chunks_mut(size)) {
                let (start, end) = (blk * per_block, ((blk + 1) * per_block).min(g.batch));
                for b0 in (start..end).step_by(ib) {
                    let nb = ib.min(end - b0);
                    let n = nb * out_hw;
                    for grp in 0..g.groups {
                        let col = columns.of(g, x, b0, nb, grp * cin_g, cin_g);
                        let dy_g = image_rows(
                            dy,
                            (g.c_out, out_hw),
                            b0,
                            nb,
                            grp * cout_g,
                            cout_g,
                            &mut *dy_buf,
                        );
                        let dw_g = &mut dw[grp * cout_g * rows..(grp + 1) * cout_g * rows];
                        let add = b0 > start;
                        // SAFETY: each matrix lies inside its slice (shapes from the geometry).
                        unsafe {
                            if transposed {
                                gemm_into(
                                    [rows, cout_g, n],
                                    dw_g.as_mut_ptr(),
                                    cout_g as isize,
                                    add,
                                    (col.as_ptr(), 1, n as isize),
                                    (dy_g.as_ptr(), n as isize, 1),
                                );
                            } else {
                                gemm_into(
                                    [cout_g, rows, n],
                                    dw_g.as_mut_ptr(),
                                    rows as isize,
                                    add,
                                    (dy_g.as_ptr(), 1, n as isize),
                                    (col.as_ptr(), n as isize, 1),
                                );
                            }
                        }
                    }
                }
            }
        },
    );
    // Each output channel's row summed over the blocks in order (each group's `dW_gᵀ`
    // transposed back).
    let partial = &*partial;
    let mut dw = vec![T::zero(); size];
    split_mut(
        &mut dw,
        g.c_out,
        rows,
        blocks * size * PASS_FLOPS,
        |channels, dw| {
            for (co, d) in channels.zip(dw.chunks_exact_mut(rows)) {
                let (grp, c) = (co / cout_g, co % cout_g);
                for block in partial.chunks_exact(size) {
                    let block = &block[grp * cout_g * rows..(grp + 1) * cout_g * rows];
                    if transposed {
                        for (r, d) in d.iter_mut().enumerate() {
                            *d = *d + block[r * cout_g + c];
                        }
                    } else {
                        for (d, &v) in d.iter_mut().zip(&block[c * rows..(c + 1) * rows]) {
                            *d = *d + v;
                        }
                    }
                }
            }
        },
    );
    dw
}

/// `dX_{b,g} = col2im(W_gᵀ · dY_{b,g})`, image batches in parallel.
fn gemm_input_grad<T: Element + bytemuck::Pod + Float + 'static>(
    g: &Geometry,
    w: &[T],
    dy: &[T],
) -> Vec<T> {
    let (cin_g, cout_g) = (g.in_per_group(), g.out_per_group());
    let rows = cin_g * g.k_h * g.k_w;
    let out_hw = g.out_h * g.out_w;
    let image = g.c_in * g.in_h * g.in_w;
    let ib = g.images_per_gemm();
    let mut dx = vec![T::zero(); g.batch * image];
    let batches = g.batch.div_ceil(ib);
    // A single pointwise image's columns are its input gradient itself.
    let direct = g.pointwise() && ib == 1;
    let col_len = if direct { 0 } else { rows * ib * out_hw };
    let dy_len = g.batched_rows_len(ib);
    let scratch = col_len + dy_len;
    split_mut_scratch(
        &mut dx,
        batches,
        ib * image,
        g.flops(),
        scratch,
        |range, dx, scratch| {
            let (col, dy_buf) = scratch.split_at_mut(col_len);
            for (batch, dx) in range.zip(dx.chunks_mut(ib * image)) {
                let (b0, nb) = (batch * ib, ib.min(g.batch - batch * ib));
                let n = nb * out_hw;
                for grp in 0..g.groups {
                    let w_g = &w[grp * cout_g * rows..(grp + 1) * cout_g * rows];
                    let dy_g = image_rows(
                        dy,
                        (g.c_out, out_hw),
                        b0,
                        nb,
                        grp * cout_g,
                        cout_g,
                        &mut *dy_buf,
                    );
                    let dst = if direct {
                        &mut dx[grp * rows * out_hw..(grp + 1) * rows * out_hw]
                    } else {
                        &mut col[..rows * n]
                    };
                    // SAFETY: each matrix lies inside its slice (shapes from the geometry).
                    unsafe {
                        gemm_into(
                            [rows, n, cout_g],
                            dst.as_mut_ptr(),
                            n as isize,
                            false,
                            (w_g.as_ptr(), rows as isize, 1),
                            (dy_g.as_ptr(), 1, n as isize),
                        );
                    }
                    if !direct {
                        for (i, dx) in dx.chunks_mut(image).take(nb).enumerate() {
                            col2im(g, col, (n, i * out_hw), grp * cin_g, cin_g, dx);
                        }
                    }
                }
            }
        },
    );
    dx
}
