//! densekd patch: working memory of the convolution kernels, kept from call to call, and
//! outputs written without being zeroed first.
//!
//! The kernels' intermediate buffers (im2col matrices, Winograd transforms, per-block weight
//! gradients) were fresh zeroed allocations in every call: a ResNet-18 train step zeroed
//! hundreds of megabytes on one core while the other waited. Every kernel writes each
//! element of its working memory before it reads it, so a buffer is handed out as the last
//! use left it (filled with NaN bit patterns in debug builds, so that a read before a write
//! fails the tests).

use alloc::vec::Vec;
use core::cell::RefCell;
use core::marker::PhantomData;
use core::mem::{ManuallyDrop, MaybeUninit};

/// Buffers kept per thread beyond the ones in use.
const KEPT: usize = 4;

std::thread_local! {
    static FREE: RefCell<Vec<Vec<u64>>> = const { RefCell::new(Vec::new()) };
}

/// `len` elements of working memory taken from the calling thread's free buffers; they go
/// back when dropped.
pub(crate) struct Buffer<T> {
    words: Vec<u64>,
    len: usize,
    element: PhantomData<T>,
}

impl<T: bytemuck::Pod> Buffer<T> {
    /// `len` elements (f32 or f64, whose any bit pattern is a value): the smallest free buffer
    /// that is large enough, else the largest grown (only a new part is zeroed).
    pub fn take(len: usize) -> Self {
        let need = (len * core::mem::size_of::<T>()).div_ceil(8);
        if need == 0 {
            return Self {
                words: Vec::new(),
                len,
                element: PhantomData,
            };
        }
        let mut words = FREE
            .with_borrow_mut(|free| {
                let fits = (0..free.len())
                    .filter(|&i| free[i].len() >= need)
                    .min_by_key(|&i| free[i].len());
                let largest = (0..free.len()).max_by_key(|&i| free[i].len());
                fits.or(largest).map(|i| free.swap_remove(i))
            })
            .unwrap_or_default();
        if words.len() < need {
            words.resize(need, 0);
        }
        if cfg!(debug_assertions) {
            words[..need].fill(u64::MAX);
        }
        Self {
            words,
            len,
            element: PhantomData,
        }
    }

    /// The elements.
    pub fn as_mut(&mut self) -> &mut [T] {
        &mut bytemuck::cast_slice_mut(&mut self.words)[..self.len]
    }
}

impl<T> Drop for Buffer<T> {
    fn drop(&mut self) {
        let words = core::mem::take(&mut self.words);
        if words.is_empty() {
            return;
        }
        FREE.with_borrow_mut(|free| {
            free.push(words);
            if free.len() > KEPT {
                let smallest = (0..free.len()).min_by_key(|&i| free[i].len());
                if let Some(i) = smallest {
                    free.swap_remove(i);
                }
            }
        });
    }
}

/// A buffer of `n` elements that `fill` initialises, not zeroed first: products and the
/// normalisations overwrite their whole output, so zeroing it was a pass of its own over every
/// result (2.4 % of a DETR training step in `perf` for the matmuls alone).
///
/// # Safety
///
/// `fill` must write every element of the slice it is given.
pub(crate) unsafe fn written_by<T>(n: usize, fill: impl FnOnce(&mut [MaybeUninit<T>])) -> Vec<T> {
    let mut out: Vec<MaybeUninit<T>> = Vec::with_capacity(n);
    // SAFETY: `MaybeUninit` needs no initialisation.
    unsafe { out.set_len(n) };
    fill(&mut out);
    let mut out = ManuallyDrop::new(out);
    // SAFETY: every element was written (the caller's contract); same allocation and layout.
    unsafe { Vec::from_raw_parts(out.as_mut_ptr().cast::<T>(), out.len(), out.capacity()) }
}
