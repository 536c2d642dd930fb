//! `densekd bench`: densekd against PyTorch on identical models, interleaved step by step in one
//! invocation so both see the same machine state. The PyTorch side is `bench/torch_ref.py`,
//! driven over JSON lines; the report gives per workload both medians, min–max, the time ratio,
//! peak RSS, FLOPs per step and GFLOP/s, and marks samples during which other processes used
//! the CPU.

pub mod cli;
pub mod reference;
mod tools;
mod workload;

use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use crate::error::{Error, Result};
pub use reference::Reference;
pub use workload::{Workload, WORKLOADS};

/// Workloads that are not networks: Hungarian matching against SciPy and COCO evaluation
/// (5,000 images × 100 detections) against pycocotools.
pub const TOOL_WORKLOADS: [&str; 2] = ["lsap-300x50", "eval-coco"];

/// How to benchmark.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Workload names (see [`WORKLOADS`]).
    pub workloads: Vec<String>,
    /// Images per step.
    pub batch: usize,
    /// Image side in pixels.
    pub size: usize,
    /// Untimed steps per side before sampling.
    pub warmup: usize,
    /// Timed steps per side.
    pub steps: usize,
    /// Threads of each side: PyTorch's intra-op threads, densekd's convolution and
    /// batched-matmul kernels.
    pub threads: usize,
}

/// One side's timings of a workload.
#[derive(Debug, Clone, Serialize)]
pub struct Side {
    /// Seconds per step, in sample order.
    pub seconds: Vec<f64>,
    /// Median seconds over the uncontended samples (all samples when every one was contended).
    pub median_s: f64,
    /// Fastest step.
    pub min_s: f64,
    /// Slowest step.
    pub max_s: f64,
    /// GFLOP/s at the median (networks only).
    pub gflops: Option<f64>,
    /// Peak resident memory during the workload, MiB (networks only).
    pub peak_rss_mib: Option<f64>,
}

/// One workload's result.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadResult {
    /// Its name.
    pub workload: String,
    /// Floating-point operations per step (PyTorch's count of the forward pass; ×3 to train).
    pub flops_per_step: Option<f64>,
    /// Whether both sides computed the same result (tools only: stats, optimal cost).
    pub agrees: Option<bool>,
    /// densekd's timings.
    pub densekd: Side,
    /// PyTorch's timings (none for a workload densekd runs alone).
    pub pytorch: Option<Side>,
    /// densekd median / PyTorch median (above 1: densekd is slower).
    pub time_ratio: Option<f64>,
    /// Sample pairs during which other processes used more than a fifth of a core.
    pub contended: Vec<bool>,
}

/// A whole bench run (`bench.json`).
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// densekd's backend.
    pub backend: String,
    /// PyTorch's version.
    pub torch: String,
    /// Images per step.
    pub batch: usize,
    /// Image side.
    pub size: usize,
    /// Threads of each side (densekd's other flex kernels run on one core).
    pub threads: usize,
    /// Per workload.
    pub results: Vec<WorkloadResult>,
}

/// Interleaved samples of one workload: each side's seconds and whether other processes
/// loaded the CPU during the pair.
#[derive(Default)]
pub struct Sampler {
    ours: Vec<f64>,
    theirs: Vec<f64>,
    contended: Vec<bool>,
    started: Option<CpuSample>,
}

impl Sampler {
    /// Starts a sample pair.
    pub fn begin(&mut self, reference: u32) {
        self.started = Some(CpuSample::now(reference));
    }

    /// Ends a sample pair with both sides' seconds (the reference's, if it ran).
    pub fn end(&mut self, reference: u32, ours: f64, theirs: Option<f64>) {
        let busy = self
            .started
            .take()
            .map_or(0.0, |s| s.others_busy(reference));
        self.ours.push(ours);
        self.theirs.extend(theirs);
        self.contended.push(busy > 0.2);
    }
}

/// Runs every workload on both sides, interleaving their steps, each side on
/// `options.threads` threads; tool workloads write their data into `dir`.
pub fn run(
    options: &BenchOptions,
    reference: &mut Reference,
    dir: &std::path::Path,
) -> Result<BenchReport> {
    crate::backend::with_op_threads(options.threads, || run_all(options, reference, dir))
}

fn run_all(
    options: &BenchOptions,
    reference: &mut Reference,
    dir: &std::path::Path,
) -> Result<BenchReport> {
    let mut results = Vec::new();
    let torch = reference.version()?;
    for name in &options.workloads {
        let mut sampler = Sampler::default();
        let (mut flops, mut rss, mut agrees) = (None, None, None);
        match name.as_str() {
            "lsap-300x50" => agrees = Some(tools::lsap(options.steps, reference, &mut sampler)?),
            "eval-coco" => {
                // pycocotools needs tens of seconds per pass: three pairs suffice.
                let steps = options.steps.min(3);
                agrees = Some(tools::eval_coco(dir, steps, reference, &mut sampler)?);
            }
            _ => {
                let workload = Workload::parse(name)?;
                let paired = match workload.reference_setup(options)? {
                    Some((size, model)) => {
                        flops = Some(reference.setup(name, options, size, model)?);
                        true
                    }
                    None => false,
                };
                let theirs = |reference: &mut Reference| match paired {
                    true => reference.step().map(Some),
                    false => Ok(None),
                };
                workload::reset_peak_rss();
                let mut ours = workload.build(options)?;
                for _ in 0..options.warmup {
                    ours.step()?;
                    theirs(reference)?;
                }
                for _ in 0..options.steps {
                    sampler.begin(reference.pid());
                    let start = Instant::now();
                    ours.step()?;
                    let ours_s = start.elapsed().as_secs_f64();
                    let theirs_s = theirs(reference)?;
                    sampler.end(reference.pid(), ours_s, theirs_s);
                }
                let their_rss = match paired {
                    true => Some(reference.peak_rss()?),
                    false => None,
                };
                rss = Some((workload::peak_rss_bytes(), their_rss));
            }
        }
        let Sampler {
            ours,
            theirs,
            contended,
            ..
        } = sampler;
        let side = |s: Vec<f64>, rss: Option<u64>| summarise(s, &contended, flops, rss);
        let densekd = side(ours, rss.map(|r| r.0));
        let pytorch = (!theirs.is_empty()).then(|| side(theirs, rss.and_then(|r| r.1)));
        let time_ratio = pytorch.as_ref().map(|p| densekd.median_s / p.median_s);
        eprintln!(
            "{name}: densekd {:.2} ms{}{}{}",
            1e3 * densekd.median_s,
            match (&pytorch, time_ratio) {
                (Some(p), Some(r)) =>
                    format!(", reference {:.2} ms, ratio {r:.2}", 1e3 * p.median_s),
                _ => " (densekd alone)".to_string(),
            },
            match agrees {
                Some(true) => ", same result",
                Some(false) => ", DIFFERENT RESULT",
                None => "",
            },
            if contended.iter().any(|&c| c) {
                " (some samples contended)"
            } else {
                ""
            }
        );
        results.push(WorkloadResult {
            workload: name.clone(),
            flops_per_step: flops,
            agrees,
            time_ratio,
            densekd,
            pytorch,
            contended,
        });
    }
    Ok(BenchReport {
        backend: crate::backend::name().to_string(),
        torch,
        batch: options.batch,
        size: options.size,
        threads: options.threads,
        results,
    })
}

/// Median, range and throughput of `seconds`, the median over uncontended samples.
fn summarise(seconds: Vec<f64>, contended: &[bool], flops: Option<f64>, rss: Option<u64>) -> Side {
    let clean: Vec<f64> = seconds
        .iter()
        .zip(contended)
        .filter(|(_, &c)| !c)
        .map(|(s, _)| *s)
        .collect();
    let median_s = median(if clean.is_empty() { &seconds } else { &clean });
    Side {
        min_s: seconds.iter().copied().fold(f64::INFINITY, f64::min),
        max_s: seconds.iter().copied().fold(0.0, f64::max),
        gflops: flops.map(|f| f / median_s / 1e9),
        peak_rss_mib: rss.map(|r| r as f64 / (1 << 20) as f64),
        median_s,
        seconds,
    }
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

/// Busy CPU time of the whole machine and of this process and the reference, from `/proc`.
struct CpuSample {
    at: Instant,
    machine: u64,
    ours: u64,
}

/// Clock ticks per second of `/proc` times (`USER_HZ`, 100 on Linux).
const TICKS: f64 = 100.0;

impl CpuSample {
    fn now(reference: u32) -> Self {
        CpuSample {
            at: Instant::now(),
            machine: machine_busy_ticks(),
            ours: process_ticks("self") + process_ticks(&reference.to_string()),
        }
    }

    /// Cores' worth of CPU that other processes used since this sample.
    fn others_busy(&self, reference: u32) -> f64 {
        let now = CpuSample::now(reference);
        let others = now.machine.saturating_sub(self.machine) as f64
            - now.ours.saturating_sub(self.ours) as f64;
        others.max(0.0) / TICKS / now.at.duration_since(self.at).as_secs_f64().max(1e-3)
    }
}

/// Non-idle ticks of all cores (`/proc/stat`), 0 where unreadable.
fn machine_busy_ticks() -> u64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0;
    };
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: idle and iowait are not busy.
    fields.iter().sum::<u64>()
        - fields.get(3).copied().unwrap_or(0)
        - fields.get(4).copied().unwrap_or(0)
}

/// User + system ticks of a process (`/proc/PID/stat`), 0 where unreadable.
fn process_ticks(pid: &str) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse().ok())
        .collect();
    fields.iter().sum()
}

impl BenchReport {
    /// The report as a Markdown table.
    pub fn to_markdown(&self) -> String {
        let mut out = format!(
            "densekd ({}) against PyTorch {}, {} threads each, batch {}, {}², medians of \
             uncontended interleaved steps; tools against SciPy / pycocotools\n\n\
             | workload | densekd ms (min–max) | reference ms (min–max) | densekd / reference \
             time | GFLOP/s densekd / PyTorch | peak RSS MiB densekd / PyTorch | same result | \
             contended samples |\n|---|---|---|---|---|---|---|---|\n",
            self.backend, self.torch, self.threads, self.batch, self.size
        );
        let pair = |a: Option<f64>, b: Option<f64>, digits: usize| match (a, b) {
            (Some(a), Some(b)) => format!("{a:.digits$} / {b:.digits$}"),
            (Some(a), None) => format!("{a:.digits$} / –"),
            _ => "–".to_string(),
        };
        for r in &self.results {
            let ms = |s: Option<&Side>| match s {
                Some(s) => format!(
                    "{:.2} ({:.2}–{:.2})",
                    1e3 * s.median_s,
                    1e3 * s.min_s,
                    1e3 * s.max_s
                ),
                None => "–".to_string(),
            };
            // Three significant digits for ratios far below 1 (eval-coco is ~0.01×).
            let ratio = match r.time_ratio {
                Some(t) if t < 0.1 => format!("{t:.4}×"),
                Some(t) => format!("{t:.2}×"),
                None => "–".to_string(),
            };
            let theirs = |f: fn(&Side) -> Option<f64>| r.pytorch.as_ref().and_then(f);
            out.push_str(&format!(
                "| {} | {} | {} | {ratio} | {} | {} | {} | {} of {} |\n",
                r.workload,
                ms(Some(&r.densekd)),
                ms(r.pytorch.as_ref()),
                pair(r.densekd.gflops, theirs(|s| s.gflops), 1),
                pair(r.densekd.peak_rss_mib, theirs(|s| s.peak_rss_mib), 0),
                match r.agrees {
                    Some(true) => "yes",
                    Some(false) => "**no**",
                    None => "–",
                },
                r.contended.iter().filter(|&&c| c).count(),
                r.contended.len()
            ));
        }
        out
    }

    /// Writes `bench.json` and `bench.md` into `dir`.
    pub fn write(&self, dir: &std::path::Path) -> Result<Vec<PathBuf>> {
        let json = dir.join("bench.json");
        let md = dir.join("bench.md");
        let bytes =
            serde_json::to_vec_pretty(self).map_err(|e| Error::config("bench", e.to_string()))?;
        crate::error::write_atomic(&json, &bytes)?;
        crate::error::write_atomic(&md, self.to_markdown().as_bytes())?;
        Ok(vec![json, md])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_skip_contended_samples() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        let side = summarise(
            vec![1.0, 9.0, 2.0],
            &[false, true, false],
            Some(3e9),
            Some(1 << 20),
        );
        assert_eq!(side.median_s, 1.5);
        assert_eq!((side.min_s, side.max_s), (1.0, 9.0));
        assert_eq!(side.gflops, Some(2.0));
        assert_eq!(side.peak_rss_mib, Some(1.0));
    }

    #[test]
    fn workloads_parse_build_and_step() {
        let options = BenchOptions {
            workloads: Vec::new(),
            batch: 2,
            size: 32,
            warmup: 0,
            steps: 1,
            threads: 1,
        };
        for name in [
            "resnet18-infer",
            "mobilenet_v2-train",
            "deeplabv3-train",
            "fcos-train",
            "detr-train",
        ] {
            let mut step = Workload::parse(name)
                .and_then(|w| w.build(&options))
                .expect(name);
            step.step().expect("first step");
            step.step().expect("second step");
        }
        for bad in ["resnet18", "vgg-train", "resnet18-fit"] {
            let err = Workload::parse(bad).expect_err(bad).to_string();
            assert!(err.contains(bad) && err.contains("resnet50-infer"), "{err}");
        }
    }

    #[test]
    fn config_workloads_have_the_references_parameters() {
        use crate::backend::Inference;
        use crate::model::deeplabv3::DeepLabV3Config;
        use burn::module::Module;
        let device = Default::default();
        // `bench/torch_ref.py`'s models for the shipped configs (DeepLabV3 with either ASPP): the
        // elements of their `parameters()`, plus the frozen BatchNorm channels whose weight, bias,
        // mean and variance are buffers there and (untrained) parameters here.
        let (section, crop) = workload::deeplabv3_setup().expect("DeepLabV3 config");
        assert_eq!(crop, 128);
        for (separable_aspp, params) in [(false, 3_221_338), (true, 2_248_858)] {
            let config = DeepLabV3Config {
                separable_aspp,
                ..section.model.clone()
            };
            let model = config.init::<Inference>(&device).expect("model");
            assert_eq!(model.num_params(), params + 4 * 15_776, "{separable_aspp}");
        }
        // FCOS keeps MobileNetV2's last 1×1 conv (1,280 more BatchNorm channels); torchvision's
        // head has no per-level scales (3 here).
        let (section, size) = workload::fcos_setup().expect("FCOS config");
        assert_eq!(size, 256);
        let model = section.model.init::<Inference>(&device).expect("model");
        assert_eq!(model.num_params(), 2_694_797 + 4 * 17_056 + 3);
    }

    #[test]
    fn process_ticks_reads_this_process() {
        // Burn some CPU so the count is non-zero on any machine with /proc.
        let mut x = 0u64;
        let start = Instant::now();
        while start.elapsed().as_millis() < 50 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        assert!(x != 1);
        assert!(process_ticks("self") > 0);
        assert!(machine_busy_ticks() > 0);
    }
}
