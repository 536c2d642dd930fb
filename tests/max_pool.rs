//! 2D max pooling of the training and inference backends (vendor/burn-flex's plane-by-plane
//! kernel) against the definition: the first maximum of each window in kernel-row-major order,
//! for the value and for where the gradient goes, with many ties (small integer values, as
//! after a ReLU), padding, strides, dilation and ceil mode, and equal bits for any thread count.

use burn::tensor::module::{max_pool2d, max_pool2d_with_indices};
use burn::tensor::{Int, Tensor, TensorData};
use densekd::backend::{with_op_threads, Inference, Training};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// `[N, C, H, W]`, kernel, stride, padding, dilation, ceil mode.
type Case = ([usize; 4], usize, usize, usize, usize, bool);

const CASES: [Case; 6] = [
    ([2, 3, 12, 11], 3, 2, 1, 1, false),
    ([1, 2, 9, 9], 2, 2, 0, 1, true),
    ([2, 2, 10, 7], 3, 1, 1, 2, false),
    ([1, 1, 5, 6], 3, 3, 1, 1, true),
    ([1, 2, 4, 4], 4, 1, 2, 1, false),
    // Large enough for the kernel to split its planes over threads.
    ([8, 64, 56, 56], 3, 2, 1, 1, false),
];

/// The definition: per output, the first maximum in (kh, kw) order, and its index ih·W + iw.
fn reference(x: &[f32], (shape, k, s, p, d, ceil): Case) -> (Vec<f32>, Vec<i64>, [usize; 2]) {
    let [n, c, h, w] = shape;
    let size = |len: usize| {
        let span = len + 2 * p - d * (k - 1) - 1;
        match ceil {
            true => span.div_ceil(s) + 1,
            false => span / s + 1,
        }
    };
    let (oh_n, ow_n) = (size(h), size(w));
    let (mut values, mut indices) = (Vec::new(), Vec::new());
    for plane in x.chunks(h * w).take(n * c) {
        for oh in 0..oh_n {
            for ow in 0..ow_n {
                let mut best: Option<(f32, i64)> = None;
                for kh in 0..k {
                    for kw in 0..k {
                        let ih = (oh * s + kh * d) as isize - p as isize;
                        let iw = (ow * s + kw * d) as isize - p as isize;
                        if ih < 0 || iw < 0 || ih >= h as isize || iw >= w as isize {
                            continue;
                        }
                        let at = ih * w as isize + iw;
                        let v = plane[at as usize];
                        if best.is_none_or(|(b, _)| v > b) {
                            best = Some((v, at as i64));
                        }
                    }
                }
                let (v, at) = best.unwrap_or((f32::NEG_INFINITY, -1));
                values.push(v);
                indices.push(at);
            }
        }
    }
    (values, indices, [oh_n, ow_n])
}

fn input(shape: [usize; 4], seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let len = shape.iter().product();
    (0..len).map(|_| rng.random_range(0..4) as f32).collect()
}

#[test]
fn max_pooling_takes_the_first_maximum_of_each_window() {
    let device = Default::default();
    for (i, case) in CASES.into_iter().enumerate() {
        let (shape, k, s, p, d, ceil) = case;
        let x = input(shape, i as u64);
        let (values, indices, [oh, ow]) = reference(&x, case);
        let out_shape = [shape[0], shape[1], oh, ow];
        let data = TensorData::new(x.clone(), shape);
        let train = Tensor::<Training, 4>::from_data(data.clone(), &device).require_grad();
        let (y, idx) = max_pool2d_with_indices(train.clone(), [k, k], [s, s], [p, p], [d, d], ceil);
        assert_eq!(y.dims(), out_shape, "case {i}");
        let host = |t: Tensor<Training, 4>| t.into_data().to_vec::<f32>().expect("f32");
        assert_eq!(host(y.clone()), values, "case {i}: values");
        let idx: Tensor<Training, 4, Int> = idx;
        let idx: Vec<i64> = idx.into_data().convert::<i64>().to_vec().expect("i64");
        assert_eq!(idx, indices, "case {i}: indices");
        // The gradient goes to the first maximum only.
        let grads = y.sum().backward();
        let grad = train.grad(&grads).expect("input gradient");
        let grad = grad.into_data().to_vec::<f32>().expect("f32");
        let mut expected = vec![0.0f32; x.len()];
        let per_plane = oh * ow;
        // An empty window (ceil mode past the input) has index −1 and passes no gradient.
        for (o, &at) in indices.iter().enumerate().filter(|(_, &at)| at >= 0) {
            expected[o / per_plane * shape[2] * shape[3] + at as usize] += 1.0;
        }
        assert_eq!(grad, expected, "case {i}: gradient");
        let plain = Tensor::<Inference, 4>::from_data(data, &device);
        let y = max_pool2d(plain, [k, k], [s, s], [p, p], [d, d], ceil);
        assert_eq!(
            y.into_data().to_vec::<f32>().expect("f32"),
            values,
            "case {i}: inference"
        );
    }
}

#[test]
fn max_pooling_does_not_depend_on_the_thread_count() {
    let device = Default::default();
    let (shape, k, s, p, d, ceil) = CASES[5];
    let x = Tensor::<Inference, 4>::from_data(TensorData::new(input(shape, 9), shape), &device);
    let run = |threads: usize| {
        with_op_threads(threads, || {
            let (y, idx) = max_pool2d_with_indices(x.clone(), [k, k], [s, s], [p, p], [d, d], ceil);
            (y.into_data(), idx.into_data())
        })
    };
    assert_eq!(run(1), run(3));
}
