//! Parallel, deterministic batch loading.
//!
//! Worker threads decode and augment samples while the training step runs. Batch `b` of an epoch
//! is built by worker `b % workers` and delivered in order, and every sample's RNG is seeded from
//! `(seed, epoch, index)`, so batches are bit-identical whatever the number of workers.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::data::derive_seed;
use crate::error::{Error, Result};

/// A random-access collection of samples.
pub trait Source: Send + Sync + 'static {
    /// The sample type, after loading and augmentation.
    type Item: Send + 'static;
    /// Number of samples.
    fn len(&self) -> usize;
    /// Whether there are no samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Loads sample `index`, drawing any augmentation randomness from `rng`.
    fn get(&self, index: usize, rng: &mut ChaCha8Rng) -> Result<Self::Item>;
}

/// The first `len` samples of another source.
pub struct Subset<S> {
    /// The full source.
    pub inner: S,
    /// Samples kept.
    pub len: usize,
}

impl<S: Source> Source for Subset<S> {
    type Item = S::Item;

    fn len(&self) -> usize {
        self.len.min(self.inner.len())
    }

    fn get(&self, index: usize, rng: &mut ChaCha8Rng) -> Result<Self::Item> {
        self.inner.get(index, rng)
    }
}

/// How batches are drawn.
#[derive(Debug, Clone, PartialEq)]
pub struct LoaderConfig {
    /// Samples per batch.
    pub batch_size: usize,
    /// Shuffle the sample order every epoch.
    pub shuffle: bool,
    /// Drop a final incomplete batch.
    pub drop_last: bool,
    /// Worker threads (0 loads on the calling thread).
    pub workers: usize,
    /// Batches each worker may prepare ahead.
    pub prefetch: usize,
    /// Seed of the order and of every sample's augmentation.
    pub seed: u64,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            batch_size: 8,
            shuffle: true,
            drop_last: false,
            workers: 2,
            prefetch: 2,
            seed: 0,
        }
    }
}

/// Turns loaded samples into a batch.
pub type Collate<I, T> = dyn Fn(Vec<I>) -> Result<T> + Send + Sync;

/// Batches of a [`Source`], epoch by epoch.
pub struct Loader<S: Source, T> {
    source: Arc<S>,
    collate: Arc<Collate<S::Item, T>>,
    config: LoaderConfig,
}

impl<S: Source, T: Send + 'static> Loader<S, T> {
    /// A loader over `source`, assembling batches with `collate`.
    pub fn new(
        source: S,
        collate: impl Fn(Vec<S::Item>) -> Result<T> + Send + Sync + 'static,
        config: LoaderConfig,
    ) -> Result<Self> {
        if config.batch_size == 0 {
            return Err(Error::config("batch_size", "must be at least 1"));
        }
        Ok(Loader {
            source: Arc::new(source),
            collate: Arc::new(collate),
            config,
        })
    }

    /// The underlying samples.
    pub fn source(&self) -> &S {
        &self.source
    }

    /// Number of batches in one epoch.
    pub fn batches_per_epoch(&self) -> usize {
        let (n, b) = (self.source.len(), self.config.batch_size);
        if self.config.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// The sample indices of each batch of `epoch`.
    fn plan(&self, epoch: usize) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..self.source.len()).collect();
        if self.config.shuffle {
            let mut rng =
                ChaCha8Rng::seed_from_u64(derive_seed(&[self.config.seed, epoch as u64, 0x5eed]));
            order.shuffle(&mut rng);
        }
        let mut batches: Vec<Vec<usize>> = order
            .chunks(self.config.batch_size)
            .map(<[usize]>::to_vec)
            .collect();
        if self.config.drop_last
            && batches
                .last()
                .is_some_and(|b| b.len() < self.config.batch_size)
        {
            batches.pop();
        }
        batches
    }

    /// Iterates over the batches of `epoch`, loading ahead on the worker threads.
    pub fn epoch(&self, epoch: usize) -> EpochIter<T> {
        self.epoch_from(epoch, 0)
    }

    /// The batches of `epoch` from batch `skip` on: exactly the tail of [`Loader::epoch`],
    /// without loading the skipped batches (resuming mid-epoch).
    pub fn epoch_from(&self, epoch: usize, skip: usize) -> EpochIter<T> {
        let mut plan = self.plan(epoch);
        plan.drain(..skip.min(plan.len()));
        let plan = Arc::new(plan);
        let seed = self.config.seed;
        let build = {
            let (source, collate, plan) = (self.source.clone(), self.collate.clone(), plan.clone());
            move |b: usize| -> Result<T> {
                let items = plan[b]
                    .iter()
                    .map(|&i| {
                        let mut rng =
                            ChaCha8Rng::seed_from_u64(derive_seed(&[seed, epoch as u64, i as u64]));
                        source.get(i, &mut rng)
                    })
                    .collect::<Result<Vec<_>>>()?;
                collate(items)
            }
        };
        let workers = self.config.workers.min(plan.len());
        if workers == 0 {
            return EpochIter {
                next: 0,
                len: plan.len(),
                inline: Some(Box::new(build)),
                channels: Vec::new(),
            };
        }
        let build = Arc::new(build);
        let channels = (0..workers)
            .map(|w| {
                let (tx, rx) = sync_channel(self.config.prefetch.max(1));
                let (build, len) = (build.clone(), plan.len());
                std::thread::spawn(move || {
                    for b in (w..len).step_by(workers) {
                        // A closed channel means the consumer stopped early: just exit.
                        if tx.send(build(b)).is_err() {
                            break;
                        }
                    }
                });
                rx
            })
            .collect();
        EpochIter {
            next: 0,
            len: plan.len(),
            inline: None,
            channels,
        }
    }
}

/// Builds batch `b` of an epoch on the calling thread.
type InlineBuild<T> = Box<dyn Fn(usize) -> Result<T> + Send>;

/// The batches of one epoch, in order.
pub struct EpochIter<T> {
    next: usize,
    len: usize,
    inline: Option<InlineBuild<T>>,
    channels: Vec<Receiver<Result<T>>>,
}

impl<T> Iterator for EpochIter<T> {
    type Item = Result<T>;

    fn next(&mut self) -> Option<Result<T>> {
        if self.next >= self.len {
            return None;
        }
        let b = self.next;
        self.next += 1;
        Some(match &self.inline {
            Some(build) => build(b),
            None => self.channels[b % self.channels.len()]
                .recv()
                .unwrap_or_else(|_| {
                    Err(Error::config(
                        "loader",
                        format!("worker thread for batch {b} panicked"),
                    ))
                }),
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.len - self.next;
        (left, Some(left))
    }
}

impl<T> ExactSizeIterator for EpochIter<T> {}
