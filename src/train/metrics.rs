//! `metrics.jsonl`: one JSON object per line, appended and flushed as training goes, so a
//! killed run keeps everything up to its last line.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::task::ModelStats;

/// An append-only metrics log.
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// Opens `path`. When resuming from `resume_step`, lines from after that step (written by
    /// the run that was killed) are dropped so the log matches the restored state.
    pub fn open(path: &Path, resume_step: Option<usize>) -> Result<Self> {
        let kept = match resume_step {
            Some(step) if path.exists() => {
                let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
                text.lines()
                    .filter(|line| {
                        serde_json::from_str::<Value>(line)
                            .ok()
                            .and_then(|v| v.get("step").and_then(Value::as_u64))
                            .is_some_and(|s| s as usize <= step)
                    })
                    .map(|l| format!("{l}\n"))
                    .collect::<String>()
            }
            _ => String::new(),
        };
        crate::error::write_atomic(path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(MetricsLog {
            path: path.to_path_buf(),
            file,
        })
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `eval` lines logged at `step`, as (model, stats) in log order; `null` reads as NaN.
    pub fn evals_at(&self, step: usize) -> Result<ModelStats> {
        let text = std::fs::read_to_string(&self.path).map_err(|e| Error::io(&self.path, e))?;
        let mut out = Vec::new();
        for line in text.lines() {
            let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let at = fields.get("step").and_then(Value::as_u64) == Some(step as u64);
            if !at || fields.get("kind").and_then(Value::as_str) != Some("eval") {
                continue;
            }
            let model = fields
                .get("model")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let stats = fields
                .iter()
                .filter(|(k, _)| !matches!(k.as_str(), "kind" | "epoch" | "step" | "model"))
                .map(|(k, v)| (k.clone(), v.as_f64().unwrap_or(f64::NAN)))
                .collect();
            out.push((model.to_string(), stats));
        }
        Ok(out)
    }

    /// Appends one line: `kind`, then `fields` in order.
    pub fn write(&mut self, kind: &str, fields: &[(&str, Value)]) -> Result<()> {
        let mut line = Map::new();
        line.insert("kind".into(), Value::from(kind));
        for (k, v) in fields {
            line.insert((*k).to_string(), v.clone());
        }
        let mut text = Value::Object(line).to_string();
        text.push('\n');
        self.file
            .write_all(text.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }
}
