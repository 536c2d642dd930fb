//! The training loop, independent of the model kind ([`Task`]) and of the distillation method
//! ([`crate::distill::Distiller`]): AdamW with a backbone learning-rate multiplier, warm-up and
//! decay, global gradient clipping, periodic evaluation, `metrics.jsonl`, plots, atomic
//! checkpoints with exact resume, and the exported inference weights.

pub mod checkpoint;
pub mod config;
pub mod detr;
pub mod metrics;
pub mod optim;
pub mod run;
pub mod schedule;

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::{AutodiffModule, Module};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor};
use serde_json::Value;

use crate::data::derive_seed;
use crate::data::loader::EpochIter;
use crate::distill::{Distiller, InnerModel};
use crate::error::{Error, Result};
use checkpoint::{load_record, record_bytes, Checkpoints, LoopState, Saved};
use config::{CheckpointConfig, EvalConfig, OptimConfig};
use metrics::{number, MetricsLog};
use optim::{add_grads, clip_global_norm, make_contiguous, replica, step_groups, ParamGroup};
use schedule::LrSchedule;

/// A scalar loss and its named, weighted terms (the terms are for logging).
pub struct Losses<B: AutodiffBackend> {
    /// What is back-propagated.
    pub total: Tensor<B, 1>,
    /// Named parts, e.g. `loss_class`.
    pub terms: Vec<(String, Tensor<B, 1>)>,
}

/// Named evaluation statistics, in report order (e.g. the 12 COCO stats).
pub type Stats = Vec<(String, f64)>;

/// Statistics per evaluated model label (`student`, then the distiller's models).
pub type ModelStats = Vec<(String, Stats)>;

/// A model kind with its data, loss, evaluation and export.
pub trait Task<B: AutodiffBackend> {
    /// The trained model.
    type Model: AutodiffModule<B> + Clone;
    /// One training batch.
    type Batch: Send + 'static;

    /// Training batches per epoch.
    fn batches_per_epoch(&self) -> usize;
    /// The training batches of `epoch`, starting at batch `skip`.
    fn train_batches(&self, epoch: usize, skip: usize) -> EpochIter<Self::Batch>;
    /// The supervised loss of one batch.
    fn loss(&self, model: &Self::Model, batch: &Self::Batch) -> Result<Losses<B>>;
    /// Splits a batch into at most `parts` shards for data-parallel replicas, each with the
    /// weight of its loss (the weights sum to 1), and seeds each shard's randomness from `seed`.
    fn split(&self, batch: Self::Batch, parts: usize, seed: u64) -> Vec<(Self::Batch, f64)>;
    /// Moves the backbone's gradients out of `grads` (they get `backbone_lr_mult`).
    fn backbone_grads(&self, model: &Self::Model, grads: &mut B::Gradients) -> GradientsParams;
    /// Evaluates an inference model on the validation split: named stats in report order.
    fn evaluate(&self, model: &InnerModel<B, Self>) -> Result<Stats>
    where
        Self: Sized;
    /// Writes inference weights to `path`.
    fn export(&self, model: &InnerModel<B, Self>, path: &Path) -> Result<()>
    where
        Self: Sized;

    /// Which target each query is matched to on a fixed image subset, for matching
    /// instability; `None` when the task doesn't measure it.
    fn match_keys(&self, _model: &InnerModel<B, Self>) -> Result<Option<MatchKeys>>
    where
        Self: Sized,
    {
        Ok(None)
    }
}

/// A model's matching on the instability subset: per image and query identity, the matched
/// target index or −1 (DN-DETR's `V_n[i]`), and the number of targets.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MatchKeys {
    /// Matched target per (image, query), −1 for unmatched.
    pub keys: Vec<i64>,
    /// Targets in the subset.
    pub targets: usize,
}

/// The task-independent settings of a run.
#[derive(Debug, Clone)]
pub struct LoopConfig {
    /// Run seed.
    pub seed: u64,
    /// Optimiser and schedule.
    pub optim: OptimConfig,
    /// Evaluation cadence.
    pub eval: EvalConfig,
    /// Checkpoint and logging cadence.
    pub checkpoint: CheckpointConfig,
}

/// Where a run writes and how it starts.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The run folder.
    pub run_dir: PathBuf,
    /// Continue from the latest checkpoint in `run_dir`.
    pub resume: bool,
    /// Stop (after checkpointing) once this many steps are done, as if killed; for tests.
    pub stop_after: Option<usize>,
    /// Draw a progress bar (when stderr is a terminal).
    pub progress: bool,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// Optimiser steps done.
    pub steps: usize,
    /// Final evaluation per model label (`student`, then the distiller's).
    pub final_eval: ModelStats,
    /// Seconds spent in this invocation.
    pub wall_s: f64,
    /// Whether training reached its last step (false when stopped by `stop_after`).
    pub finished: bool,
}

fn loss_values<B: AutodiffBackend>(losses: &Losses<B>) -> Stats {
    std::iter::once(("loss".to_string(), losses.total.clone()))
        .chain(losses.terms.iter().cloned())
        .map(|(k, t)| (k, t.into_scalar().elem::<f64>()))
        .collect()
}

fn stats_json(stats: &[(String, f64)]) -> Vec<(&str, Value)> {
    stats
        .iter()
        .map(|(k, v)| (k.as_str(), number(*v)))
        .collect()
}

/// Trains `model` on `task` with `distiller` and writes the run folder.
pub fn fit<B, T, D>(
    task: &T,
    distiller: &mut D,
    mut model: T::Model,
    config: &LoopConfig,
    options: &RunOptions,
    device: &B::Device,
) -> Result<RunSummary>
where
    B: AutodiffBackend,
    T: Task<B> + Sync,
    D: Distiller<B, T> + Sync,
{
    let start = Instant::now();
    let run_dir = &options.run_dir;
    let per_epoch = task.batches_per_epoch();
    if per_epoch == 0 {
        return Err(Error::config("data", "the training split has no batches"));
    }
    let schedule = LrSchedule::new(&config.optim, per_epoch);
    let total = schedule.total_steps();
    let mut optim = AdamWConfig::new()
        .with_weight_decay(config.optim.weight_decay as f32)
        .with_epsilon(config.optim.eps as f32)
        .init::<B, T::Model>();
    let checkpoints = Checkpoints::new(run_dir);

    let mut state = LoopState {
        step: 0,
        epoch: 0,
        batch: 0,
        next_lr: schedule.lr(0),
        seed: config.seed,
    };
    let mut resumed = None;
    let mut match_keys: Vec<(String, MatchKeys)> = Vec::new();
    if options.resume {
        let mut names = vec!["model", "optim", "match_keys"];
        names.extend(distiller.state_names());
        if let Some(saved) = checkpoints.load_latest(&names)? {
            let dir = checkpoints.root().to_path_buf();
            let mut parts = saved.parts.into_iter();
            let mut next = |name: &str| -> Result<Vec<u8>> {
                parts
                    .next()
                    .map(|(_, bytes)| bytes)
                    .ok_or_else(|| Error::invalid(&dir, name, "missing from the checkpoint"))
            };
            model = model.load_record(load_record(next("model")?, &dir.join("model.bin"), device)?);
            optim = optim.load_record(load_record(next("optim")?, &dir.join("optim.bin"), device)?);
            let keys_path = dir.join("match_keys.bin");
            match_keys = serde_json::from_slice(&next("match_keys")?).map_err(|e| Error::Json {
                path: keys_path,
                source: e,
            })?;
            let rest: Vec<(String, Vec<u8>)> = distiller
                .state_names()
                .into_iter()
                .map(|n| Ok((n.to_string(), next(n)?)))
                .collect::<Result<_>>()?;
            distiller.load_state(&rest, device)?;
            state = saved.state;
            resumed = Some(state.step);
        }
    }
    let mut log = MetricsLog::open(&run_dir.join("metrics.jsonl"), resumed)?;
    if resumed.is_none() {
        match_keys = all_match_keys(task, distiller, &model)?;
    }
    match resumed {
        Some(step) => eprintln!("resuming {} at step {step}/{total}", run_dir.display()),
        None => eprintln!("training {total} steps into {}", run_dir.display()),
    }

    let bar = if options.progress {
        let bar = indicatif::ProgressBar::new(total as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} ETA {eta} {msg}",
            )
            .map_err(|e| Error::config("progress", e.to_string()))?
            .progress_chars("=> "),
        );
        bar.set_position(state.step as u64);
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };

    let save = |model: &T::Model,
                optim: Vec<u8>,
                distiller: &D,
                keys: &[(String, MatchKeys)],
                state: LoopState|
     -> Result<()> {
        let keys =
            serde_json::to_vec(keys).map_err(|e| Error::config("match_keys", e.to_string()))?;
        let mut parts = vec![
            (
                "model".to_string(),
                record_bytes::<B, _>(model.clone().into_record())?,
            ),
            ("optim".to_string(), optim),
            ("match_keys".to_string(), keys),
        ];
        parts.extend(distiller.state()?);
        checkpoints.save(&Saved { state, parts })
    };

    let mut final_eval = Vec::new();
    let mut finished = true;
    'epochs: while state.epoch < config.optim.epochs {
        let epoch = state.epoch;
        for batch in task.train_batches(epoch, state.batch) {
            let batch = batch?;
            // Dropout and any other backend randomness restart from (seed, step), so a resumed
            // run draws exactly what the uninterrupted run would have.
            B::seed(device, derive_seed(&[config.seed, state.step as u64, 0xd0]));
            let lr = schedule.lr(state.step);
            let log_now = state.step.is_multiple_of(config.checkpoint.log_every_steps);
            let shards = task.split(
                batch,
                config.optim.replicas,
                derive_seed(&[config.seed, state.step as u64, 0xd1]),
            );
            let step = data_parallel_step(task, &*distiller, &model, shards, log_now).map_err(
                |e| match e {
                    StepError::NotFinite(terms) => Error::config(
                        "training",
                        format!(
                            "step {}: the loss is not finite ({terms}); the last checkpoint in {} \
                             is intact — lower optim.lr or raise optim.warmup_steps and resume",
                            state.step,
                            checkpoints.root().display()
                        ),
                    ),
                    StepError::Failed(e) => e,
                },
            )?;
            let (total_loss, values) = (step.total, step.values);
            let mut groups = vec![
                ParamGroup {
                    lr_mult: config.optim.backbone_lr_mult,
                    grads: step.backbone,
                },
                ParamGroup {
                    lr_mult: 1.0,
                    grads: step.rest,
                },
            ];
            let grad_norm = clip_global_norm(&model, &mut groups, config.optim.clip_norm);
            model = step_groups(&mut optim, model, groups, lr);
            distiller.after_step(&model, state.step);
            state.step += 1;
            state.batch += 1;
            state.next_lr = schedule.lr(state.step);
            bar.set_position(state.step as u64);
            if let Some(values) = values {
                bar.set_message(format!("loss {total_loss:.3} lr {lr:.2e}"));
                let mut fields = vec![
                    ("epoch", Value::from(epoch)),
                    ("step", Value::from(state.step)),
                    ("lr", number(lr)),
                    ("grad_norm", number(grad_norm)),
                ];
                fields.extend(values.iter().map(|(k, v)| (k.as_str(), number(*v))));
                log.write("train", &fields)?;
            }
            let every = config.checkpoint.every_steps;
            let stop = options.stop_after.is_some_and(|s| state.step >= s);
            if state.batch < per_epoch && ((every > 0 && state.step.is_multiple_of(every)) || stop)
            {
                save(
                    &model,
                    record_bytes::<B, _>(optim.to_record())?,
                    distiller,
                    &match_keys,
                    state,
                )?;
            }
            if stop && state.batch < per_epoch {
                finished = false;
                break 'epochs;
            }
        }
        state.epoch += 1;
        state.batch = 0;
        let last = state.epoch == config.optim.epochs;
        let current = all_match_keys(task, distiller, &model)?;
        log_instability(&match_keys, &current, &mut log, state)?;
        if !current.is_empty() {
            match_keys = current;
        }
        if last || state.epoch.is_multiple_of(config.eval.every_epochs) {
            final_eval = evaluate_all(task, distiller, &model, &mut log, state)?;
            bar.suspend(|| {
                for (name, stats) in &final_eval {
                    let shown: Vec<String> = stats
                        .iter()
                        .take(3)
                        .map(|(k, v)| format!("{k} {v:.3}"))
                        .collect();
                    eprintln!(
                        "epoch {}/{} step {} {name}: {}",
                        state.epoch,
                        config.optim.epochs,
                        state.step,
                        shown.join(", ")
                    );
                }
            });
            plot(&log);
        }
        save(
            &model,
            record_bytes::<B, _>(optim.to_record())?,
            distiller,
            &match_keys,
            state,
        )?;
        if options.stop_after.is_some_and(|s| state.step >= s) && !last {
            finished = false;
            break;
        }
    }
    bar.finish_and_clear();

    if finished {
        if final_eval.is_empty() {
            // Resumed after the last epoch's checkpoint: the eval ran, but recompute for the summary.
            final_eval = evaluate_all(task, distiller, &model, &mut log, state)?;
        }
        task.export(&model.valid(), &run_dir.join("model.safetensors"))?;
        for (name, extra) in distiller.extra_models() {
            task.export(&extra, &run_dir.join(format!("model-{name}.safetensors")))?;
        }
        let summary = serde_json::json!({
            "steps": state.step,
            "epochs": state.epoch,
            "wall_s": start.elapsed().as_secs_f64(),
            "final": final_eval
                .iter()
                .map(|(name, stats)| (name.clone(), Value::Object(
                    stats.iter().map(|(k, v)| (k.clone(), number(*v))).collect(),
                )))
                .collect::<serde_json::Map<String, Value>>(),
        });
        crate::data::coco::write_json(&run_dir.join("summary.json"), &summary)?;
        plot(&log);
    }
    Ok(RunSummary {
        steps: state.step,
        final_eval,
        wall_s: start.elapsed().as_secs_f64(),
        finished,
    })
}

/// The summed gradients of one optimiser step over its data-parallel shards.
struct StepGrads {
    /// Backbone gradients.
    backbone: GradientsParams,
    /// All other gradients.
    rest: GradientsParams,
    /// The loss (weighted sum over the shards).
    total: f64,
    /// The loss and its terms for the log, when asked for.
    values: Option<Stats>,
}

/// Why a step produced no gradients.
enum StepError {
    /// The loss was not finite; its terms, formatted.
    NotFinite(String),
    /// Anything else.
    Failed(Error),
}

impl From<Error> for StepError {
    fn from(e: Error) -> Self {
        StepError::Failed(e)
    }
}

/// Forward and backward of one weighted shard.
fn shard_grads<B, T, D>(
    task: &T,
    distiller: &D,
    model: &T::Model,
    batch: &T::Batch,
    weight: f64,
    log: bool,
) -> std::result::Result<StepGrads, StepError>
where
    B: AutodiffBackend,
    T: Task<B>,
    D: Distiller<B, T>,
{
    let losses = distiller.loss(task, model, batch)?;
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
    let mut backbone = task.backbone_grads(model, &mut grads);
    let mut rest = GradientsParams::from_grads(grads, model);
    make_contiguous(model, &mut backbone);
    make_contiguous(model, &mut rest);
    Ok(StepGrads {
        backbone,
        rest,
        total: total * weight,
        values,
    })
}

/// Runs every shard's forward and backward on its own thread (the first on this one) and sums
/// their gradients in shard order, so the result does not depend on thread timing.
fn data_parallel_step<B, T, D>(
    task: &T,
    distiller: &D,
    model: &T::Model,
    shards: Vec<(T::Batch, f64)>,
    log: bool,
) -> std::result::Result<StepGrads, StepError>
where
    B: AutodiffBackend,
    T: Task<B> + Sync,
    D: Distiller<B, T> + Sync,
{
    let outcomes = std::thread::scope(|scope| {
        let mut shards = shards.into_iter();
        let first = shards.next();
        let handles: Vec<_> = shards
            .map(|(batch, weight)| {
                let model = replica(model);
                scope.spawn(move || shard_grads(task, distiller, &model, &batch, weight, log))
            })
            .collect();
        let mut outcomes: Vec<_> = first
            .map(|(batch, weight)| shard_grads(task, distiller, model, &batch, weight, log))
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
                add_grads(model, &mut acc.backbone, shard.backbone);
                add_grads(model, &mut acc.rest, shard.rest);
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

/// The student's inference form, labelled `student`, then the distiller's extra models.
fn labelled_models<B, T, D>(distiller: &D, model: &T::Model) -> Vec<(String, InnerModel<B, T>)>
where
    B: AutodiffBackend,
    T: Task<B>,
    D: Distiller<B, T>,
{
    std::iter::once(("student".to_string(), model.valid()))
        .chain(distiller.extra_models())
        .collect()
}

/// Evaluates the student and the distiller's extra models, logging one line each.
fn evaluate_all<B, T, D>(
    task: &T,
    distiller: &D,
    model: &T::Model,
    log: &mut MetricsLog,
    state: LoopState,
) -> Result<ModelStats>
where
    B: AutodiffBackend,
    T: Task<B>,
    D: Distiller<B, T>,
{
    let mut out = Vec::new();
    for (name, m) in labelled_models(distiller, model) {
        let stats = task.evaluate(&m)?;
        let mut fields = vec![
            ("epoch", Value::from(state.epoch)),
            ("step", Value::from(state.step)),
            ("model", Value::from(name.as_str())),
        ];
        fields.extend(stats_json(&stats));
        log.write("eval", &fields)?;
        out.push((name, stats));
    }
    Ok(out)
}

/// The match keys of the student and the distiller's extra models (empty when the task
/// doesn't measure instability).
fn all_match_keys<B, T, D>(
    task: &T,
    distiller: &D,
    model: &T::Model,
) -> Result<Vec<(String, MatchKeys)>>
where
    B: AutodiffBackend,
    T: Task<B>,
    D: Distiller<B, T>,
{
    let mut out = Vec::new();
    for (name, m) in labelled_models(distiller, model) {
        if let Some(keys) = task.match_keys(&m)? {
            out.push((name, keys));
        }
    }
    Ok(out)
}

/// Logs, per model, how many (image, query) matches changed since the previous epoch
/// (DN-DETR's instability) and that count per target.
fn log_instability(
    previous: &[(String, MatchKeys)],
    current: &[(String, MatchKeys)],
    log: &mut MetricsLog,
    state: LoopState,
) -> Result<()> {
    for (name, now) in current {
        let Some((_, before)) = previous.iter().find(|(n, _)| n == name) else {
            continue;
        };
        if before.keys.len() != now.keys.len() {
            continue;
        }
        let changed = before
            .keys
            .iter()
            .zip(&now.keys)
            .filter(|(a, b)| a != b)
            .count();
        log.write(
            "instability",
            &[
                ("epoch", Value::from(state.epoch)),
                ("step", Value::from(state.step)),
                ("model", Value::from(name.as_str())),
                ("changed", Value::from(changed)),
                (
                    "fraction",
                    number(changed as f64 / now.targets.max(1) as f64),
                ),
            ],
        )?;
    }
    Ok(())
}

/// Redraws the run's plots; a plotting failure is reported, not fatal.
fn plot(log: &MetricsLog) {
    let dir = log.path().parent().unwrap_or(Path::new("."));
    if let Err(e) = crate::viz::plot::plot_run(log.path(), dir) {
        eprintln!("warning: could not draw plots: {e}");
    }
}
