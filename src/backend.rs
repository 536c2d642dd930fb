//! The one place that names concrete burn backends; everything else is generic over `Backend`.

use burn::backend::Autodiff;

/// The inference backend selected at compile time: LibTorch with `--features tch`, CUDA with
/// `--features cuda`, otherwise burn's pure-Rust `Flex` CPU backend.
#[cfg(feature = "cuda")]
pub type Inference = burn::backend::Cuda;
/// The inference backend selected at compile time.
#[cfg(all(feature = "tch", not(feature = "cuda")))]
pub type Inference = burn::backend::LibTorch;
/// The inference backend selected at compile time.
#[cfg(not(any(feature = "tch", feature = "cuda")))]
pub type Inference = burn::backend::Flex;

/// The training backend: the inference backend with automatic differentiation.
pub type Training = Autodiff<Inference>;

/// The default device of the selected backend.
pub fn device() -> burn::tensor::Device<Inference> {
    Default::default()
}

/// The device of the `local_rank`-th worker process of a machine (`densekd launch`): GPU
/// `local_rank` with CUDA, one process per device; the default device otherwise.
pub fn device_for(local_rank: usize) -> burn::tensor::Device<Inference> {
    #[cfg(feature = "cuda")]
    return burn::backend::cuda::CudaDevice { index: local_rank };
    #[cfg(not(feature = "cuda"))]
    {
        let _ = local_rank;
        device()
    }
}

/// Runs `f` with the calling thread's flex kernels (convolutions, batched matmuls) limited to
/// `threads` cores, e.g. 1 inside data-parallel replicas, which already use every core. Results
/// do not depend on it; other backends ignore it.
pub fn with_op_threads<R>(threads: usize, f: impl FnOnce() -> R) -> R {
    struct Restore(usize);
    impl Drop for Restore {
        fn drop(&mut self) {
            set_op_threads(self.0);
        }
    }
    let _restore = Restore(burn_flex::threads());
    set_op_threads(threads);
    f()
}

/// Limits the calling thread's flex kernels to `threads` cores from now on (0: one per core).
pub fn set_op_threads(threads: usize) {
    burn_flex::set_threads(threads);
}

/// A human-readable name of the compiled-in backend, for logs and reports.
pub fn name() -> &'static str {
    if cfg!(feature = "cuda") {
        "cuda"
    } else if cfg!(feature = "tch") {
        "tch"
    } else {
        "flex"
    }
}
