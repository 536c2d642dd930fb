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

/// How many items [`map_ordered`] runs at once: one per core the calling thread's flex kernels
/// may use, one on other backends (their kernels have their own parallelism).
pub fn item_threads() -> usize {
    if cfg!(any(feature = "cuda", feature = "tch")) {
        return 1;
    }
    match burn_flex::threads() {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// Applies `f` to every item of `items`, [`item_threads`] items at a time, each on its own
/// thread with single-threaded kernels, and hands each item and its result to `sink` in item
/// order. Items are processed exactly as by a sequential loop (kernels give the same bits for
/// any thread count), so evaluations read both cores and still match run for run.
pub fn map_ordered<T: Sync, R: Send, E>(
    items: impl Iterator<Item = Result<T, E>>,
    f: impl Fn(&T) -> R + Sync,
    mut sink: impl FnMut(T, R) -> Result<(), E>,
) -> Result<(), E> {
    let threads = item_threads();
    let mut items = items.peekable();
    while items.peek().is_some() {
        let window = items
            .by_ref()
            .take(threads)
            .collect::<Result<Vec<T>, E>>()?;
        let results: Vec<R> = if window.len() == 1 {
            vec![f(&window[0])]
        } else {
            std::thread::scope(|scope| {
                let f = &f;
                let handles: Vec<_> = window[1..]
                    .iter()
                    .map(|item| scope.spawn(move || with_op_threads(1, || f(item))))
                    .collect();
                let first = with_op_threads(1, || f(&window[0]));
                std::iter::once(first)
                    .chain(handles.into_iter().map(|h| {
                        h.join()
                            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                    }))
                    .collect()
            })
        };
        for (item, result) in window.into_iter().zip(results) {
            sink(item, result)?;
        }
    }
    Ok(())
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
