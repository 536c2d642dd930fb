//! The `densekd bench` command: its arguments and what it prints and writes.

use std::path::PathBuf;

use clap::Args;

use crate::bench::{reference, run, BenchOptions, Reference, TOOL_WORKLOADS, WORKLOADS};
use crate::error::{Error, Result};

/// `densekd bench`'s arguments.
#[derive(Args)]
pub struct BenchArgs {
    /// Workloads, comma-separated (default: all of mobilenet_v2-infer, resnet18-infer,
    /// resnet50-infer, mobilenet_v2-train, resnet18-train, deeplabv3-train, fcos-train,
    /// detr-train (densekd alone), lsap-300x50, eval-coco).
    #[arg(long, value_delimiter = ',')]
    pub workloads: Vec<String>,
    /// Images per step.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub batch: u16,
    /// Image side in pixels.
    #[arg(long, default_value_t = 224, value_parser = clap::value_parser!(u16).range(32..=1024))]
    pub size: u16,
    /// Untimed steps per side first.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Timed steps per side.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..))]
    pub steps: u16,
    /// Threads of each side (PyTorch's intra-op threads; densekd's convolutions and batched
    /// matmuls).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub threads: u16,
    /// Python with torch and torchvision (default: a venv in the cache folder, created and
    /// filled from PyPI on first use).
    #[arg(long)]
    pub python: Option<PathBuf>,
    /// Folder for bench.json, bench.md and eval-coco's generated files.
    #[arg(long, default_value = "runs/bench")]
    pub out: PathBuf,
}

/// Runs `densekd bench`: both sides, the table on stdout, `bench.json` and `bench.md`.
pub fn bench(args: BenchArgs) -> Result<()> {
    let workloads = if args.workloads.is_empty() {
        WORKLOADS
            .iter()
            .chain(&TOOL_WORKLOADS)
            .map(|w| w.to_string())
            .collect()
    } else {
        args.workloads
    };
    let options = BenchOptions {
        workloads,
        batch: args.batch.into(),
        size: args.size.into(),
        warmup: args.warmup,
        steps: args.steps.into(),
        threads: args.threads.into(),
    };
    let python = reference::python(args.python.as_deref())?;
    let mut reference = Reference::start(&python)?;
    std::fs::create_dir_all(&args.out).map_err(|e| Error::io(&args.out, e))?;
    let report = run(&options, &mut reference, &args.out)?;
    print!("{}", report.to_markdown());
    for path in report.write(&args.out)? {
        println!("wrote {}", path.display());
    }
    Ok(())
}
