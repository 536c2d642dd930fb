//! `metrics.jsonl`: one JSON object per line, appended and flushed as training goes, so a
//! killed run keeps everything up to its last line.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};

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
