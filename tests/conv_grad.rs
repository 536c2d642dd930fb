//! 2D convolution gradients of the training backend (vendor/burn-flex's im2col + GEMM and
//! depthwise kernels) against the definition, summed in f64: every stride, padding, dilation and
//! grouping the models use, plus edge cases (padding wider than the kernel's reach, rows shorter
//! than a vector, a permuted input).

use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Distribution, Tensor};
use densekd::backend::Training;

type B = Training;

/// One convolution's shapes and options.
#[derive(Debug, Clone, Copy)]
struct Case {
    batch: usize,
    c_in: usize,
    c_out: usize,
    h: usize,
    w: usize,
    k: [usize; 2],
    stride: [usize; 2],
    pad: [usize; 2],
    dil: [usize; 2],
    groups: usize,
}

fn case(
    c_in: usize,
    c_out: usize,
    hw: [usize; 2],
    k: usize,
    stride: usize,
    pad: usize,
    dil: usize,
    groups: usize,
) -> Case {
    Case {
        batch: 2,
        c_in,
        c_out,
        h: hw[0],
        w: hw[1],
        k: [k, k],
        stride: [stride, stride],
        pad: [pad, pad],
        dil: [dil, dil],
        groups,
    }
}

fn out_size(c: &Case, d: usize, n: usize) -> usize {
    (n + 2 * c.pad[d] - c.dil[d] * (c.k[d] - 1) - 1) / c.stride[d] + 1
}

/// Gradients of `Σ conv2d(x, w) · r` with respect to x and w, by the definition.
fn reference(c: &Case, x: &[f32], w: &[f32], r: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let (oh_n, ow_n) = (out_size(c, 0, c.h), out_size(c, 1, c.w));
    let (cin_g, cout_g) = (c.c_in / c.groups, c.c_out / c.groups);
    let mut dx = vec![0.0f64; x.len()];
    let mut dw = vec![0.0f64; w.len()];
    for b in 0..c.batch {
        for co in 0..c.c_out {
            let grp = co / cout_g;
            for oh in 0..oh_n {
                for ow in 0..ow_n {
                    let g = r[((b * c.c_out + co) * oh_n + oh) * ow_n + ow] as f64;
                    for ci in 0..cin_g {
                        let cx = grp * cin_g + ci;
                        for kh in 0..c.k[0] {
                            for kw in 0..c.k[1] {
                                let ih =
                                    (oh * c.stride[0] + kh * c.dil[0]) as isize - c.pad[0] as isize;
                                let iw =
                                    (ow * c.stride[1] + kw * c.dil[1]) as isize - c.pad[1] as isize;
                                if ih < 0 || iw < 0 || ih >= c.h as isize || iw >= c.w as isize {
                                    continue;
                                }
                                let xi =
                                    ((b * c.c_in + cx) * c.h + ih as usize) * c.w + iw as usize;
                                let wi = ((co * cin_g + ci) * c.k[0] + kh) * c.k[1] + kw;
                                dx[xi] += g * w[wi] as f64;
                                dw[wi] += g * x[xi] as f64;
                            }
                        }
                    }
                }
            }
        }
    }
    (dx, dw)
}

fn assert_close(name: &str, c: &Case, got: &[f32], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{name} length, {c:?}");
    let scale = want.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
    for (i, (&g, &e)) in got.iter().zip(want).enumerate() {
        assert!(
            (g as f64 - e).abs() <= 1e-5 * scale,
            "{name}[{i}] = {g}, expected {e} (scale {scale}), {c:?}"
        );
    }
}

fn check(c: Case, permuted_input: bool) {
    let device = Default::default();
    let x: Tensor<B, 4> = if permuted_input {
        // Same values, stored as NHWC and viewed as NCHW: a non-contiguous input.
        Tensor::<B, 4>::random(
            [c.batch, c.h, c.w, c.c_in],
            Distribution::Normal(0.0, 1.0),
            &device,
        )
        .permute([0, 3, 1, 2])
    } else {
        Tensor::random(
            [c.batch, c.c_in, c.h, c.w],
            Distribution::Normal(0.0, 1.0),
            &device,
        )
    };
    let x = x.detach().require_grad();
    let w = Tensor::<B, 4>::random(
        [c.c_out, c.c_in / c.groups, c.k[0], c.k[1]],
        Distribution::Normal(0.0, 1.0),
        &device,
    )
    .require_grad();
    let options = ConvOptions::new(c.stride, c.pad, c.dil, c.groups);
    let y = conv2d(x.clone(), w.clone(), None, options);
    let r = Tensor::<B, 4>::random(y.shape(), Distribution::Normal(0.0, 1.0), &device);
    let grads = (y * r.clone()).sum().backward();
    let dx = x
        .grad(&grads)
        .expect("x gradient")
        .into_data()
        .to_vec::<f32>()
        .expect("f32");
    let dw = w
        .grad(&grads)
        .expect("w gradient")
        .into_data()
        .to_vec::<f32>()
        .expect("f32");
    let xv = x.into_data().to_vec::<f32>().expect("f32");
    let wv = w.into_data().to_vec::<f32>().expect("f32");
    let rv = r.into_data().to_vec::<f32>().expect("f32");
    let (ex, ew) = reference(&c, &xv, &wv, &rv);
    assert_close("dx", &c, &dx, &ex);
    assert_close("dw", &c, &dw, &ew);
}

#[test]
fn dense_convolutions_match_the_definition() {
    for c in [
        case(3, 4, [7, 6], 3, 1, 1, 1, 1),
        case(3, 5, [9, 8], 3, 2, 1, 1, 1),
        case(4, 3, [10, 11], 3, 1, 2, 2, 1),
        case(3, 4, [17, 15], 7, 2, 3, 1, 1),
        case(6, 4, [9, 9], 1, 2, 0, 1, 1),
        case(4, 6, [8, 7], 3, 1, 1, 1, 2),
        case(2, 3, [2, 3], 3, 1, 2, 1, 1),
        case(5, 2, [20, 19], 5, 3, 4, 2, 1),
    ] {
        check(c, false);
    }
}

#[test]
fn depthwise_convolutions_match_the_definition() {
    for c in [
        case(5, 5, [16, 19], 3, 1, 1, 1, 5),
        case(4, 4, [17, 16], 3, 2, 1, 1, 4),
        case(3, 3, [16, 21], 3, 1, 2, 2, 3),
        case(3, 3, [5, 4], 5, 1, 4, 1, 3),
        case(2, 2, [12, 13], 3, 2, 6, 3, 2),
        // A channel multiplier of 2: grouped, but not depthwise.
        case(3, 6, [9, 10], 3, 1, 1, 1, 3),
    ] {
        check(c, false);
    }
}

#[test]
fn non_contiguous_inputs_match_the_definition() {
    check(case(3, 4, [7, 9], 3, 2, 1, 1, 1), true);
    check(case(4, 4, [11, 10], 3, 1, 1, 1, 4), true);
}
