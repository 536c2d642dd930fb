//! What the loop evaluates and writes besides steps: frozen teachers before step 0, the
//! student and the distiller's models at evaluation epochs, the task's epoch-end diagnostics,
//! plots, and the finished run's exports and `summary.json`.

use std::path::Path;
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use serde_json::Value;

use crate::distill::Distiller;
use crate::error::{Error, Result};
use crate::task::number;
use crate::task::{InnerModel, ModelStats, Stats, Task};
use crate::train::checkpoint::LoopState;
use crate::train::metrics::MetricsLog;

/// The task's probe of each labelled model at the last epoch end.
pub(super) type Probes = Vec<(String, Value)>;

/// The label of the trained model in logs and reports.
pub const STUDENT: &str = "student";

/// The task's reported statistics of `stats`, as `AP 0.512, AP50 0.801, …`.
pub(super) fn headline<B: AutodiffBackend, T: Task<B>>(task: &T, stats: &Stats) -> String {
    task.metrics()
        .reported
        .iter()
        .filter_map(|k| stats.iter().find(|(n, _)| n == k))
        .map(|(k, v)| format!("{k} {v:.3}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The student's inference form, labelled `student`, then the distiller's extra models.
fn labelled_models<B, T, D>(distiller: &D, student: &T::Model) -> Vec<(String, InnerModel<B, T>)>
where
    B: AutodiffBackend,
    T: Task<B>,
    D: Distiller<B, T>,
{
    std::iter::once((STUDENT.to_string(), student.valid()))
        .chain(distiller.extra_models())
        .collect()
}

/// Writes one `eval` line.
fn log_eval(log: &mut MetricsLog, state: LoopState, name: &str, stats: &Stats) -> Result<()> {
    let mut fields = vec![
        ("epoch", Value::from(state.epoch)),
        ("step", Value::from(state.step)),
        ("model", Value::from(name)),
    ];
    fields.extend(stats.iter().map(|(k, v)| (k.as_str(), number(*v))));
    log.write("eval", &fields)
}

/// Evaluates the distiller's frozen teachers, logs and prints them, and refuses a teacher that
/// scores at chance (a wrong file or one trained on other data).
pub(super) fn check_teachers<B, T, D>(task: &T, distiller: &D, log: &mut MetricsLog) -> Result<()>
where
    B: AutodiffBackend,
    T: Task<B>,
    D: Distiller<B, T>,
{
    let metrics = task.metrics();
    let start = LoopState {
        step: 0,
        epoch: 0,
        batch: 0,
        next_lr: 0.0,
        seed: 0,
        skipped: 0,
    };
    for teacher in distiller.teachers() {
        let stats = task.evaluate(&teacher.model)?;
        eprintln!(
            "{} ({}): {}",
            teacher.label,
            teacher.source.display(),
            headline(task, &stats)
        );
        log_eval(log, start, &teacher.label, &stats)?;
        let score = stats
            .iter()
            .find(|(k, _)| k == metrics.headline)
            .map_or(0.0, |(_, v)| *v);
        // NaN counts as failing too.
        if score.is_nan() || score <= metrics.chance {
            return Err(Error::invalid(
                &teacher.source,
                &teacher.label,
                format!(
                    "scores {} {score:.4} on this run's validation split, no better than chance \
                     ({}): it was trained on other data or not trained; training not started",
                    metrics.headline, metrics.chance
                ),
            ));
        }
    }
    Ok(())
}

/// Evaluates the student, the distiller's extra models and its evaluations of the trained
/// modules, logging one line each.
pub(super) fn evaluate_all<B, T, D>(
    task: &T,
    distiller: &D,
    (student, trainable): &(T::Model, D::Trainable),
    log: &mut MetricsLog,
    state: LoopState,
) -> Result<ModelStats>
where
    B: AutodiffBackend,
    T: Task<B>,
    D: Distiller<B, T>,
{
    let mut out = Vec::new();
    for (name, m) in labelled_models(distiller, student) {
        let stats = task.evaluate(&m)?;
        out.push((name, stats));
    }
    out.extend(distiller.evaluate_trainable(task, &student.valid(), &trainable.valid())?);
    for (name, stats) in &out {
        log_eval(log, state, name, stats)?;
    }
    Ok(out)
}

/// The task's probes of the student and the distiller's extra models (empty when the task
/// measures nothing).
pub(super) fn probe_all<B, T, D>(task: &T, distiller: &D, student: &T::Model) -> Result<Probes>
where
    B: AutodiffBackend,
    T: Task<B>,
    D: Distiller<B, T>,
{
    let mut out = Vec::new();
    for (name, m) in labelled_models(distiller, student) {
        if let Some(probe) = task.probe(&m)? {
            out.push((name, probe));
        }
    }
    Ok(out)
}

/// Logs the task's diagnostic of each model between its previous and current probe.
pub(super) fn log_diagnostics<B: AutodiffBackend, T: Task<B>>(
    task: &T,
    previous: &Probes,
    current: &Probes,
    log: &mut MetricsLog,
    state: LoopState,
) -> Result<()> {
    for (name, now) in current {
        let Some((_, before)) = previous.iter().find(|(n, _)| n == name) else {
            continue;
        };
        if let Some(d) = task.diagnose(before, now)? {
            let mut fields = vec![
                ("epoch", Value::from(state.epoch)),
                ("step", Value::from(state.step)),
                ("model", Value::from(name.as_str())),
            ];
            fields.extend(d.fields.iter().map(|(k, v)| (k.as_str(), v.clone())));
            log.write(d.kind, &fields)?;
        }
    }
    Ok(())
}

/// Exports the student (`model.safetensors`) and the distiller's extra models
/// (`model-<label>.safetensors`), writes `summary.json` and redraws the plots.
pub(super) fn finish<B, T, D>(
    task: &T,
    distiller: &D,
    student: &T::Model,
    final_eval: &ModelStats,
    log: &MetricsLog,
    state: LoopState,
    start: Instant,
) -> Result<()>
where
    B: AutodiffBackend,
    T: Task<B>,
    D: Distiller<B, T>,
{
    let run_dir = log.path().parent().unwrap_or(Path::new("."));
    task.export(&student.valid(), &run_dir.join("model.safetensors"))?;
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
    plot(log);
    Ok(())
}

/// Redraws the run's plots; a plotting failure is reported, not fatal.
pub(super) fn plot(log: &MetricsLog) {
    let dir = log.path().parent().unwrap_or(Path::new("."));
    if let Err(e) = crate::viz::plot::plot_run(log.path(), dir) {
        eprintln!("warning: could not draw plots: {e}");
    }
}
