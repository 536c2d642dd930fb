//! One optimiser step's gradients: every data-parallel shard's forward and backward pass on
//! its own thread, the shards' parameter groups summed in shard order.

use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ElementConversion;

use crate::backend::with_op_threads;
use crate::distill::Distiller;
use crate::error::Error;
use crate::task::{Losses, ParamGroup, Stats, Task};
use crate::train::optim::{add_grads, make_contiguous, replica};
use crate::train::Trained;

/// The summed gradients of one optimiser step over its data-parallel shards.
pub(super) struct StepGrads {
    /// The task's parameter groups, then the distiller's.
    pub groups: Vec<ParamGroup>,
    /// The loss (weighted sum over the shards).
    pub total: f64,
    /// The loss and its terms for the log, when asked for.
    pub values: Option<Stats>,
}

/// Why a step produced no gradients.
pub(super) enum StepError {
    /// The loss was not finite; its terms, formatted.
    NotFinite(String),
    /// Anything else.
    Failed(Error),
}

impl From<Error> for StepError {
    fn from(e: Error) -> Self {
        match e {
            Error::NotFinite { what } => StepError::NotFinite(what),
            e => StepError::Failed(e),
        }
    }
}

fn loss_values<B: AutodiffBackend>(losses: &Losses<B>) -> Stats {
    std::iter::once(("loss".to_string(), losses.total.clone()))
        .chain(losses.terms.iter().cloned())
        .map(|(k, t)| (k, t.into_scalar().elem::<f64>()))
        .collect()
}

/// Forward and backward of one weighted shard.
fn shard_grads<B, T, D>(
    task: &T,
    distiller: &D,
    model: &Trained<B, T, D>,
    batch: &T::Batch,
    weight: f64,
    log: bool,
) -> std::result::Result<StepGrads, StepError>
where
    B: AutodiffBackend,
    T: Task<B>,
    D: Distiller<B, T>,
{
    let losses = distiller.loss(task, &model.0, &model.1, batch)?;
    let total = losses.total.clone().into_scalar().elem::<f64>();
    if !total.is_finite() {
        let terms = loss_values(&losses)
            .iter()
            .map(|(k, v)| format!("{k} = {v}"))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(StepError::NotFinite(terms));
    }
    // The logged terms are weighted on the host: only the total is back-propagated.
    let values = log.then(|| {
        let mut values = loss_values(&losses);
        values.iter_mut().for_each(|(_, v)| *v *= weight);
        values
    });
    let mut grads = losses.total.mul_scalar(weight).backward();
    let mut groups = task.param_groups(&model.0, &mut grads);
    groups.push(ParamGroup {
        lr_mult: distiller.lr_mult(),
        grads: GradientsParams::from_module(&mut grads, &model.1),
    });
    for group in &mut groups {
        make_contiguous(model, &mut group.grads);
    }
    Ok(StepGrads {
        groups,
        total: total * weight,
        values,
    })
}

/// Runs every shard's forward and backward on its own thread (the first on this one) and sums
/// their gradients in shard order, so the result does not depend on thread timing. Each shard's
/// loss is weighted by the weight it comes with.
pub(super) fn data_parallel_step<B, T, D>(
    task: &T,
    distiller: &D,
    model: &Trained<B, T, D>,
    shards: Vec<(T::Batch, f64)>,
    log: bool,
) -> std::result::Result<StepGrads, StepError>
where
    B: AutodiffBackend,
    T: Task<B> + Sync,
    D: Distiller<B, T> + Sync,
{
    // Replicas already keep every core busy: their kernels run single-threaded.
    let replicated = shards.len() > 1;
    let outcomes = std::thread::scope(|scope| {
        let mut shards = shards.into_iter();
        let first = shards.next();
        let handles: Vec<_> = shards
            .map(|(batch, weight)| {
                let model = replica(model);
                scope.spawn(move || {
                    with_op_threads(1, || {
                        shard_grads(task, distiller, &model, &batch, weight, log)
                    })
                })
            })
            .collect();
        let mut outcomes: Vec<_> = first
            .map(|(batch, weight)| {
                let run = || shard_grads(task, distiller, model, &batch, weight, log);
                if replicated {
                    with_op_threads(1, run)
                } else {
                    run()
                }
            })
            .into_iter()
            .collect();
        outcomes.extend(handles.into_iter().map(|h| {
            h.join().unwrap_or_else(|_| {
                Err(StepError::Failed(Error::config(
                    "training",
                    "a data-parallel replica panicked",
                )))
            })
        }));
        outcomes
    });
    let mut sum: Option<StepGrads> = None;
    for outcome in outcomes {
        let shard = outcome?;
        sum = Some(match sum {
            None => shard,
            Some(mut acc) => {
                for (a, b) in acc.groups.iter_mut().zip(shard.groups) {
                    add_grads(model, &mut a.grads, b.grads);
                }
                acc.total += shard.total;
                // By name: a shard may lack a term (no denoising loss without boxes).
                if let (Some(a), Some(b)) = (&mut acc.values, shard.values) {
                    for (k, y) in b {
                        match a.iter_mut().find(|(name, _)| *name == k) {
                            Some((_, x)) => *x += y,
                            None => a.push((k, y)),
                        }
                    }
                }
                acc
            }
        });
    }
    sum.ok_or_else(|| StepError::Failed(Error::config("training", "an empty batch")))
}
