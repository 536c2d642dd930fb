//! 2D convolutions of the training backend (vendor/burn-flex's im2col + GEMM and depthwise
//! kernels), output and both gradients, against the definition summed in f64: every stride,
//! padding, dilation and grouping the models use, plus edge cases (padding wider than the
//! kernel's reach, rows shorter than a vector, a permuted input), and equal bits for any thread
//! count.

use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Tensor, TensorData};
use densekd::backend::Training;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

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

/// `[c_in, c_out, h, w, kernel, stride, padding, dilation, groups]`, batch 2.
fn case([c_in, c_out, h, w, k, stride, pad, dil, groups]: [usize; 9]) -> Case {
    Case {
        batch: 2,
        c_in,
        c_out,
        h,
        w,
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

/// `y = conv2d(x, w) + bias` and the gradients of `Σ y · r` with respect to x and w, by the
/// definition.
fn reference(c: &Case, x: &[f32], w: &[f32], bias: &[f32], r: &[f32]) -> [Vec<f64>; 3] {
    let (oh_n, ow_n) = (out_size(c, 0, c.h), out_size(c, 1, c.w));
    let (cin_g, cout_g) = (c.c_in / c.groups, c.c_out / c.groups);
    let mut dx = vec![0.0f64; x.len()];
    let mut dw = vec![0.0f64; w.len()];
    let mut y = vec![0.0f64; r.len()];
    for b in 0..c.batch {
        for (co, &bias_co) in bias.iter().enumerate() {
            let grp = co / cout_g;
            for oh in 0..oh_n {
                for ow in 0..ow_n {
                    let yi = ((b * c.c_out + co) * oh_n + oh) * ow_n + ow;
                    let g = r[yi] as f64;
                    y[yi] += bias_co as f64;
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
                                y[yi] += x[xi] as f64 * w[wi] as f64;
                                dx[xi] += g * w[wi] as f64;
                                dw[wi] += g * x[xi] as f64;
                            }
                        }
                    }
                }
            }
        }
    }
    [y, dx, dw]
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

/// Output and gradients of one convolution, checked against the definition.
fn check(c: Case, permuted_input: bool) -> [Vec<f32>; 3] {
    let device = Default::default();
    // Inputs from a fixed seed (not the backend's shared generator), so reruns see equal inputs.
    let mut rng = StdRng::seed_from_u64(7);
    let mut uniform =
        |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
    let x: Tensor<B, 4> = if permuted_input {
        // Stored as NHWC and viewed as NCHW: a non-contiguous input.
        let shape = [c.batch, c.h, c.w, c.c_in];
        Tensor::<B, 4>::from_data(
            TensorData::new(uniform(shape.iter().product()), shape),
            &device,
        )
        .permute([0, 3, 1, 2])
    } else {
        let shape = [c.batch, c.c_in, c.h, c.w];
        Tensor::from_data(
            TensorData::new(uniform(shape.iter().product()), shape),
            &device,
        )
    };
    let x = x.detach().require_grad();
    let w_shape = [c.c_out, c.c_in / c.groups, c.k[0], c.k[1]];
    let w = Tensor::<B, 4>::from_data(
        TensorData::new(uniform(w_shape.iter().product()), w_shape),
        &device,
    )
    .require_grad();
    let bias = Tensor::<B, 1>::from_data(TensorData::new(uniform(c.c_out), [c.c_out]), &device);
    let options = ConvOptions::new(c.stride, c.pad, c.dil, c.groups);
    let y = conv2d(x.clone(), w.clone(), Some(bias.clone()), options);
    let y_shape: [usize; 4] = y.dims();
    let r = Tensor::<B, 4>::from_data(
        TensorData::new(uniform(y_shape.iter().product()), y_shape),
        &device,
    );
    let grads = (y.clone() * r.clone()).sum().backward();
    let yv = y.into_data().to_vec::<f32>().expect("f32");
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
    let bv = bias.into_data().to_vec::<f32>().expect("f32");
    let [ey, ex, ew] = reference(&c, &xv, &wv, &bv, &rv);
    assert_close("y", &c, &yv, &ey);
    assert_close("dx", &c, &dx, &ex);
    assert_close("dw", &c, &dw, &ew);
    [yv, dx, dw]
}

#[test]
fn dense_convolutions_match_the_definition() {
    for c in [
        case([3, 4, 7, 6, 3, 1, 1, 1, 1]),
        case([8, 5, 9, 10, 3, 1, 1, 1, 1]),
        case([3, 5, 9, 8, 3, 2, 1, 1, 1]),
        case([4, 3, 10, 11, 3, 1, 2, 2, 1]),
        case([3, 4, 17, 15, 7, 2, 3, 1, 1]),
        case([6, 4, 9, 9, 1, 2, 0, 1, 1]),
        case([6, 5, 9, 7, 1, 1, 0, 1, 1]),
        case([6, 4, 5, 7, 1, 1, 0, 1, 2]),
        case([4, 6, 8, 7, 3, 1, 1, 1, 2]),
        case([2, 3, 2, 3, 3, 1, 2, 1, 1]),
        case([5, 2, 20, 19, 5, 3, 4, 2, 1]),
        // More than 64 output channels: the weight gradient is not computed transposed.
        case([4, 80, 6, 5, 3, 1, 1, 1, 1]),
        case([6, 160, 5, 6, 3, 1, 1, 1, 2]),
    ] {
        check(c, false);
    }
}

/// Dense 3×3, stride 1, at least 32 channels each way: Winograd's F(2×2, 3×3), forward and
/// input gradient. Odd output sizes (a half-filled last tile), every padding it takes, and
/// enough tiles that images are transformed in two chunks.
#[test]
fn winograd_convolutions_match_the_definition() {
    for c in [
        case([32, 32, 9, 11, 3, 1, 1, 1, 1]),
        case([40, 33, 8, 8, 3, 1, 0, 1, 1]),
        case([32, 36, 7, 6, 3, 1, 2, 1, 1]),
        Case {
            pad: [0, 2],
            ..case([33, 32, 6, 9, 3, 1, 1, 1, 1])
        },
        Case {
            batch: 3,
            ..case([32, 32, 80, 80, 3, 1, 1, 1, 1])
        },
    ] {
        check(c, false);
    }
}

#[test]
fn depthwise_convolutions_match_the_definition() {
    for c in [
        case([5, 5, 16, 19, 3, 1, 1, 1, 5]),
        case([4, 4, 17, 16, 3, 2, 1, 1, 4]),
        case([3, 3, 16, 21, 3, 1, 2, 2, 3]),
        case([3, 3, 5, 4, 5, 1, 4, 1, 3]),
        case([2, 2, 12, 13, 3, 2, 6, 3, 2]),
        // A channel multiplier of 2: grouped, but not depthwise.
        case([3, 6, 9, 10, 3, 1, 1, 1, 3]),
        // Every geometry different along the two axes, stride 3 (three phases), one image.
        Case {
            batch: 1,
            k: [3, 5],
            stride: [3, 2],
            pad: [2, 1],
            dil: [2, 1],
            ..case([4, 4, 14, 11, 3, 1, 1, 1, 4])
        },
        // Stride larger than the kernel: some inputs are read by no tap.
        Case {
            k: [2, 1],
            stride: [3, 4],
            pad: [0, 1],
            ..case([3, 3, 10, 13, 3, 1, 1, 1, 3])
        },
    ] {
        check(c, false);
    }
}

/// Small output maps put several images side by side in one product (4 at most, so a batch of
/// 7 makes products of 4 and 3 images, and weight-gradient blocks of 2 and 1).
#[test]
fn small_maps_batched_into_one_product_match_the_definition() {
    let batch7 = |c: Case| Case { batch: 7, ..c };
    for c in [
        case([8, 12, 7, 7, 3, 1, 1, 1, 1]),
        case([6, 8, 9, 8, 3, 2, 1, 1, 2]),
        case([6, 5, 5, 5, 1, 1, 0, 1, 1]),
        case([6, 4, 6, 6, 1, 2, 0, 1, 1]),
        case([4, 6, 4, 3, 3, 1, 2, 2, 1]),
    ] {
        check(batch7(c), false);
        check(batch7(c), true);
    }
}

#[test]
fn non_contiguous_inputs_match_the_definition() {
    check(case([3, 4, 7, 9, 3, 2, 1, 1, 1]), true);
    check(case([4, 4, 11, 10, 3, 1, 1, 1, 4]), true);
}

/// Large enough to be split over threads (images, image batches, channels, weight-gradient
/// blocks): one thread and several give the same bits.
#[test]
fn thread_count_does_not_change_results() {
    let large = |c: Case| Case { batch: 5, ..c };
    for c in [
        large(case([16, 16, 24, 24, 3, 1, 1, 1, 1])),
        large(case([32, 48, 24, 24, 3, 1, 1, 1, 1])),
        large(case([32, 48, 30, 30, 1, 1, 0, 1, 1])),
        large(case([64, 64, 40, 40, 3, 1, 1, 1, 64])),
        Case {
            batch: 7,
            ..case([64, 64, 7, 7, 3, 1, 1, 1, 1])
        },
    ] {
        let mut results = Vec::new();
        for threads in [1, 2, 3] {
            burn_flex::set_threads(threads);
            results.push(check(c, false));
        }
        burn_flex::set_threads(0);
        assert!(results.windows(2).all(|w| w[0] == w[1]), "{c:?}");
    }
}
