//! The experiment report: finished run folders read back ([`read_run`]), aggregated over seeds
//! ([`aggregate`], no I/O, so it is testable without training) and written out
//! ([`write_report`]: `report.json`, `report.md`, a plot of the headline statistic such as
//! `ap.png`, `instability.png`), for the statistics of the runs' model kind and the model labels
//! of their distillers.
//!
//! One file although it passes 600 lines: the record, the aggregate and the three renderings
//! are one schema (the keys `report.json` and `report.md` name are those the aggregate fills),
//! and splitting readers from renderers would spread that schema over files that must change
//! together.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::error::{write_atomic, Error, Result};
use crate::task::{number, Metrics};
use crate::viz::plot::{line_plot, Series};

/// The model label of the trained network in `summary.json` and `metrics.jsonl`.
const STUDENT: &str = "student";

/// What a report summarises: the model kind's statistics and the models the runs evaluate.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportSpec {
    /// The statistics, from the model kind's task.
    pub metrics: Metrics,
    /// Model labels, `student` first, then the distillers' (e.g. `ema`).
    pub labels: Vec<String>,
}

/// What one finished run left on disk, as the report needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    /// The run folder.
    pub dir: PathBuf,
    /// `summary.json` `wall_s`: seconds of the run's last invocation only, so a resumed run
    /// under-reports its total training time.
    pub wall_s: f64,
    /// Final statistics per model label (`summary.json` `final`); null values are left out.
    pub final_stats: BTreeMap<String, BTreeMap<String, f64>>,
    /// The headline statistic per model label and epoch, from `metrics.jsonl` eval lines.
    pub curve: BTreeMap<String, BTreeMap<u64, f64>>,
    /// Instability `fraction` per model label and epoch, from `metrics.jsonl` instability lines.
    pub instability_curve: BTreeMap<String, BTreeMap<u64, f64>>,
    /// The `fraction` of the last instability line per model label.
    pub final_instability: BTreeMap<String, f64>,
}

impl RunRecord {
    /// The record with the student's numbers only, for a variant that reports another
    /// variant's student.
    pub fn student_only(mut self) -> RunRecord {
        self.final_stats.retain(|label, _| label == STUDENT);
        self.curve.retain(|label, _| label == STUDENT);
        self.instability_curve.retain(|label, _| label == STUDENT);
        self.final_instability.retain(|label, _| label == STUDENT);
        self
    }
}

/// Reads the run in `dir`: `None` when it has no `summary.json` (not finished), else its summary
/// and metrics, with the curve of the statistic `headline`. Malformed files are errors naming
/// the file and the field or line.
pub fn read_run(dir: &Path, headline: &str) -> Result<Option<RunRecord>> {
    let summary_path = dir.join("summary.json");
    if !summary_path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&summary_path).map_err(|e| Error::io(&summary_path, e))?;
    let summary: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: summary_path.clone(),
        source,
    })?;
    let wall_s = summary
        .get("wall_s")
        .and_then(Value::as_f64)
        .ok_or_else(|| Error::invalid(&summary_path, "wall_s", "missing or not a number"))?;
    let finals = summary
        .get("final")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::invalid(&summary_path, "final", "missing or not an object"))?;
    let mut final_stats = BTreeMap::new();
    for (model, stats) in finals {
        let stats = stats.as_object().ok_or_else(|| {
            Error::invalid(&summary_path, format!("final.{model}"), "not an object")
        })?;
        // Null is how the loop writes a non-finite statistic; it counts as missing.
        let numbers = stats
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
            .collect();
        final_stats.insert(model.clone(), numbers);
    }

    let mut record = RunRecord {
        dir: dir.to_path_buf(),
        wall_s,
        final_stats,
        curve: BTreeMap::new(),
        instability_curve: BTreeMap::new(),
        final_instability: BTreeMap::new(),
    };
    let metrics_path = dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&metrics_path).map_err(|e| Error::io(&metrics_path, e))?;
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let field = format!("line {}", index + 1);
        let invalid = |message: String| Error::invalid(&metrics_path, &field, message);
        let line: Map<String, Value> =
            serde_json::from_str(line).map_err(|e| invalid(format!("not a JSON object: {e}")))?;
        let kind = line.get("kind").and_then(Value::as_str).unwrap_or_default();
        if kind != "eval" && kind != "instability" {
            continue;
        }
        let model = match line.get("model") {
            None => STUDENT,
            Some(v) => v
                .as_str()
                .ok_or_else(|| invalid("`model` is not a string".into()))?,
        };
        let epoch = line
            .get("epoch")
            .and_then(Value::as_u64)
            .ok_or_else(|| invalid(format!("`{kind}` line without an integer `epoch`")))?;
        // Later lines win, so a repeated evaluation of an epoch counts once.
        if kind == "eval" {
            if let Some(y) = line.get(headline).and_then(Value::as_f64) {
                record
                    .curve
                    .entry(model.to_string())
                    .or_default()
                    .insert(epoch, y);
            }
        } else {
            let fraction = match line.get("fraction") {
                // Null is how the log writes a non-finite number: a missing value, not an error.
                Some(Value::Null) => continue,
                v => v
                    .and_then(Value::as_f64)
                    .ok_or_else(|| invalid("instability line without numeric `fraction`".into()))?,
            };
            record
                .instability_curve
                .entry(model.to_string())
                .or_default()
                .insert(epoch, fraction);
            record.final_instability.insert(model.to_string(), fraction);
        }
    }
    Ok(Some(record))
}

/// Mean and sample standard deviation of a value over seeds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MeanStd {
    /// Mean.
    pub mean: f64,
    /// Sample standard deviation (n − 1); 0 for a single value.
    pub std: f64,
    /// Number of values.
    pub n: usize,
}

impl ModelSummary {
    /// The final statistic `key`.
    pub fn stat(&self, key: &str) -> Option<MeanStd> {
        self.stats
            .iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| *v)
    }
}

impl MeanStd {
    /// The mean and sample std of the finite `values`; `None` when there are none.
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<MeanStd> {
        let values: Vec<f64> = values.into_iter().filter(|v| v.is_finite()).collect();
        let n = values.len();
        if n == 0 {
            return None;
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let std = if n > 1 {
            let ss: f64 = values.iter().map(|v| (v - mean).powi(2)).sum();
            (ss / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        Some(MeanStd { mean, std, n })
    }
}

/// One model label's numbers over the seeds of a variant.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ModelSummary {
    /// Final value of each reported statistic, in the spec's order.
    pub stats: Vec<(String, Option<MeanStd>)>,
    /// Instability `fraction` of the last instability line.
    pub instability: Option<MeanStd>,
    /// Mean headline statistic per epoch over the seeds that evaluated that epoch.
    pub curve: Vec<(f64, f64)>,
    /// Mean instability per epoch over the seeds that logged that epoch.
    pub instability_curve: Vec<(f64, f64)>,
}

/// One variant's row of the report.
#[derive(Debug, Clone, PartialEq)]
pub struct VariantSummary {
    /// Variant name.
    pub name: String,
    /// The variant's own overrides.
    pub overrides: Vec<String>,
    /// The variant whose runs' student this one reports, when it trains none of its own.
    pub student_of: Option<String>,
    /// Finished seeds.
    pub seeds: usize,
    /// Per model label of the spec, `student` first (all `None` / empty for a label the
    /// variant's runs do not have).
    pub models: Vec<(String, ModelSummary)>,
    /// Seconds per run (see [`RunRecord::wall_s`]).
    pub wall_s: Option<MeanStd>,
}

impl VariantSummary {
    /// The summary of the model `label`.
    pub fn model(&self, label: &str) -> Option<&ModelSummary> {
        self.models.iter().find(|(l, _)| l == label).map(|(_, m)| m)
    }

    /// The student's summary.
    pub fn student(&self) -> &ModelSummary {
        &self.models[0].1
    }
}

/// A variant's finished runs, the input of [`aggregate`].
#[derive(Debug, Clone)]
pub struct VariantRuns {
    /// Variant name.
    pub name: String,
    /// The variant's own overrides.
    pub overrides: Vec<String>,
    /// The variant whose runs' student these are, when it trains none of its own.
    pub student_of: Option<String>,
    /// Its finished runs (another variant's, student only, with `student_of`).
    pub runs: Vec<RunRecord>,
}

/// The whole experiment's report.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Experiment name.
    pub experiment: String,
    /// The config every run starts from.
    pub config: PathBuf,
    /// The compiled-in backend ([`crate::backend::name`]).
    pub backend: String,
    /// Overrides shared by every run (grid base, then `--set`).
    pub overrides: Vec<String>,
    /// Seeds requested per variant.
    pub seeds: usize,
    /// What is summarised.
    pub spec: ReportSpec,
    /// One row per variant, in grid order.
    pub variants: Vec<VariantSummary>,
    /// Sum of the finished runs' `wall_s` (the teacher's included).
    pub total_wall_s: f64,
    /// The experiment's frozen teacher, once trained.
    pub teacher: Option<RunRecord>,
}

/// Per epoch, the mean over the runs that have that epoch.
fn mean_curve<'a>(curves: impl Iterator<Item = &'a BTreeMap<u64, f64>>) -> Vec<(f64, f64)> {
    let mut sums: BTreeMap<u64, (f64, usize)> = BTreeMap::new();
    for curve in curves {
        for (&epoch, &y) in curve {
            if y.is_finite() {
                let s = sums.entry(epoch).or_default();
                s.0 += y;
                s.1 += 1;
            }
        }
    }
    sums.into_iter()
        .map(|(epoch, (sum, n))| (epoch as f64, sum / n as f64))
        .collect()
}

fn model_summary(runs: &[RunRecord], model: &str, metrics: &Metrics) -> ModelSummary {
    let stat = |key: &str| {
        MeanStd::of(
            runs.iter()
                .filter_map(|r| r.final_stats.get(model)?.get(key).copied()),
        )
    };
    ModelSummary {
        stats: metrics
            .reported
            .iter()
            .map(|k| (k.to_string(), stat(k)))
            .collect(),
        instability: MeanStd::of(
            runs.iter()
                .filter_map(|r| r.final_instability.get(model).copied()),
        ),
        curve: mean_curve(runs.iter().filter_map(|r| r.curve.get(model))),
        instability_curve: mean_curve(runs.iter().filter_map(|r| r.instability_curve.get(model))),
    }
}

/// Aggregates finished runs into the report (pure: no I/O).
pub fn aggregate(
    experiment: &str,
    config: &Path,
    overrides: &[String],
    seeds: usize,
    variants: &[VariantRuns],
    spec: &ReportSpec,
) -> Report {
    let rows = variants
        .iter()
        .map(|v| VariantSummary {
            name: v.name.clone(),
            overrides: v.overrides.clone(),
            student_of: v.student_of.clone(),
            seeds: v.runs.len(),
            models: spec
                .labels
                .iter()
                .map(|l| (l.clone(), model_summary(&v.runs, l, &spec.metrics)))
                .collect(),
            wall_s: MeanStd::of(v.runs.iter().map(|r| r.wall_s)),
        })
        .collect();
    Report {
        experiment: experiment.to_string(),
        config: config.to_path_buf(),
        backend: crate::backend::name().to_string(),
        overrides: overrides.to_vec(),
        seeds,
        spec: spec.clone(),
        variants: rows,
        // A borrowed student's runs are counted with the variant that trained them.
        total_wall_s: variants
            .iter()
            .filter(|v| v.student_of.is_none())
            .flat_map(|v| &v.runs)
            .map(|r| r.wall_s)
            .sum(),
        teacher: None,
    }
}

/// The key prefix of a model label's columns: none for the student, `<label>_` otherwise.
fn prefix(label: &str) -> String {
    match label {
        STUDENT => String::new(),
        _ => format!("{label}_"),
    }
}

/// The column-title prefix of a model label: none for the student, `<label> ` otherwise.
fn title(label: &str) -> String {
    match label {
        STUDENT => String::new(),
        _ => format!("{label} "),
    }
}

fn mean(v: Option<MeanStd>) -> Value {
    v.map_or(Value::Null, |m| number(m.mean))
}

fn std(v: Option<MeanStd>) -> Value {
    v.map_or(Value::Null, |m| number(m.std))
}

/// `mean ± std` with 4 decimals, or a dash when missing.
fn pm(v: Option<MeanStd>) -> String {
    v.map_or_else(
        || "–".to_string(),
        |m| format!("{:.4} ± {:.4}", m.mean, m.std),
    )
}

fn plain(v: Option<MeanStd>, decimals: usize) -> String {
    v.map_or_else(|| "–".to_string(), |m| format!("{:.*}", decimals, m.mean))
}

impl Report {
    /// With a frozen teacher, each variant's training cost beyond the first variant (the
    /// baseline): its mean wall time minus the baseline's, plus the teacher's training when the
    /// variant distils from it (LGD's Table 7); `None` without a teacher or timings.
    fn extra_wall_s(&self, v: &VariantSummary) -> Option<f64> {
        let teacher = self.teacher.as_ref()?;
        let base = self.variants.first()?.wall_s?.mean;
        let uses_teacher = v
            .overrides
            .iter()
            .any(|o| o.contains(crate::experiment::TEACHER_PLACEHOLDER));
        Some(v.wall_s?.mean - base + if uses_teacher { teacher.wall_s } else { 0.0 })
    }

    /// The `report.json` object: per variant, `<stat>_mean` / `<stat>_std` of the student and
    /// `<label>_<stat>_mean` / `_std` of the other models; missing values are null.
    pub fn to_json(&self) -> Value {
        let variants: Vec<Value> = self
            .variants
            .iter()
            .map(|v| {
                let mut row = Map::new();
                row.insert("name".into(), json!(v.name));
                row.insert("overrides".into(), json!(v.overrides));
                row.insert("student_of".into(), json!(v.student_of));
                row.insert("seeds".into(), json!(v.seeds));
                for (label, m) in &v.models {
                    let prefix = prefix(label);
                    for (k, stat) in &m.stats {
                        row.insert(format!("{prefix}{k}_mean"), mean(*stat));
                        row.insert(format!("{prefix}{k}_std"), std(*stat));
                    }
                }
                for (label, m) in &v.models {
                    row.insert(
                        format!("{}instability_mean", prefix(label)),
                        mean(m.instability),
                    );
                }
                row.insert("wall_s_mean".into(), mean(v.wall_s));
                if self.teacher.is_some() {
                    let extra = self.extra_wall_s(v).map_or(Value::Null, number);
                    row.insert("extra_wall_s".into(), extra);
                }
                Value::Object(row)
            })
            .collect();
        let teacher = self.teacher.as_ref().map_or(Value::Null, |t| {
            let mut row = Map::new();
            row.insert("dir".into(), json!(t.dir.display().to_string()));
            for k in self.spec.metrics.reported {
                let v = t.final_stats.get(STUDENT).and_then(|s| s.get(*k));
                row.insert(k.to_string(), v.map_or(Value::Null, |v| number(*v)));
            }
            row.insert("wall_s".into(), number(t.wall_s));
            Value::Object(row)
        });
        json!({
            "experiment": self.experiment,
            "config": self.config.display().to_string(),
            "backend": self.backend,
            "overrides": self.overrides,
            "seeds": self.seeds,
            "total_wall_s": number(self.total_wall_s),
            "teacher": teacher,
            "variants": variants,
        })
    }

    /// The `report.md` text: a table (AP as `mean ± std` over finished seeds), then the
    /// settings. It holds no date, so an unchanged experiment rewrites it identically.
    pub fn to_markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "# Experiment `{}`\n", self.experiment);
        let labels = &self.spec.labels;
        let mut header = vec!["variant".to_string(), "seeds".to_string()];
        for label in labels {
            for k in self.spec.metrics.reported {
                header.push(format!("{}{k}", title(label)));
            }
        }
        let with_instability = self
            .variants
            .iter()
            .any(|v| v.models.iter().any(|(_, m)| m.instability.is_some()));
        if with_instability {
            header.extend(labels.iter().map(|l| format!("{}instability", title(l))));
        }
        header.push("wall s".to_string());
        if self.teacher.is_some() {
            header.push("extra s".to_string());
        }
        let _ = writeln!(md, "| {} |", header.join(" | "));
        let _ = writeln!(md, "|{}", "---|".repeat(header.len()));
        for v in &self.variants {
            let mut cells = vec![v.name.clone(), format!("{}/{}", v.seeds, self.seeds)];
            for (_, m) in &v.models {
                cells.extend(m.stats.iter().map(|(_, s)| pm(*s)));
            }
            if with_instability {
                cells.extend(v.models.iter().map(|(_, m)| plain(m.instability, 4)));
            }
            cells.push(plain(v.wall_s, 1));
            if self.teacher.is_some() {
                cells.push(
                    self.extra_wall_s(v)
                        .map_or_else(|| "–".to_string(), |x| format!("{x:.1}")),
                );
            }
            let _ = writeln!(md, "| {} |", cells.join(" | "));
        }
        if let Some(t) = &self.teacher {
            let stats: Vec<String> = self
                .spec
                .metrics
                .reported
                .iter()
                .filter_map(|k| {
                    let v = t.final_stats.get(STUDENT)?.get(*k)?;
                    Some(format!("{k} {v:.4}"))
                })
                .collect();
            let _ = writeln!(
                md,
                "\nTeacher (`{}`, trained once): {}; {:.1} s.",
                t.dir.display(),
                stats.join(", "),
                t.wall_s
            );
        }
        let shared = if self.overrides.is_empty() {
            "none".to_string()
        } else {
            self.overrides
                .iter()
                .map(|o| format!("`{o}`"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let _ = writeln!(
            md,
            "\nFinal statistics of each model ({}), mean ± sample std over finished seeds; \
             instability = changed fraction of the last instability line, mean over seeds; \
             wall s = mean seconds per run; extra s (with a teacher) = wall s minus the first \
             variant's, plus the teacher's training for the variants that distil from it.\n\n\
             Backend `{}`; config `{}`; overrides {}; seed k adds `seed=<config seed + k>`.\n\n\
             Total training wall time: {:.0} s (sum of the runs' `wall_s`; a resumed run counts \
             its last invocation only).\n\nVariant overrides (applied after the overrides \
             above):\n",
            labels.join(", "),
            self.backend,
            self.config.display(),
            shared,
            self.total_wall_s,
        );
        for v in &self.variants {
            let own: Vec<String> = v.overrides.iter().map(|o| format!("`{o}`")).collect();
            let own = match (&v.student_of, own.is_empty()) {
                (Some(source), _) => format!(
                    "none; no runs of its own: the student of `{source}`'s runs, which trains \
                     exactly as this variant would (its wall s is theirs)"
                ),
                (None, true) => "none".to_string(),
                (None, false) => own.join(" "),
            };
            let _ = writeln!(md, "- `{}`: {own}", v.name);
        }
        md
    }
}

/// Writes `report.json`, `report.md`, `ap.png` and `instability.png` into `out`. A plot that
/// cannot be drawn is a warning, not an error: the numbers matter more than the pictures.
pub fn write_report(report: &Report, out: &Path) -> Result<()> {
    let json_path = out.join("report.json");
    let text = serde_json::to_string_pretty(&report.to_json()).map_err(|source| Error::Json {
        path: json_path.clone(),
        source,
    })?;
    write_atomic(&json_path, format!("{text}\n").as_bytes())?;
    write_atomic(&out.join("report.md"), report.to_markdown().as_bytes())?;

    // Each model label takes its own block of palette colours, so a variant keeps its colours
    // across both plots (empty series are skipped but keep their slot).
    let series = |pick: fn(&ModelSummary) -> &Vec<(f64, f64)>| -> Vec<Series> {
        let mut out = Vec::new();
        for (i, label) in report.spec.labels.iter().enumerate() {
            for v in &report.variants {
                let points = v.models.get(i).map(|(_, m)| pick(m).clone());
                out.push(Series {
                    name: match i {
                        0 => v.name.clone(),
                        _ => format!("{} {label}", v.name),
                    },
                    points: points.unwrap_or_default(),
                });
            }
        }
        out
    };
    let headline = report.spec.metrics.headline;
    let plots = [
        (
            format!("{}.png", headline.to_lowercase()),
            format!("{}: {headline} (mean over seeds)", report.experiment),
            headline,
            series(|m| &m.curve),
        ),
        (
            "instability.png".to_string(),
            format!(
                "{}: prediction instability (mean over seeds)",
                report.experiment
            ),
            "fraction changed",
            series(|m| &m.instability_curve),
        ),
    ];
    for (file, title, y_label, series) in plots {
        let path = out.join(&file);
        if let Err(e) = line_plot(&path, &title, "epoch", y_label, &series, false) {
            eprintln!("warning: could not draw {}: {e}", path.display());
        }
    }
    Ok(())
}
