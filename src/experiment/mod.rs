//! Experiment grids: one config, several variants (override sets) × several seeds, each trained
//! into its own run folder, reused or resumed when run again, and summarised as a report
//! (`report.json`, `report.md`, plots) that is rewritten after every run. Grids are TOML files
//! (`configs/experiments/<name>.toml`): a config, shared overrides and the variants.
//!
//! Overrides of a run apply in this order, later ones winning: the grid's base overrides, the
//! user's `--set` overrides, the variant's own overrides, then `seed=S + k` for seed `k` (`S` the
//! config's seed after the first two). So `--set` can resize every run (epochs, data, model) but
//! cannot collapse the variants into one: a `--set` of a key a variant sets is overridden, with
//! a warning.

pub mod report;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::train::config::{differing_keys, TrainConfig};
pub use report::{
    aggregate, read_run, write_report, MeanStd, ModelSummary, Report, ReportSpec, RunRecord,
    VariantRuns, VariantSummary,
};

/// Where named grids live: `GRIDS_DIR/<name>.toml`.
pub const GRIDS_DIR: &str = "configs/experiments";

/// The overrides every run of `grid` shares: the grid's base, then the caller's `--set`.
fn shared_overrides(grid: &Grid, options: &ExperimentOptions) -> Vec<String> {
    grid.base_overrides
        .iter()
        .chain(&options.overrides)
        .cloned()
        .collect()
}

/// One arm of a grid: a name (also its folder name) and its config overrides.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    /// Name in reports and the run folder `OUT/<name>/`.
    pub name: String,
    /// `dotted.key=value` overrides, as [`TrainConfig::load`] accepts them.
    #[serde(default, rename = "set")]
    pub overrides: Vec<String>,
    /// Another variant whose student trains exactly as this one's would (no distillation against
    /// an EMA that nothing reads back): this variant trains no runs of its own and reports the
    /// student of that variant's runs.
    #[serde(default)]
    pub student_of: Option<String>,
}

impl Variant {
    /// The variant whose runs this one reports: its own name, or [`Variant::student_of`].
    pub fn runs_of(&self) -> &str {
        self.student_of.as_deref().unwrap_or(&self.name)
    }
}

/// A frozen teacher that an experiment trains once, before its variants, into `OUT/teacher`.
#[derive(Debug, Clone, PartialEq)]
pub struct TeacherRun {
    /// The teacher's config.
    pub config: PathBuf,
    /// Its overrides (the user's `--set` applies after them).
    pub overrides: Vec<String>,
}

/// What a variant's override writes for the teacher's run folder.
pub const TEACHER_PLACEHOLDER: &str = "{teacher}";

/// The teacher's run folder in an experiment's output folder.
pub fn teacher_dir(out: &Path) -> PathBuf {
    out.join("teacher")
}

/// A named set of variants trained from one config.
#[derive(Debug, Clone, PartialEq)]
pub struct Grid {
    /// Experiment name (reports, default output folder).
    pub name: String,
    /// The TOML config every run starts from.
    pub config: PathBuf,
    /// The arms, in report order.
    pub variants: Vec<Variant>,
    /// Overrides shared by every run, applied first.
    pub base_overrides: Vec<String>,
    /// A teacher trained first; variants name its folder as `{teacher}`.
    pub teacher: Option<TeacherRun>,
}

/// A grid file's `[teacher]` table: the config (relative to the grid file; the grid's own when
/// absent) and overrides.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TeacherFile {
    config: Option<PathBuf>,
    #[serde(default)]
    set: Vec<String>,
}

/// A grid file: the config (relative to the file), the shared overrides and the variants.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct GridFile {
    config: PathBuf,
    #[serde(default)]
    overrides: Vec<String>,
    #[serde(rename = "variant")]
    variants: Vec<Variant>,
    teacher: Option<TeacherFile>,
}

impl Grid {
    /// Reads a grid file; its name is the file's stem.
    pub fn load(path: &Path) -> Result<Grid> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let file: GridFile = toml::from_str(&text).map_err(|e| {
            Error::invalid(path, "grid", e.to_string().trim_end().replace('\n', "\n  "))
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let config = dir.join(file.config);
        Ok(Grid {
            name: path
                .file_stem()
                .map_or_else(String::new, |s| s.to_string_lossy().into_owned()),
            teacher: file.teacher.map(|t| TeacherRun {
                config: t.config.map_or_else(|| config.clone(), |c| dir.join(c)),
                overrides: t.set,
            }),
            config,
            variants: file.variants,
            base_overrides: file.overrides,
        })
    }
}

/// The names of the grids in [`GRIDS_DIR`].
pub fn known_grids() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(GRIDS_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let p = e.path();
            if p.extension()? != "toml" {
                return None;
            }
            Some(p.file_stem()?.to_string_lossy().into_owned())
        })
        .collect();
    names.sort();
    names
}

/// The grid `name`: a grid file's path, or the name of one in [`GRIDS_DIR`]; an unknown name
/// is an error listing the known ones.
pub fn named_grid(name: &str) -> Result<Grid> {
    let path = Path::new(name);
    if path.extension().is_some_and(|e| e == "toml") {
        return Grid::load(path);
    }
    let file = Path::new(GRIDS_DIR).join(format!("{name}.toml"));
    if !file.is_file() {
        return Err(Error::config(
            "experiment",
            format!(
                "unknown experiment `{name}`; known (in {GRIDS_DIR}): {}",
                known_grids().join(", ")
            ),
        ));
    }
    Grid::load(&file)
}

/// How an experiment runs.
#[derive(Debug, Clone)]
pub struct ExperimentOptions {
    /// Seeds per variant (at least 1).
    pub seeds: usize,
    /// Output folder: `OUT/<variant>/seed-<k>/` and the report files.
    pub out: PathBuf,
    /// The user's `--set` overrides (after the grid's base, before the variant's).
    pub overrides: Vec<String>,
    /// Draw each run's progress bar (when stderr is a terminal).
    pub progress: bool,
}

/// One run of the grid, resolved.
#[derive(Debug, Clone)]
pub struct PlannedRun {
    /// Variant name.
    pub variant: String,
    /// Seed index `k` (0-based).
    pub seed_index: usize,
    /// Run folder.
    pub dir: PathBuf,
    /// Every override, in the order applied.
    pub overrides: Vec<String>,
    /// The resolved config.
    pub config: TrainConfig,
}

/// What a run folder holds relative to the config requested for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Nothing usable yet (or a start killed before its first checkpoint): train from scratch.
    Fresh,
    /// A checkpoint of the same config without `summary.json`: resume it.
    Resume,
    /// `summary.json` of the same config: reuse it.
    Finished,
}

/// The folder of seed `seed_index` of `variant`.
pub fn run_dir(out: &Path, variant: &str, seed_index: usize) -> PathBuf {
    out.join(variant).join(format!("seed-{seed_index}"))
}

/// The key of a `key=value` override (the whole text when there is no `=`).
fn override_key(assignment: &str) -> &str {
    assignment
        .split_once('=')
        .map_or(assignment, |(k, _)| k)
        .trim()
}

/// Whether setting `a` and setting `b` touch the same value (equal, or one a table holding the
/// other).
fn keys_overlap(a: &str, b: &str) -> bool {
    a == b
        || b.strip_prefix(a).is_some_and(|r| r.starts_with('.'))
        || a.strip_prefix(b).is_some_and(|r| r.starts_with('.'))
}

/// Resolves every run of `grid`, seed by seed (all variants of seed 0 first, so an experiment
/// stopped part-way already compares every variant). Loads and validates all configs up front,
/// so a bad override fails before any training.
pub fn plan(grid: &Grid, options: &ExperimentOptions) -> Result<Vec<PlannedRun>> {
    if options.seeds == 0 {
        return Err(Error::config("--seeds", "must be at least 1"));
    }
    if grid.variants.is_empty() {
        return Err(Error::config(
            "experiment",
            format!("grid `{}` has no variants", grid.name),
        ));
    }
    for (i, v) in grid.variants.iter().enumerate() {
        // The name becomes a folder; path separators or `..` would escape `OUT`.
        let bad =
            v.name.is_empty() || v.name == "." || v.name == ".." || v.name.contains(['/', '\\']);
        let taken = grid.teacher.is_some() && v.name == "teacher";
        if bad || taken || grid.variants[..i].iter().any(|w| w.name == v.name) {
            return Err(Error::config(
                "experiment",
                format!(
                    "grid `{}`: variant name `{}` is empty, a duplicate, the teacher's folder \
                     or not a folder name",
                    grid.name, v.name
                ),
            ));
        }
        check_student_of(grid, v)?;
    }
    let shared = shared_overrides(grid, options);
    let base_seed = TrainConfig::load(&grid.config, &shared)?.seed;
    let mut runs = Vec::with_capacity(options.seeds * grid.variants.len());
    for k in 0..options.seeds {
        let seed = base_seed.checked_add(k as u64).ok_or_else(|| {
            Error::config("seed", format!("{base_seed} + {k} does not fit in 64 bits"))
        })?;
        for v in grid.variants.iter().filter(|v| v.student_of.is_none()) {
            let mut overrides = shared.clone();
            for o in &v.overrides {
                overrides.push(with_teacher(grid, options, &v.name, o)?);
            }
            overrides.push(format!("seed={seed}"));
            let config = TrainConfig::load(&grid.config, &overrides).map_err(|e| {
                Error::config(
                    format!("experiment {} variant {}", grid.name, v.name),
                    e.to_string(),
                )
            })?;
            runs.push(PlannedRun {
                variant: v.name.clone(),
                seed_index: k,
                dir: run_dir(&options.out, &v.name, k),
                overrides,
                config,
            });
        }
    }
    Ok(runs)
}

/// A variant that borrows another's student names a variant of the grid that trains its own
/// runs, and sets nothing itself (its overrides would never be trained).
fn check_student_of(grid: &Grid, v: &Variant) -> Result<()> {
    let Some(source) = &v.student_of else {
        return Ok(());
    };
    let context = || format!("experiment {} variant {}", grid.name, v.name);
    if !v.overrides.is_empty() {
        return Err(Error::config(
            context(),
            format!("sets overrides but reports the student of `{source}`'s runs, which they would not change"),
        ));
    }
    match grid.variants.iter().find(|w| &w.name == source) {
        Some(w) if w.student_of.is_none() => Ok(()),
        Some(_) => Err(Error::config(
            context(),
            format!("`student_of = \"{source}\"` names a variant that trains no runs of its own"),
        )),
        None => Err(Error::config(
            context(),
            format!("`student_of = \"{source}\"` names no variant of the grid"),
        )),
    }
}

/// `assignment` with [`TEACHER_PLACEHOLDER`] replaced by the teacher's run folder; an error
/// naming the variant when the grid has no teacher.
fn with_teacher(
    grid: &Grid,
    options: &ExperimentOptions,
    variant: &str,
    assignment: &str,
) -> Result<String> {
    if !assignment.contains(TEACHER_PLACEHOLDER) {
        return Ok(assignment.to_string());
    }
    if grid.teacher.is_none() {
        return Err(Error::config(
            format!("experiment {} variant {variant}", grid.name),
            format!("`{assignment}` names {TEACHER_PLACEHOLDER} but the grid has no [teacher]"),
        ));
    }
    let dir = teacher_dir(&options.out).display().to_string();
    Ok(assignment.replace(TEACHER_PLACEHOLDER, &dir))
}

/// The teacher's resolved run: its config, overrides and then the user's `--set`.
pub fn plan_teacher(grid: &Grid, options: &ExperimentOptions) -> Result<Option<PlannedRun>> {
    let Some(teacher) = &grid.teacher else {
        return Ok(None);
    };
    let overrides: Vec<String> = teacher
        .overrides
        .iter()
        .chain(&options.overrides)
        .cloned()
        .collect();
    let config = TrainConfig::load(&teacher.config, &overrides)
        .map_err(|e| Error::config(format!("experiment {} teacher", grid.name), e.to_string()))?;
    Ok(Some(PlannedRun {
        variant: "teacher".to_string(),
        seed_index: 0,
        dir: teacher_dir(&options.out),
        overrides,
        config,
    }))
}

/// The `--set` overrides that some variant overrides in turn, as `(user override, variant)`.
pub fn shadowed_overrides(grid: &Grid, user: &[String]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for u in user {
        for v in &grid.variants {
            if v.overrides
                .iter()
                .any(|o| keys_overlap(override_key(u), override_key(o)))
            {
                out.push((u.clone(), v.name.clone()));
            }
        }
    }
    out
}

/// What `dir` holds for `config`: a finished run is reused and a checkpointed one resumed only
/// when the saved `config.toml` equals `config`; a differing one is an error naming the folder
/// and the keys, so a changed grid never silently mixes old and new results.
pub fn run_state(dir: &Path, config: &TrainConfig) -> Result<RunState> {
    let saved_path = dir.join("config.toml");
    let finished = dir.join("summary.json").exists();
    let checkpointed = dir.join("checkpoints").join("latest.json").exists();
    if !saved_path.exists() {
        if finished || checkpointed {
            return Err(Error::invalid(
                dir,
                "config.toml",
                "missing, so the run there cannot be checked against the requested config; \
                 remove the folder or choose another --out",
            ));
        }
        return Ok(RunState::Fresh);
    }
    let saved = TrainConfig::load(&saved_path, &[])?;
    let changed = differing_keys(&saved, config)?;
    if !changed.is_empty() {
        return Err(Error::invalid(
            dir,
            "config.toml",
            format!(
                "holds a run of a different config (differs in: {}); remove the folder or \
                 choose another --out",
                changed.join(", ")
            ),
        ));
    }
    Ok(if finished {
        RunState::Finished
    } else if checkpointed {
        RunState::Resume
    } else {
        RunState::Fresh
    })
}

/// What the report of `runs` summarises: their model kind's statistics (one kind for the whole
/// grid) and every model label their distillers evaluate, `student` first.
pub fn report_spec(runs: &[PlannedRun]) -> Result<ReportSpec> {
    let mut metrics = None;
    let mut labels: Vec<String> = Vec::new();
    for run in runs {
        let m = run.config.model()?.metrics();
        if metrics.is_some_and(|x| x != m) {
            return Err(Error::config(
                "experiment",
                format!(
                    "variant {} trains another model kind than the first variant; a grid \
                     compares one kind",
                    run.variant
                ),
            ));
        }
        metrics = Some(m);
        for l in run.config.distill.model_labels() {
            if !labels.iter().any(|x| x == l) {
                labels.push(l.to_string());
            }
        }
    }
    let metrics = metrics.ok_or_else(|| Error::config("experiment", "the grid plans no runs"))?;
    Ok(ReportSpec { metrics, labels })
}

/// Reads the finished runs of `runs` from disk and aggregates them.
pub fn collect_report(
    grid: &Grid,
    options: &ExperimentOptions,
    runs: &[PlannedRun],
) -> Result<Report> {
    let spec = report_spec(runs)?;
    let mut variants = Vec::with_capacity(grid.variants.len());
    for v in &grid.variants {
        let mut records = Vec::new();
        for run in runs.iter().filter(|r| r.variant == v.runs_of()) {
            if let Some(record) = read_run(&run.dir, spec.metrics.headline)? {
                records.push(match v.student_of {
                    Some(_) => record.student_only(),
                    None => record,
                });
            }
        }
        variants.push(VariantRuns {
            name: v.name.clone(),
            overrides: v.overrides.clone(),
            student_of: v.student_of.clone(),
            runs: records,
        });
    }
    let shared = shared_overrides(grid, options);
    let mut report = aggregate(
        &grid.name,
        &grid.config,
        &shared,
        options.seeds,
        &variants,
        &spec,
    );
    if grid.teacher.is_some() {
        report.teacher = read_run(&teacher_dir(&options.out), spec.metrics.headline)?;
        report.total_wall_s += report.teacher.as_ref().map_or(0.0, |t| t.wall_s);
    }
    Ok(report)
}

/// Trains every run of `grid` that is not finished yet (resuming checkpointed ones), rewriting
/// the report in `options.out` after each trained run and at the end. Stops at the first failed
/// run, after rewriting the report from the runs finished so far.
pub fn run_experiment(grid: &Grid, options: &ExperimentOptions) -> Result<Report> {
    let runs = plan(grid, options)?;
    // Check every folder before training anything, so a stale folder is reported at once
    // rather than after an hour of training the runs before it.
    let states = runs
        .iter()
        .map(|r| run_state(&r.dir, &r.config))
        .collect::<Result<Vec<_>>>()?;
    let teacher = plan_teacher(grid, options)?;
    let teacher_state = teacher
        .as_ref()
        .map(|t| run_state(&t.dir, &t.config))
        .transpose()?;
    for (user, variant) in shadowed_overrides(grid, &options.overrides) {
        eprintln!("warning: --set {user} is overridden by variant `{variant}`");
    }
    if let (Some(t), Some(state)) = (&teacher, teacher_state) {
        if state == RunState::Finished {
            eprintln!("teacher ({}): reused", t.dir.display());
        } else {
            eprintln!("teacher ({}): training…", t.dir.display());
            let resume = state == RunState::Resume;
            let summary = crate::train::run::train_run(&t.config, &t.dir, resume, options.progress)
                .map_err(|e| {
                    Error::config(
                        format!("experiment {} teacher ({})", grid.name, t.dir.display()),
                        e.to_string(),
                    )
                })?;
            eprintln!("teacher: done in {:.0} s", summary.wall_s);
        }
    }
    let count = |s: RunState| states.iter().filter(|&&x| x == s).count();
    eprintln!(
        "experiment {}: {} trained variants × {} seeds = {} runs into {} ({} finished, {} to resume, {} to train); backend {}",
        grid.name,
        grid.variants.iter().filter(|v| v.student_of.is_none()).count(),
        options.seeds,
        runs.len(),
        options.out.display(),
        count(RunState::Finished),
        count(RunState::Resume),
        count(RunState::Fresh),
        crate::backend::name(),
    );
    for (i, (run, state)) in runs.iter().zip(&states).enumerate() {
        let tag = format!(
            "[{}/{}] {} seed {}",
            i + 1,
            runs.len(),
            run.variant,
            run.seed_index
        );
        let resume = match state {
            RunState::Finished => {
                eprintln!("{tag}: reused");
                continue;
            }
            RunState::Resume => {
                eprintln!("{tag}: resuming…");
                true
            }
            RunState::Fresh => {
                eprintln!("{tag}: training…");
                false
            }
        };
        let result = crate::train::run::train_run(&run.config, &run.dir, resume, options.progress);
        // The report goes out even when this run failed, so the finished runs stay summarised;
        // the training error, if any, is the one reported.
        let written = collect_report(grid, options, &runs)
            .and_then(|report| write_report(&report, &options.out));
        let summary = result.map_err(|e| {
            Error::config(
                format!("{tag} ({})", run.dir.display()),
                format!("{e}; finished runs are in {}", options.out.display()),
            )
        })?;
        written?;
        let headline = run.config.model()?.metrics().headline;
        let value = summary
            .final_eval
            .iter()
            .find(|(name, _)| name == "student")
            .and_then(|(_, stats)| stats.iter().find(|(k, _)| k == headline))
            .map_or_else(|| "n/a".to_string(), |(_, v)| format!("{v:.4}"));
        eprintln!(
            "{tag}: done in {:.0} s, student {headline} {value}",
            summary.wall_s
        );
    }
    let report = collect_report(grid, options, &runs)?;
    write_report(&report, &options.out)?;
    Ok(report)
}
