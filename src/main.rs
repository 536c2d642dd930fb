//! The `densekd` command line: a thin layer over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use densekd::backend::Inference;
use densekd::data::coco::{CocoDataset, InvalidPolicy};
use densekd::data::export::{self_check, write_split};
use densekd::data::images::load_rgb;
use densekd::data::synth::{Split, SynthConfig};
use densekd::eval::{coco, seg};
use densekd::model::backbone::Arch;
use densekd::model::classify::{classify_images, load_imagenet_model, top_k, ClassScore};
use densekd::model::deeplabv3::config::TestFlips;
use densekd::{Error, Result};

/// mimalloc keeps freed tensor buffers for reuse, where glibc returns large ones to the kernel
/// and faults them in again (docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Knowledge distillation for object detection and semantic segmentation.
#[derive(Parser)]
#[command(name = "densekd", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create, inspect and validate datasets.
    #[command(subcommand)]
    Data(DataCommand),
    /// Evaluate predictions against ground truth.
    #[command(subcommand)]
    Eval(EvalCommand),
    /// ImageNet classification with torchvision weights (checks architectures and weight import).
    Classify(ClassifyArgs),
    /// Train a detector from a TOML config; resumable.
    Train(TrainArgs),
    /// Detect objects with an exported model: COCO results JSON and drawn PNGs.
    Predict(PredictArgs),
    /// Train on several processes or machines (data parallel, like torchrun):
    /// `launch --nproc 2 -- train CONFIG …`.
    Launch(densekd::launch::LaunchArgs),
    /// Train a named grid of variants × seeds and report mean ± std; reuses finished runs.
    Experiment(ExperimentArgs),
    /// Time densekd against PyTorch on identical models, interleaved step by step.
    Bench(densekd::bench::cli::BenchArgs),
}

#[derive(Args)]
struct ExperimentArgs {
    /// Grid: the name of a file in configs/experiments (e.g. od-detr), or a grid file's path.
    name: String,
    /// Seeds per variant (seed k trains with the config's seed + k).
    #[arg(long, default_value_t = 3)]
    seeds: usize,
    /// Output folder (default: runs/experiment-<name>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Override a config value in every run, e.g. `--set optim.epochs=1` (repeatable). Applied
    /// after the grid's base overrides and before each variant's own, so a variant's keys win.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// TOML config every run starts from (default: the one the grid file names).
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Args)]
struct TrainArgs {
    /// TOML config (see configs/).
    config: PathBuf,
    /// Override a config value, e.g. `--set optim.lr=1e-4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Run folder (default: runs/<config name>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in the folder from its latest checkpoint.
    #[arg(long)]
    resume: bool,
}

#[derive(Args)]
struct PredictArgs {
    /// Exported model (a run's model.safetensors).
    #[arg(long)]
    weights: PathBuf,
    /// Image files and/or folders of images.
    #[arg(long, required = true, num_args = 1..)]
    images: Vec<PathBuf>,
    /// Output folder: detections.json and vis/*.png.
    #[arg(long)]
    out: PathBuf,
    /// Keep detections scoring at least this, in [0, 1] (use 0 to evaluate AP with the results).
    #[arg(long, default_value_t = 0.3, value_parser = unit_interval, allow_hyphen_values = true)]
    score_thr: f64,
    /// Detections per image before the threshold (1 to 10000).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..=10_000))]
    max_dets: u16,
    /// COCO ground truth whose image ids the results use (images matched by file name).
    #[arg(long)]
    gt: Option<PathBuf>,
    /// Skip drawing PNGs.
    #[arg(long)]
    no_draw: bool,
    /// A segmenter's test-time flips (default: those its run evaluated with, `[deeplabv3.test]`).
    #[arg(long, value_enum)]
    flips: Option<TestFlips>,
}

#[derive(Args)]
struct ClassifyArgs {
    /// Architecture of the checkpoint.
    #[arg(long, value_enum)]
    arch: Arch,
    /// torchvision checkpoint: .pth (zip or legacy) or .safetensors.
    #[arg(long)]
    weights: PathBuf,
    /// Classes to print per image.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Image files.
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Write the built-in synthetic "shapes" dataset (PNG images, COCO JSON, PNG label maps).
    Synth(SynthArgs),
    /// Validate a COCO instances file (and optionally decode every image it lists).
    Check(CheckArgs),
}

#[derive(Args)]
struct SynthArgs {
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// Number of training images.
    #[arg(long, default_value_t = 800)]
    train: usize,
    /// Number of validation images.
    #[arg(long, default_value_t = 200)]
    val: usize,
    /// Image side in pixels.
    #[arg(long, default_value_t = 128)]
    size: u32,
    /// Random seed; the same seed gives the same dataset.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Read the written val split back and evaluate its ground truth against itself.
    #[arg(long)]
    check: bool,
    /// Replace the output folder when it is not empty (its whole content is deleted).
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct CheckArgs {
    /// COCO instances JSON.
    #[arg(long)]
    coco: PathBuf,
    /// Image folder the file names are relative to; every image is decoded and its size checked.
    #[arg(long)]
    images: Option<PathBuf>,
    /// What to do with unusable annotations.
    #[arg(long, value_enum, default_value_t = PolicyArg::Skip)]
    policy: PolicyArg,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum PolicyArg {
    /// Drop them with a warning.
    Skip,
    /// Fail on the first one.
    Reject,
}

impl From<PolicyArg> for InvalidPolicy {
    fn from(p: PolicyArg) -> Self {
        match p {
            PolicyArg::Skip => InvalidPolicy::Skip,
            PolicyArg::Reject => InvalidPolicy::Reject,
        }
    }
}

#[derive(Subcommand)]
enum EvalCommand {
    /// COCO bbox evaluation, exactly as pycocotools.
    Coco {
        /// Ground-truth COCO instances JSON.
        #[arg(long)]
        gt: PathBuf,
        /// Detections: a COCO results JSON list.
        #[arg(long)]
        dt: PathBuf,
        /// Print one JSON object instead of the 12-line summary.
        #[arg(long)]
        json: bool,
        /// What to do with ground-truth annotations training would skip: warn and evaluate them
        /// as pycocotools does, or fail.
        #[arg(long, value_enum, default_value_t = PolicyArg::Skip)]
        policy: PolicyArg,
    },
    /// Semantic segmentation mIoU, as mmsegmentation (files matched by stem).
    Seg {
        /// Folder of ground-truth label-map PNGs.
        #[arg(long)]
        gt: PathBuf,
        /// Folder of predicted label-map PNGs.
        #[arg(long)]
        pred: PathBuf,
        /// Number of classes K (labels 0..K-1; label maps are 8-bit, so at most 256).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
        num_classes: u16,
        /// Ground-truth label to ignore.
        #[arg(long, default_value_t = 255)]
        ignore_index: u8,
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
}

/// Parses a number in [0, 1] (NaN and negatives are refused by name).
fn unit_interval(text: &str) -> std::result::Result<f64, String> {
    let v: f64 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{text} is outside [0, 1]"))
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| Error::config("json", e.to_string()))
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or_else(|| "nan".to_string(), |v| format!("{:.2}", 100.0 * v))
}

fn synth(args: SynthArgs) -> Result<()> {
    let config = SynthConfig {
        size: args.size,
        seed: args.seed,
        ..SynthConfig::default()
    };
    config.validate().map_err(|m| Error::config("synth", m))?;
    let occupied = std::fs::read_dir(&args.out).is_ok_and(|mut d| d.next().is_some());
    if occupied && !args.force {
        return Err(Error::invalid(
            &args.out,
            "--out",
            "the folder is not empty; writing into it would mix old and new files. Choose an \
             empty folder, or pass --force to replace it whole",
        ));
    }
    if occupied {
        std::fs::remove_dir_all(&args.out).map_err(|e| Error::io(&args.out, e))?;
    }
    for (split, n) in [(Split::Train, args.train), (Split::Val, args.val)] {
        let started = std::time::Instant::now();
        let s = write_split(&args.out, &config, split, n)?;
        println!(
            "{}: {} images, {} objects (small {}, medium {}, large {}), per class {:?} in {:.1}s",
            split.name(),
            s.images,
            s.objects,
            s.small,
            s.medium,
            s.large,
            s.per_class,
            started.elapsed().as_secs_f64()
        );
    }
    println!("wrote {}", args.out.display());
    if args.check && args.val > 0 {
        let (coco, seg) = self_check(&args.out, Split::Val)?;
        println!("self-check on val (ground truth as predictions):");
        for line in coco.summary_lines() {
            println!("{line}");
        }
        println!("mIoU {} aAcc {}", fmt_opt(seg.mIoU), fmt_opt(seg.aAcc));
        // pycocotools' precision is tp / (tp + fp + eps): within 1e-12 of 1 is perfect.
        if (coco.AP - 1.0).abs() > 1e-12 || seg.mIoU != Some(1.0) {
            return Err(Error::config(
                "self-check",
                "ground truth evaluated against itself is not perfect",
            ));
        }
    }
    Ok(())
}

fn check(args: CheckArgs) -> Result<()> {
    let dataset = CocoDataset::load(&args.coco, args.policy.into())?;
    dataset.print_warnings();
    let objects: usize = dataset.images.iter().map(|i| i.objects.len()).sum();
    println!(
        "{}: {} images, {} usable annotations ({} skipped), {} categories",
        args.coco.display(),
        dataset.images.len(),
        objects,
        dataset.skipped.len(),
        dataset.num_classes(),
    );
    if let Some(root) = args.images {
        for entry in &dataset.images {
            let path = root.join(&entry.file_name);
            let img = load_rgb(&path)?;
            if img.dimensions() != (entry.width, entry.height) {
                return Err(Error::invalid(
                    &path,
                    "size",
                    format!(
                        "{}x{} but the annotations say {}x{}",
                        img.width(),
                        img.height(),
                        entry.width,
                        entry.height
                    ),
                ));
            }
        }
        println!(
            "decoded {} images under {}",
            dataset.images.len(),
            root.display()
        );
    }
    Ok(())
}

fn eval(cmd: EvalCommand) -> Result<()> {
    match cmd {
        EvalCommand::Coco {
            gt,
            dt,
            json,
            policy,
        } => {
            let (stats, warnings) = coco::evaluate_files(&gt, &dt, policy.into())?;
            for w in warnings {
                eprintln!("warning: {w}");
            }
            if json {
                println!("{}", to_json(&stats)?);
            } else {
                for line in stats.summary_lines() {
                    println!("{line}");
                }
            }
        }
        EvalCommand::Seg {
            gt,
            pred,
            num_classes,
            ignore_index,
            json,
        } => {
            let stats = seg::evaluate_dirs(&gt, &pred, num_classes.into(), ignore_index)?;
            if json {
                println!("{}", to_json(&stats)?);
            } else {
                println!("class   IoU");
                for (c, iou) in stats.IoU.iter().enumerate() {
                    println!("{c:>5} {:>6}", fmt_opt(*iou));
                }
                println!("mIoU {}  aAcc {}", fmt_opt(stats.mIoU), fmt_opt(stats.aAcc));
            }
        }
    }
    Ok(())
}

fn classify(args: ClassifyArgs) -> Result<()> {
    #[derive(serde::Serialize)]
    struct Ranked {
        image: String,
        top: Vec<ClassScore>,
    }
    let device = densekd::backend::device();
    let (model, report) =
        load_imagenet_model::<densekd::backend::Inference>(args.arch, &args.weights, &device)?;
    if !report.unused.is_empty() {
        eprintln!(
            "warning: {} tensors in {} were not used: {:?}",
            report.unused.len(),
            args.weights.display(),
            report.unused
        );
    }
    let mut ranked = Vec::with_capacity(args.images.len());
    let mut skipped = Vec::new();
    // Small batches keep memory flat for long image lists.
    for chunk in args.images.chunks(8) {
        let mut paths = Vec::with_capacity(chunk.len());
        let mut images = Vec::with_capacity(chunk.len());
        for path in chunk {
            match load_rgb(path) {
                Ok(image) => {
                    paths.push(path);
                    images.push(image);
                }
                Err(e) => skipped.push(e),
            }
        }
        if images.is_empty() {
            continue;
        }
        for (path, logits) in paths
            .into_iter()
            .zip(classify_images(&model, &images, &device)?)
        {
            ranked.push(Ranked {
                image: path.display().to_string(),
                top: top_k(&logits, args.top),
            });
        }
    }
    if args.json {
        println!("{}", to_json(&ranked)?);
    } else {
        for r in &ranked {
            println!("{}", r.image);
            for s in &r.top {
                println!(
                    "  class {:>4}  logit {:>8.4}  prob {:.4}",
                    s.class, s.logit, s.prob
                );
            }
        }
    }
    skipped_images(&skipped, args.images.len())
}

fn train(args: TrainArgs) -> Result<()> {
    use densekd::train::config::TrainConfig;
    let config = TrainConfig::load(&args.config, &args.set)?;
    let run_dir = args.out.unwrap_or_else(|| {
        let stem = args.config.file_stem().unwrap_or_default();
        PathBuf::from("runs").join(stem)
    });
    let world = densekd::train::collective::World::from_env()?;
    if world.as_ref().is_some_and(|w| w.size > 1) {
        // The worker processes already share the cores.
        densekd::backend::set_op_threads(1);
    }
    let leader = world.as_ref().is_none_or(|w| w.is_leader());
    if leader {
        eprintln!("backend: {}", densekd::backend::name());
    }
    let options = densekd::train::RunOptions {
        run_dir: run_dir.clone(),
        resume: args.resume,
        stop_after: None,
        progress: true,
        world,
    };
    let summary = densekd::train::run::train_with_options(&config, &options)?;
    if !leader {
        return Ok(());
    }
    for (name, stats) in &summary.final_eval {
        println!("{name}:");
        for (k, v) in stats {
            println!("  {k:<5} {v:.4}");
        }
    }
    println!(
        "{} steps in {:.1} s; run folder {} (model.safetensors, metrics.jsonl, summary.json, *.png)",
        summary.steps,
        summary.wall_s,
        run_dir.display()
    );
    Ok(())
}

fn experiment(args: ExperimentArgs) -> Result<()> {
    use densekd::experiment::{named_grid, run_experiment, ExperimentOptions};
    let mut grid = named_grid(&args.name)?;
    if let Some(config) = args.config {
        grid.config = config;
    }
    let out = args
        .out
        .unwrap_or_else(|| PathBuf::from("runs").join(format!("experiment-{}", grid.name)));
    let options = ExperimentOptions {
        seeds: args.seeds,
        out: out.clone(),
        overrides: args.set,
        progress: true,
    };
    let report = run_experiment(&grid, &options)?;
    print!("{}", report.to_markdown());
    println!(
        "\nreport: {} (also report.json and plots)",
        out.join("report.md").display()
    );
    Ok(())
}

fn predict(args: PredictArgs) -> Result<()> {
    use densekd::predict::{collect_images, predict, PredictOptions};
    let images = collect_images(&args.images)?;
    let options = PredictOptions {
        score_thr: args.score_thr,
        max_dets: args.max_dets.into(),
        gt: args.gt,
        draw: !args.no_draw,
        flips: args.flips,
    };
    let device = densekd::backend::device();
    let summary = predict::<Inference>(&args.weights, &images, &args.out, &options, &device)?;
    match summary.detections {
        Some(n) => println!(
            "{n} detections on {} images -> {}",
            summary.images,
            summary.results.display()
        ),
        None => println!(
            "label maps of {} images -> {}",
            summary.images,
            summary.results.display()
        ),
    }
    skipped_images(&summary.skipped, images.len())
}

/// Reports the images a command could not read; an error when there were any, after the others'
/// results were written.
fn skipped_images(skipped: &[Error], total: usize) -> Result<()> {
    for e in skipped {
        eprintln!("skipped: {e}");
    }
    if skipped.is_empty() {
        return Ok(());
    }
    Err(Error::config(
        "--images",
        format!(
            "{} of {total} images could not be read (listed above); the results of the others \
             were written",
            skipped.len()
        ),
    ))
}

/// mimalloc's `mi_option_purge_delay` (its `mimalloc.h` enum; the Rust bindings name no constant).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> ExitCode {
    // Never hand freed memory back to the kernel: a training step frees and reallocates the
    // same buffers, and each purged one came back as freshly zeroed (huge) pages, about 8 % of
    // a DeepLabV3 step in the kernel (docs/performance.md).
    // SAFETY: sets one process-wide integer option; mimalloc reads it on its next purge.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Data(DataCommand::Synth(args)) => synth(args),
        Command::Data(DataCommand::Check(args)) => check(args),
        Command::Eval(cmd) => eval(cmd),
        Command::Classify(args) => classify(args),
        Command::Train(args) => train(args),
        Command::Launch(args) => densekd::launch::launch(args),
        Command::Predict(args) => predict(args),
        Command::Experiment(args) => experiment(args),
        Command::Bench(args) => densekd::bench::cli::bench(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
