//! densekd patch: helpers shared by the hand-written kernels (depthwise convolution, max
//! pooling, normalisation, im2col): run-time AVX-512 and AVX2 detection, and loops compiled
//! for them. Without a target feature the loops are SSE2 code (the x86-64 baseline), four
//! lanes wide.

use num_traits::Float;

/// Whether the CPU has AVX-512F (detected once, then cached by the standard library).
#[cfg(all(feature = "std", target_arch = "x86_64"))]
fn avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

/// Whether the CPU has AVX2 (detected once, then cached by the standard library). Kernels
/// compiled for it use no FMA, so they give the same bits as the other versions.
#[cfg(all(feature = "std", target_arch = "x86_64"))]
fn avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
}

/// Runs `body` compiled for AVX-512 or AVX2 when the CPU has them, else as baseline code.
/// `body` must be an `#[inline(always)]` closure, so that it is compiled into each version
/// below and its loops get the wider vectors; none enables FMA, so all give the same bits.
#[inline(always)]
pub(super) fn vectorized<R>(body: impl FnOnce() -> R) -> R {
    #[cfg(all(feature = "std", target_arch = "x86_64"))]
    if avx512() {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { vectorized_avx512(body) };
    }
    #[cfg(all(feature = "std", target_arch = "x86_64"))]
    if avx2() {
        // SAFETY: the CPU has AVX2.
        return unsafe { vectorized_avx2(body) };
    }
    body()
}

#[cfg(all(feature = "std", target_arch = "x86_64"))]
#[target_feature(enable = "avx512f")]
unsafe fn vectorized_avx512<R>(body: impl FnOnce() -> R) -> R {
    body()
}

#[cfg(all(feature = "std", target_arch = "x86_64"))]
#[target_feature(enable = "avx2")]
unsafe fn vectorized_avx2<R>(body: impl FnOnce() -> R) -> R {
    body()
}

/// `dst[i] = src[i · step]` for every `i` of `dst`.
pub(super) fn gather<T: Float>(dst: &mut [T], src: &[T], step: usize) {
    let n = dst.len();
    match step {
        1 => dst.copy_from_slice(&src[..n]),
        2 => vectorized(#[inline(always)] || gather2_body(dst, &src[..2 * n - 1])),
        _ => {
            for (d, &s) in dst.iter_mut().zip(src.iter().step_by(step)) {
                *d = s;
            }
        }
    }
}

#[inline(always)]
fn gather2_body<T: Float>(dst: &mut [T], src: &[T]) {
    let n = dst.len();
    for (d, pair) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *d = pair[0];
    }
    dst[n - 1] = src[2 * n - 2];
}
