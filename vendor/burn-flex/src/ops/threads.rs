//! densekd patch: deterministic use of several cores inside one operation.
//!
//! flex's `rayon` feature stays off in densekd (its parallel reductions split work by timing,
//! so sums and runs differed). The kernels that use this module split their output into fixed
//! blocks (images, channels, batch matrices) whose every element is computed by the same
//! sequence of operations whatever the thread count, so results are bit-identical with one
//! thread or many.

use core::cell::Cell;
use core::ops::Range;

std::thread_local! {
    static THREADS: Cell<usize> = const { Cell::new(0) };
}

/// Sets how many threads flex's convolution and batched-matmul kernels may use when called
/// from this thread; 0 (the default) means one per core. Results do not depend on it.
pub fn set_threads(threads: usize) {
    THREADS.set(threads);
}

/// The thread count set by [`set_threads`] for the calling thread (0: one per core).
pub fn threads() -> usize {
    THREADS.get()
}

/// Below this many multiply-adds an operation runs on the calling thread alone: starting a
/// thread costs tens of microseconds.
const MIN_PARALLEL_FLOPS: usize = 4_000_000;

/// Runs `f` on contiguous blocks of `items` items, each with its `per_item`-long slices of
/// `out`, one block per thread (the first on the calling thread).
pub(crate) fn split_mut<T: Send>(
    out: &mut [T],
    items: usize,
    per_item: usize,
    flops: usize,
    f: impl Fn(Range<usize>, &mut [T]) + Sync,
) {
    let threads = match THREADS.get() {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let threads = if flops < MIN_PARALLEL_FLOPS {
        1
    } else {
        threads.min(items)
    };
    if threads <= 1 || per_item == 0 {
        f(0..items, out);
        return;
    }
    let per_thread = items.div_ceil(threads);
    std::thread::scope(|scope| {
        let f = &f;
        let mut blocks = out.chunks_mut(per_thread * per_item).enumerate();
        let first = blocks.next();
        for (t, block) in blocks {
            let start = t * per_thread;
            scope.spawn(move || f(start..(start + per_thread).min(items), block));
        }
        if let Some((_, block)) = first {
            f(0..per_thread.min(items), block);
        }
    });
}
