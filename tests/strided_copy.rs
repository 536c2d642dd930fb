//! Copies of strided tensors (vendor/burn-flex's tiled ND copy behind `to_contiguous`, and
//! binary ops on non-contiguous operands) against index arithmetic on the source data:
//! permutes of rank 3 to 6, slices at an offset, broadcast (zero-stride) dims, flips.

use burn::tensor::{Tensor, TensorData};
use densekd::backend::Inference;

type B = Inference;

/// Row-major strides of `shape`.
fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * shape[d + 1];
    }
    s
}

/// Every multi-index of `shape` in row-major order.
fn indices(shape: &[usize]) -> Vec<Vec<usize>> {
    let n: usize = shape.iter().product();
    let st = strides(shape);
    (0..n)
        .map(|k| shape.iter().zip(&st).map(|(&s, &t)| (k / t) % s).collect())
        .collect()
}

/// `x` (row-major `shape`) permuted by `perm`, as `Tensor::permute` defines it.
fn permuted(x: &[f32], shape: &[usize], perm: &[usize]) -> Vec<f32> {
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let st = strides(shape);
    indices(&out_shape)
        .iter()
        .map(|idx| {
            let src: usize = idx.iter().zip(perm).map(|(&i, &p)| i * st[p]).sum();
            x[src]
        })
        .collect()
}

fn values(n: usize) -> Vec<f32> {
    (0..n).map(|i| i as f32 * 0.5 - 7.0).collect()
}

fn data<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().expect("f32 data")
}

fn tensor<const D: usize>(x: &[f32], shape: [usize; D]) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(x.to_vec(), shape), &Default::default())
}

#[test]
fn permutes_copy_like_index_arithmetic() {
    let cases: [(&[usize], &[usize]); 7] = [
        (&[2, 3, 4], &[1, 0, 2]),
        (&[2, 3, 4, 5], &[0, 2, 1, 3]),
        (&[2, 3, 4, 5], &[3, 1, 0, 2]),
        (&[3, 1, 4, 5], &[2, 0, 3, 1]),
        (&[2, 17, 3, 19], &[0, 2, 1, 3]),
        (&[2, 3, 2, 4, 5], &[4, 2, 0, 3, 1]),
        (&[2, 2, 3, 2, 3, 2], &[5, 3, 1, 0, 2, 4]),
    ];
    for (shape, perm) in cases {
        let x = values(shape.iter().product());
        let want = permuted(&x, shape, perm);
        let got = match shape.len() {
            3 => data(
                tensor(&x, [shape[0], shape[1], shape[2]])
                    .permute([perm[0], perm[1], perm[2]])
                    .reshape([want.len()]),
            ),
            4 => data(
                tensor(&x, [shape[0], shape[1], shape[2], shape[3]])
                    .permute([perm[0], perm[1], perm[2], perm[3]])
                    .reshape([want.len()]),
            ),
            5 => data(
                tensor(&x, [shape[0], shape[1], shape[2], shape[3], shape[4]])
                    .permute([perm[0], perm[1], perm[2], perm[3], perm[4]])
                    .reshape([want.len()]),
            ),
            _ => data(
                tensor(
                    &x,
                    [shape[0], shape[1], shape[2], shape[3], shape[4], shape[5]],
                )
                .permute([perm[0], perm[1], perm[2], perm[3], perm[4], perm[5]])
                .reshape([want.len()]),
            ),
        };
        assert_eq!(got, want, "shape {shape:?} perm {perm:?}");
    }
}

#[test]
fn slices_broadcasts_and_flips_copy_like_index_arithmetic() {
    let shape = [3, 4, 5, 6];
    let x = values(shape.iter().product());
    // A slice at an offset, then a permute: positive strides, a start offset, no collapse.
    let got = data(
        tensor(&x, shape)
            .slice([1..3, 0..4, 2..5, 1..5])
            .permute([2, 0, 3, 1])
            .reshape([2 * 4 * 3 * 4]),
    );
    let st = strides(&shape);
    let want: Vec<f32> = indices(&[3, 2, 4, 4])
        .iter()
        .map(|i| x[(i[1] + 1) * st[0] + i[3] * st[1] + (i[0] + 2) * st[2] + (i[2] + 1) * st[3]])
        .collect();
    assert_eq!(got, want, "slice + permute");

    // A broadcast (zero-stride) dim between two real ones.
    let small = values(3 * 5);
    let got = data(
        tensor(&small, [3, 1, 5])
            .expand([3, 4, 5])
            .permute([2, 1, 0])
            .reshape([60]),
    );
    let want: Vec<f32> = indices(&[5, 4, 3])
        .iter()
        .map(|i| small[i[2] * 5 + i[0]])
        .collect();
    assert_eq!(got, want, "expand + permute");

    // Negative strides keep the general path.
    let got = data(
        tensor(&x, shape)
            .flip([1, 3])
            .permute([0, 2, 1, 3])
            .reshape([360]),
    );
    let want: Vec<f32> = indices(&[3, 5, 4, 6])
        .iter()
        .map(|i| x[i[0] * st[0] + (3 - i[2]) * st[1] + i[1] * st[2] + (5 - i[3]) * st[3]])
        .collect();
    assert_eq!(got, want, "flip + permute");
}

#[test]
fn binary_ops_on_permuted_operands() {
    let shape = [2, 3, 4, 5];
    let x = values(120);
    let y: Vec<f32> = values(120).iter().map(|v| v * v - 3.0).collect();
    let a = tensor(&x, shape).permute([0, 2, 1, 3]);
    let b = tensor(&y, [2, 4, 3, 5]);
    let want_a = permuted(&x, &shape, &[0, 2, 1, 3]);
    let sum = data((a.clone() + b.clone()).reshape([120]));
    let diff =
        data((b.clone().permute([3, 1, 0, 2]) - a.clone().permute([3, 1, 0, 2])).reshape([120]));
    for k in 0..120 {
        assert_eq!(sum[k], want_a[k] + y[k], "sum at {k}");
    }
    let want_diff = permuted(
        &(0..120).map(|k| y[k] - want_a[k]).collect::<Vec<_>>(),
        &[2, 4, 3, 5],
        &[3, 1, 0, 2],
    );
    assert_eq!(diff, want_diff, "difference of two permuted operands");
}
