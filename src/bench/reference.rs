//! The PyTorch side of the bench: `bench/torch_ref.py` (compiled into the binary) run by a
//! Python that has `torch` and `torchvision`, spoken to over JSON lines.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use serde_json::{json, Value};

use crate::bench::BenchOptions;
use crate::error::{Error, Result};

/// The reference script.
const SCRIPT: &str = include_str!("../../bench/torch_ref.py");

/// The packages the reference needs, from PyPI.
const PACKAGES: [&str; 4] = ["torch", "torchvision", "scipy", "pycocotools"];

/// A running reference process.
pub struct Reference {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

/// The bench's own virtual environment, `<cache>/bench-venv`.
pub fn default_venv() -> PathBuf {
    crate::model::pretrained::cache_dir().join("bench-venv")
}

/// A Python with the reference's packages (torch, torchvision, SciPy, pycocotools): `python` if given, else the bench venv's, created
/// and filled from PyPI on first use (about 1 GB of wheels).
pub fn python(python: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = python {
        return Ok(p.to_path_buf());
    }
    let venv = default_venv();
    let bin = venv.join("bin").join("python");
    let has_torch = Command::new(&bin)
        .args(["-c", "import torch, torchvision, scipy, pycocotools"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if has_torch {
        return Ok(bin);
    }
    eprintln!(
        "installing {} from PyPI into {} (first use only)",
        PACKAGES.join(" and "),
        venv.display()
    );
    let run = |cmd: &mut Command, what: &str| -> Result<()> {
        let status = cmd.status().map_err(|e| Error::io(&venv, e))?;
        if status.success() {
            Ok(())
        } else {
            Err(Error::config(
                "--python",
                format!("{what} failed ({status}); pass --python with a Python that has torch"),
            ))
        }
    };
    run(
        Command::new("python3").args(["-m", "venv"]).arg(&venv),
        "creating the venv",
    )?;
    run(
        Command::new(&bin)
            .args(["-m", "pip", "install", "--quiet"])
            .args(PACKAGES),
        "pip install",
    )?;
    Ok(bin)
}

impl Reference {
    /// Starts the reference script under `python`.
    pub fn start(python: &Path) -> Result<Self> {
        let script = crate::model::pretrained::cache_dir().join("torch_ref.py");
        crate::error::write_atomic(&script, SCRIPT.as_bytes())?;
        let mut child = Command::new(python)
            .arg(&script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| Error::io(python, e))?;
        let broken = || Error::config("bench", "could not talk to the reference process");
        let stdin = child.stdin.take().ok_or_else(broken)?;
        let stdout = BufReader::new(child.stdout.take().ok_or_else(broken)?);
        Ok(Reference {
            child,
            stdin,
            stdout,
        })
    }

    /// The reference's process id (to tell its CPU time from other processes').
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn call(&mut self, message: Value) -> Result<Value> {
        let failed = |what: String| Error::config("bench reference", what);
        writeln!(self.stdin, "{message}")
            .and_then(|()| self.stdin.flush())
            .map_err(|e| failed(format!("write: {e}")))?;
        let mut line = String::new();
        let n = self
            .stdout
            .read_line(&mut line)
            .map_err(|e| failed(format!("read: {e}")))?;
        if n == 0 {
            return Err(failed("the process exited (see its messages above)".into()));
        }
        let reply: Value =
            serde_json::from_str(&line).map_err(|e| failed(format!("`{}`: {e}", line.trim())))?;
        if reply["ok"] != true {
            return Err(failed(reply["error"].as_str().unwrap_or("?").to_string()));
        }
        Ok(reply)
    }

    /// PyTorch's version.
    pub fn version(&mut self) -> Result<String> {
        Ok(self.call(json!({"cmd": "version"}))?["torch"]
            .as_str()
            .unwrap_or("?")
            .to_string())
    }

    /// pycocotools on two files: its seconds and 12 stats.
    pub fn cocoeval(&mut self, gt: &Path, dt: &Path) -> Result<(f64, Vec<f64>)> {
        let reply = self.call(json!({"cmd": "cocoeval", "gt": gt, "dt": dt}))?;
        let stats = reply["stats"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default();
        Ok((reply["seconds"].as_f64().unwrap_or(f64::NAN), stats))
    }

    /// SciPy's `linear_sum_assignment` on `cost`, `repeats` times: seconds per solve and the
    /// optimal cost.
    pub fn lsap(&mut self, cost: &[&[f64]], repeats: usize) -> Result<(f64, f64)> {
        let reply = self.call(json!({"cmd": "lsap", "cost": cost, "repeats": repeats}))?;
        Ok((
            reply["seconds"].as_f64().unwrap_or(f64::NAN),
            reply["total"].as_f64().unwrap_or(f64::NAN),
        ))
    }

    /// Builds `workload` on the reference side (`model`: the architecture of workloads built
    /// from a shipped config, `size`: their image side), on the GPU when densekd runs on CUDA:
    /// its FLOPs per step.
    pub fn setup(
        &mut self,
        workload: &str,
        options: &BenchOptions,
        size: usize,
        model: Value,
    ) -> Result<f64> {
        let reply = self.call(json!({
            "cmd": "setup",
            "workload": workload,
            "batch": options.batch,
            "size": size,
            "threads": options.threads,
            "device": if crate::backend::name() == "cuda" { "cuda" } else { "cpu" },
            "model": model,
        }))?;
        Ok(reply["flops"].as_f64().unwrap_or(f64::NAN))
    }

    /// One timed step: its seconds.
    pub fn step(&mut self) -> Result<f64> {
        Ok(self.call(json!({"cmd": "step"}))?["seconds"]
            .as_f64()
            .unwrap_or(f64::NAN))
    }

    /// Peak RSS of the reference since its last setup, bytes.
    pub fn peak_rss(&mut self) -> Result<u64> {
        Ok(self.call(json!({"cmd": "peak_rss"}))?["bytes"]
            .as_u64()
            .unwrap_or(0))
    }
}

impl Drop for Reference {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
