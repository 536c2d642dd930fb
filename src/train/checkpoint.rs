//! Checkpoints: a folder per step holding the model, optimiser and distiller records and the
//! loop state, made current by atomically rewriting `latest.json`. A run killed at any instant
//! leaves the previous checkpoint intact.

use std::path::{Path, PathBuf};

use burn::record::{BinBytesRecorder, FullPrecisionSettings, Record, Recorder};
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

use crate::error::{write_atomic, Error, Result};

/// Loop state saved with every checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LoopState {
    /// Optimiser steps done.
    pub step: usize,
    /// Epoch the next step belongs to.
    pub epoch: usize,
    /// Batch index, within that epoch, of the next step.
    pub batch: usize,
    /// Learning rate of the next step (the schedule is a function of `step`; kept for reading).
    pub next_lr: f64,
    /// Run seed; the data order, augmentation and dropout streams derive from it and the step.
    pub seed: u64,
}

#[derive(Serialize, Deserialize)]
struct Latest {
    step: usize,
    dir: String,
}

/// Serialises a record at full precision.
pub fn record_bytes<B: Backend, R: Record<B>>(record: R) -> Result<Vec<u8>> {
    BinBytesRecorder::<FullPrecisionSettings>::default()
        .record(record, ())
        .map_err(|e| Error::config("checkpoint", e.to_string()))
}

/// Reads a record written by [`record_bytes`].
pub fn load_record<B: Backend, R: Record<B>>(
    bytes: Vec<u8>,
    path: &Path,
    device: &B::Device,
) -> Result<R> {
    BinBytesRecorder::<FullPrecisionSettings>::default()
        .load(bytes, device)
        .map_err(|e| Error::invalid(path, "record", e.to_string()))
}

/// The checkpoint folder of a run.
pub struct Checkpoints {
    root: PathBuf,
}

/// The files of one checkpoint, as bytes.
pub struct Saved {
    /// Loop state.
    pub state: LoopState,
    /// Named records (`model`, `optim`, and any the distiller keeps).
    pub parts: Vec<(String, Vec<u8>)>,
}

impl Checkpoints {
    /// Checkpoints under `run_dir/checkpoints`.
    pub fn new(run_dir: &Path) -> Self {
        Checkpoints {
            root: run_dir.join("checkpoints"),
        }
    }

    /// Writes a checkpoint and makes it the latest, then removes older ones.
    pub fn save(&self, saved: &Saved) -> Result<()> {
        let name = format!("step-{:08}", saved.state.step);
        let dir = self.root.join(&name);
        for (part, bytes) in &saved.parts {
            write_atomic(&dir.join(format!("{part}.bin")), bytes)?;
        }
        let state = serde_json::to_vec_pretty(&saved.state)
            .map_err(|e| Error::config("checkpoint", e.to_string()))?;
        write_atomic(&dir.join("state.json"), &state)?;
        let latest = serde_json::to_vec(&Latest {
            step: saved.state.step,
            dir: name.clone(),
        })
        .map_err(|e| Error::config("checkpoint", e.to_string()))?;
        write_atomic(&self.root.join("latest.json"), &latest)?;
        let entries = std::fs::read_dir(&self.root).map_err(|e| Error::io(&self.root, e))?;
        for entry in entries.flatten() {
            let file_name = entry.file_name();
            let other = file_name.to_string_lossy();
            if other.starts_with("step-") && other != name {
                // A stale folder costs only disk space; failing to remove it is not an error.
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        Ok(())
    }

    /// Reads the latest checkpoint, if any; `parts` names the records to load.
    pub fn load_latest(&self, parts: &[&str]) -> Result<Option<Saved>> {
        let latest_path = self.root.join("latest.json");
        if !latest_path.exists() {
            return Ok(None);
        }
        let read = |p: &Path| std::fs::read(p).map_err(|e| Error::io(p, e));
        let latest: Latest =
            serde_json::from_slice(&read(&latest_path)?).map_err(|e| Error::Json {
                path: latest_path.clone(),
                source: e,
            })?;
        let dir = self.root.join(&latest.dir);
        let state_path = dir.join("state.json");
        let state: LoopState =
            serde_json::from_slice(&read(&state_path)?).map_err(|e| Error::Json {
                path: state_path.clone(),
                source: e,
            })?;
        let parts = parts
            .iter()
            .map(|p| Ok(((*p).to_string(), read(&dir.join(format!("{p}.bin")))?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Saved { state, parts }))
    }

    /// The folder holding the latest checkpoint's files (for error messages).
    pub fn root(&self) -> &Path {
        &self.root
    }
}
