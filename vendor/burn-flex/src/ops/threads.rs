//! densekd patch: deterministic use of several cores inside one operation.
//!
//! flex's `rayon` feature stays off in densekd (its parallel reductions split work by timing,
//! so sums and runs differed). The kernels that use this module split their output into fixed
//! blocks (images, channels, batch matrices) whose every element is computed by the same
//! sequence of operations whatever the thread count, so results are bit-identical with one
//! thread or many.

use core::cell::Cell;
use core::ops::Range;

use super::scratch::Buffer;

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

/// Multiply-adds that one element of a memory-bound pass (a normalisation, a sum of blocks)
/// counts as: reading and writing it takes about as long as this many multiply-adds in gemm's
/// kernel. Counted as one, the batch norms of ResNet-18's later stages ran on one core.
pub(crate) const PASS_FLOPS: usize = 32;

/// Runs `f` on contiguous blocks of `items` items, each with its `per_item`-long slices of
/// `out`, one block per thread (the first on the calling thread).
pub(crate) fn split_mut<T: Send>(
    out: &mut [T],
    items: usize,
    per_item: usize,
    flops: usize,
    f: impl Fn(Range<usize>, &mut [T]) + Sync,
) {
    split_mut_scratch::<T, u8>(out, items, per_item, flops, 0, |range, out, _| {
        f(range, out)
    });
}

/// [`split_mut`] with `scratch` elements of working memory for each block, taken from the
/// calling thread's [`Buffer`]s: as the last use left them, so `f` writes before it reads.
pub(crate) fn split_mut_scratch<T: Send, S: bytemuck::Pod + Send>(
    out: &mut [T],
    items: usize,
    per_item: usize,
    flops: usize,
    scratch: usize,
    f: impl Fn(Range<usize>, &mut [T], &mut [S]) + Sync,
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
        f(0..items, out, Buffer::<S>::take(scratch).as_mut());
        return;
    }
    let per_thread = items.div_ceil(threads);
    let blocks = items.div_ceil(per_thread);
    let mut buffer = Buffer::<S>::take(blocks * scratch);
    let mut scratches = buffer.as_mut();
    std::thread::scope(|scope| {
        let f = &f;
        let mut first = None;
        for (t, block) in out.chunks_mut(per_thread * per_item).enumerate() {
            let (mine, rest) = core::mem::take(&mut scratches).split_at_mut(scratch);
            scratches = rest;
            let range = t * per_thread..((t + 1) * per_thread).min(items);
            if t == 0 {
                first = Some((range, block, mine));
            } else {
                scope.spawn(move || f(range, block, mine));
            }
        }
        if let Some((range, block, mine)) = first {
            f(range, block, mine);
        }
    });
}
