//! The training loop, independent of the model kind ([`Task`]) and of the distillation method
//! ([`Distiller`]): the student and the distiller's trainable modules are optimised together
//! (AdamW or SGD with per-group learning-rate multipliers, warm-up and decay, global gradient
//! clipping, data-parallel replicas), with periodic evaluation, `metrics.jsonl`, plots, atomic
//! checkpoints with exact resume, and the exported inference weights.

pub mod adamw;
pub mod checkpoint;
pub mod collective;
pub mod config;
mod evaluation;
pub mod metrics;
pub mod optim;
mod progress;
pub mod run;
pub mod schedule;
mod step;

use std::path::PathBuf;
use std::time::Instant;

use burn::module::Module;
use burn::optim::Optimizer;
use burn::tensor::backend::AutodiffBackend;
use serde_json::Value;

use crate::data::derive_seed;
use crate::distill::Distiller;
use crate::error::{Error, Result};
use crate::task::number;
use crate::task::{ModelStats, Task};
use checkpoint::{load_record, record_bytes, Checkpoints, LoopState, Saved};
use collective::{Collective, World};
use config::{CheckpointConfig, EvalConfig, OptimConfig, OptimizerKind};
use evaluation::{check_teachers, evaluate_all, log_diagnostics, plot, probe_all, Probes};
use metrics::MetricsLog;
use optim::{clip_global_norm, clip_values, step_groups};
use progress::Progress;
use schedule::LrSchedule;
use step::{data_parallel_step, StepError};

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
    /// This worker's place in a multi-process run (`densekd launch`); `None` for one process.
    pub world: Option<World>,
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

/// What is optimised: the student and the distiller's trainable modules.
type Trained<B, T, D> = (<T as Task<B>>::Model, <D as Distiller<B, T>>::Trainable);

/// The checkpoint's file names, in the order they are written and read.
const PARTS: [&str; 4] = ["model", "optim", "distiller", "probes"];

/// Trains `student` on `task` with `distiller` and writes the run folder.
pub fn fit<B, T, D>(
    task: &T,
    distiller: &mut D,
    student: T::Model,
    config: &LoopConfig,
    options: &RunOptions,
    device: &B::Device,
) -> Result<RunSummary>
where
    B: AutodiffBackend,
    T: Task<B> + Sync,
    D: Distiller<B, T> + Sync,
{
    match config.optim.optimizer {
        OptimizerKind::Adamw => {
            let optim = optim::adamw(&config.optim).init::<B, Trained<B, T, D>>();
            fit_with(task, distiller, student, config, options, device, optim)
        }
        OptimizerKind::Sgd => {
            let optim = optim::sgd_config(&config.optim).init::<B, Trained<B, T, D>>();
            fit_with(task, distiller, student, config, options, device, optim)
        }
    }
}

/// [`fit`] with the optimiser `optim`.
fn fit_with<B, T, D, O>(
    task: &T,
    distiller: &mut D,
    student: T::Model,
    config: &LoopConfig,
    options: &RunOptions,
    device: &B::Device,
    mut optim: O,
) -> Result<RunSummary>
where
    B: AutodiffBackend,
    T: Task<B> + Sync,
    D: Distiller<B, T> + Sync,
    O: Optimizer<Trained<B, T, D>, B>,
{
    let start = Instant::now();
    let run_dir = &options.run_dir;
    let per_epoch = task.batches_per_epoch();
    if per_epoch == 0 {
        return Err(Error::config("data", "the training split has no batches"));
    }
    let schedule = LrSchedule::new(&config.optim, per_epoch);
    let total = schedule.total_steps();
    let trainable = distiller.init_trainable(device)?;
    // burn draws a parameter's initial values at its first use; drawing them now ties them to
    // the distiller's own seeding instead of to whatever the backend generator holds at step 1
    // (and gives every data-parallel replica the same values).
    trainable.visit(&mut optim::Materialise);
    let mut model: Trained<B, T, D> = (student, trainable);
    let checkpoints = Checkpoints::new(run_dir);
    let collective = match &options.world {
        Some(world) => Some(Collective::<B::InnerBackend>::join(world, device)?),
        None => None,
    };
    // Rank 0 alone writes the run folder; every rank computes the same updates.
    let leader = options.world.as_ref().is_none_or(World::is_leader);
    let (rank, ranks) = options.world.as_ref().map_or((0, 1), |w| (w.rank, w.size));

    let mut state = LoopState {
        step: 0,
        epoch: 0,
        batch: 0,
        next_lr: schedule.lr(0),
        seed: config.seed,
        skipped: 0,
    };
    let mut resumed = None;
    let mut probes: Probes = Vec::new();
    if options.resume {
        if let Some(saved) = checkpoints.load_latest(&PARTS)? {
            let dir = checkpoints.root().to_path_buf();
            let parts: Vec<Vec<u8>> = saved.parts.into_iter().map(|(_, b)| b).collect();
            let [m, o, d, p]: [Vec<u8>; 4] = parts
                .try_into()
                .map_err(|_| Error::invalid(&dir, "checkpoint", "a part is missing"))?;
            model = model.load_record(load_record(m, &dir.join("model.bin"), device)?);
            optim = optim.load_record(load_record(o, &dir.join("optim.bin"), device)?);
            distiller.load_state(load_record::<B::InnerBackend, _>(
                d,
                &dir.join("distiller.bin"),
                device,
            )?);
            probes = serde_json::from_slice(&p).map_err(|e| Error::Json {
                path: dir.join("probes.bin"),
                source: e,
            })?;
            state = saved.state;
            resumed = Some(state.step);
        }
    }
    if let Some(c) = &collective {
        c.check_same_start(&model, state.step)?;
    }
    let mut log = match leader {
        true => Some(MetricsLog::open(&run_dir.join("metrics.jsonl"), resumed)?),
        false => None,
    };
    match (resumed, log.as_mut()) {
        (_, None) => {}
        (Some(step), Some(_)) if step >= total => eprintln!(
            "{} finished its {total} steps already; rewriting its exports",
            run_dir.display()
        ),
        (Some(step), Some(_)) => eprintln!("resuming {} at step {step}/{total}", run_dir.display()),
        (None, Some(log)) => {
            check_teachers(task, &*distiller, log)?;
            probes = probe_all(task, &*distiller, &model.0)?;
            eprintln!("training {total} steps into {}", run_dir.display());
        }
    }

    let mut progress = Progress::new(options.progress, total, state.step)?;
    let save = |model: &Trained<B, T, D>, optim: &_, distiller: &D, probes: &Probes, state| {
        let probes =
            serde_json::to_vec(probes).map_err(|e| Error::config("probes", e.to_string()))?;
        let parts = [
            record_bytes::<B, _>(model.clone().into_record())?,
            record_bytes::<B, _>(Optimizer::<Trained<B, T, D>, B>::to_record(optim))?,
            record_bytes::<B::InnerBackend, _>(distiller.state())?,
            probes,
        ];
        checkpoints.save(&Saved {
            state,
            parts: PARTS.map(String::from).into_iter().zip(parts).collect(),
        })
    };

    let mut final_eval = Vec::new();
    let mut finished = true;
    'epochs: while state.epoch < config.optim.epochs {
        let epoch = state.epoch;
        for batch in task.train_batches(epoch, state.batch) {
            let batch = batch?;
            // Dropout and any other backend randomness restart from (seed, step), so a resumed
            // run draws exactly what the uninterrupted run would have.
            // Other workers of a multi-process run draw their own streams.
            B::seed(
                device,
                match rank {
                    0 => derive_seed(&[config.seed, state.step as u64, 0xd0]),
                    r => derive_seed(&[config.seed, state.step as u64, 0xd0, r as u64]),
                },
            );
            let lr = schedule.lr(state.step);
            let log_now = state.step.is_multiple_of(config.checkpoint.log_every_steps);
            let replicas = config.optim.replicas;
            let shards = task.split(
                batch,
                replicas * ranks,
                derive_seed(&[config.seed, state.step as u64, 0xd1]),
            );
            let shards = own_shards(task, shards, rank, replicas);
            let mut outcome = data_parallel_step(task, &*distiller, &model, shards, log_now);
            let mut exchange_s = None;
            if let Some(c) = &collective {
                let (m, reduced, seconds) = c.reduce_step(model, outcome, log_now);
                (model, outcome, exchange_s) = (m, reduced, Some(seconds));
            }
            let outcome = outcome.and_then(|step| {
                let mut groups = step.groups;
                clip_values(&model, &mut groups[..], config.optim.clip_value);
                let norm = clip_global_norm(&model, &mut groups[..], config.optim.clip_norm);
                if norm.is_finite() {
                    Ok((groups, norm, step.total, step.values))
                } else {
                    Err(StepError::NotFinite(format!(
                        "gradient norm {norm}; loss {}",
                        step.total
                    )))
                }
            });
            let (groups, grad_norm, loss, values) = match outcome {
                Ok(done) => done,
                Err(StepError::NotFinite(what)) if state.skipped < config.optim.skip_nonfinite => {
                    state.skipped += 1;
                    let warning = format!(
                        "warning: step {}: not finite ({what}); batch skipped without an update \
                         ({} of optim.skip_nonfinite = {})",
                        state.step + 1,
                        state.skipped,
                        config.optim.skip_nonfinite
                    );
                    progress.println_if(leader, &warning);
                    if let Some(log) = log.as_mut() {
                        log.write(
                            "skipped",
                            &[
                                ("epoch", Value::from(epoch)),
                                ("step", Value::from(state.step + 1)),
                                ("reason", Value::from(what)),
                            ],
                        )?;
                    }
                    (Vec::new(), f64::NAN, f64::NAN, None)
                }
                Err(e) => return Err(step_error(e, state.step + 1, &checkpoints)),
            };
            model = step_groups(&mut optim, model, groups, lr);
            distiller.after_step(&model.0, state.step);
            state.step += 1;
            state.batch += 1;
            state.next_lr = schedule.lr(state.step);
            if leader {
                progress.update(state.step, values.as_ref().map(|_| loss), lr);
            }
            if let (Some(values), Some(log)) = (values, log.as_mut()) {
                let mut fields = vec![
                    ("epoch", Value::from(epoch)),
                    ("step", Value::from(state.step)),
                    ("lr", number(lr)),
                    ("grad_norm", number(grad_norm)),
                ];
                fields.extend(values.iter().map(|(k, v)| (k.as_str(), number(*v))));
                if let Some(seconds) = exchange_s {
                    fields.push(("exchange_s", number(seconds)));
                }
                log.write("train", &fields)?;
            }
            let every = config.checkpoint.every_steps;
            let stop = options.stop_after.is_some_and(|s| state.step >= s);
            if leader
                && state.batch < per_epoch
                && ((every > 0 && state.step.is_multiple_of(every)) || stop)
            {
                save(&model, &optim, distiller, &probes, state)?;
            }
            if stop && state.batch < per_epoch {
                finished = false;
                break 'epochs;
            }
        }
        state.epoch += 1;
        state.batch = 0;
        let last = state.epoch == config.optim.epochs;
        if let Some(log) = log.as_mut() {
            let current = probe_all(task, &*distiller, &model.0)?;
            log_diagnostics(task, &probes, &current, log, state)?;
            if !current.is_empty() {
                probes = current;
            }
            if last || state.epoch.is_multiple_of(config.eval.every_epochs) {
                final_eval = evaluate_all(task, &*distiller, &model, log, state)?;
                for (name, stats) in &final_eval {
                    progress.println(&format!(
                        "epoch {}/{} step {} {name}: {}",
                        state.epoch,
                        config.optim.epochs,
                        state.step,
                        evaluation::headline(task, stats)
                    ));
                }
                plot(log);
            }
            save(&model, &optim, distiller, &probes, state)?;
        }
        if options.stop_after.is_some_and(|s| state.step >= s) && !last {
            finished = false;
            break;
        }
    }
    progress.finish();

    if let (true, Some(log)) = (finished, log.as_mut()) {
        if final_eval.is_empty() {
            // Resumed after the last epoch's checkpoint: its evaluation is in the log already.
            final_eval = match log.evals_at(state.step)? {
                logged if !logged.is_empty() => logged,
                _ => evaluate_all(task, &*distiller, &model, log, state)?,
            };
        }
        evaluation::finish(task, &*distiller, &model.0, &final_eval, log, state, start)?;
        eprintln!(
            "finished {}: {}",
            run_dir.display(),
            run_dir.join("summary.json").display()
        );
    } else if leader && !finished {
        eprintln!(
            "stopped at step {}; resume {} with --resume",
            state.step,
            run_dir.display()
        );
    }
    if let Some(c) = collective {
        // The others wait here for rank 0's evaluation and exports, so that a finished launch
        // has written everything.
        c.barrier("waiting for rank 0 to write the run's results")?;
        c.finish()?;
    }
    Ok(RunSummary {
        steps: state.step,
        final_eval,
        wall_s: start.elapsed().as_secs_f64(),
        finished,
    })
}

/// This rank's `replicas` shards of the `replicas × ranks` of a batch, each with its share of
/// the whole batch's [`Task::shard_weight`] (1 for an unsplit batch). A rank left without a
/// shard (a short last batch) runs the first one at weight 0: its gradients are zeros of the
/// right parameter groups and its logged terms add nothing.
fn own_shards<B: AutodiffBackend, T: Task<B>>(
    task: &T,
    shards: Vec<T::Batch>,
    rank: usize,
    replicas: usize,
) -> Vec<(T::Batch, f64)> {
    let weights: Vec<f64> = match shards.len() {
        1 => vec![1.0],
        _ => {
            let raw: Vec<f64> = shards.iter().map(|s| task.shard_weight(s)).collect();
            let sum: f64 = raw.iter().sum();
            raw.iter().map(|w| w / sum).collect()
        }
    };
    let mut shards: Vec<(T::Batch, f64)> = shards.into_iter().zip(weights).collect();
    if shards.len() <= rank * replicas {
        shards.truncate(1);
        shards[0].1 = 0.0;
        return shards;
    }
    shards
        .into_iter()
        .skip(rank * replicas)
        .take(replicas)
        .collect()
}

/// The error of a step whose loss or gradient norm is not finite, naming the step (1-based, as
/// the progress lines and the log), the loss terms and what was saved before it.
fn step_error(e: StepError, step: usize, checkpoints: &Checkpoints) -> Error {
    match e {
        StepError::NotFinite(terms) => {
            let saved = match checkpoints.latest_step() {
                Some(s) => format!(
                    "the checkpoint of step {s} in {} is intact",
                    checkpoints.root().display()
                ),
                None => "no checkpoint had been written yet".to_string(),
            };
            Error::config(
                "training",
                format!(
                    "step {step}: not finite ({terms}); stopped before the optimiser step and \
                     {saved}. Train again with a lower optim.lr or a longer \
                     optim.warmup_steps, or let optim.skip_nonfinite skip a few such batches"
                ),
            )
        }
        StepError::Failed(e) => e,
    }
}
