//! Checkpoints: a folder per step holding the model, optimiser and distiller records and the
//! loop state with each record's length and SHA-256, made current by atomically rewriting
//! `latest.json`. The folder is written under a temporary name and renamed when complete, so a
//! run killed at any instant (or a full disk) leaves the previous checkpoint intact and no
//! half-written one; a truncated or altered record is refused, naming its file, before loading.

use std::path::{Path, PathBuf};

use crate::digest::sha256_hex;
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
    /// Batches skipped so far for a non-finite loss or gradient (`optim.skip_nonfinite`).
    #[serde(default)]
    pub skipped: usize,
}

/// A checkpoint's `state.json`: the loop state and what each record file must hold.
#[derive(Serialize, Deserialize)]
struct Manifest {
    #[serde(flatten)]
    state: LoopState,
    /// Empty in checkpoints written before records were checksummed.
    #[serde(default)]
    files: Vec<FileSum>,
}

/// The length and SHA-256 of one record file.
#[derive(Serialize, Deserialize)]
struct FileSum {
    name: String,
    bytes: usize,
    sha256: String,
}

impl FileSum {
    fn of(name: &str, bytes: &[u8]) -> Self {
        FileSum {
            name: name.to_string(),
            bytes: bytes.len(),
            sha256: sha256_hex(bytes),
        }
    }
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

    /// Writes a checkpoint and makes it the latest, then removes older ones. On failure the
    /// partial folder is removed and the previous checkpoint stays the latest.
    pub fn save(&self, saved: &Saved) -> Result<()> {
        let name = format!("step-{:08}", saved.state.step);
        let dir = self.root.join(&name);
        let partial = self.root.join(format!("{name}.partial"));
        let written = (|| {
            if partial.exists() {
                std::fs::remove_dir_all(&partial).map_err(|e| Error::io(&partial, e))?;
            }
            let mut files = Vec::with_capacity(saved.parts.len());
            for (part, bytes) in &saved.parts {
                let file = format!("{part}.bin");
                write_atomic(&partial.join(&file), bytes)?;
                files.push(FileSum::of(&file, bytes));
            }
            let manifest = Manifest {
                state: saved.state,
                files,
            };
            let state = serde_json::to_vec_pretty(&manifest)
                .map_err(|e| Error::config("checkpoint", e.to_string()))?;
            write_atomic(&partial.join("state.json"), &state)?;
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            }
            std::fs::rename(&partial, &dir).map_err(|e| Error::io(&dir, e))
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_dir_all(&partial);
            return Err(e);
        }
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

    /// The step of the latest checkpoint, if one was written.
    pub fn latest_step(&self) -> Option<usize> {
        let bytes = std::fs::read(self.root.join("latest.json")).ok()?;
        serde_json::from_slice::<Latest>(&bytes)
            .ok()
            .map(|l| l.step)
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
        let manifest: Manifest =
            serde_json::from_slice(&read(&state_path)?).map_err(|e| Error::Json {
                path: state_path.clone(),
                source: e,
            })?;
        let parts = parts
            .iter()
            .map(|p| {
                let file = format!("{p}.bin");
                let path = dir.join(&file);
                let bytes = read(&path)?;
                if let Some(sum) = manifest.files.iter().find(|f| f.name == file) {
                    verify(&path, &bytes, sum)?;
                }
                Ok(((*p).to_string(), bytes))
            })
            .collect::<Result<Vec<_>>>()?;
        let state = manifest.state;
        Ok(Some(Saved { state, parts }))
    }

    /// The checkpoint folder (for messages).
    pub fn root(&self) -> &Path {
        &self.root
    }
}

/// Refuses record bytes that differ from their manifest entry.
fn verify(path: &Path, bytes: &[u8], sum: &FileSum) -> Result<()> {
    let damaged = |what: String| {
        Err(Error::invalid(
            path,
            "checkpoint",
            format!(
                "{what}; the file is damaged (a copy cut short or altered). Restore it, or \
                 delete the checkpoints folder and train from scratch"
            ),
        ))
    };
    if bytes.len() != sum.bytes {
        return damaged(format!(
            "holds {} bytes where the checkpoint wrote {}",
            bytes.len(),
            sum.bytes
        ));
    }
    if sha256_hex(bytes) != sum.sha256 {
        return damaged("its SHA-256 differs from the one recorded in state.json".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saved(step: usize, parts: &[(&str, &[u8])]) -> Saved {
        Saved {
            state: LoopState {
                step,
                epoch: 0,
                batch: step,
                next_lr: 0.1,
                seed: 3,
                skipped: 0,
            },
            parts: parts
                .iter()
                .map(|(n, b)| (n.to_string(), b.to_vec()))
                .collect(),
        }
    }

    /// A write that fails half-way (here a file name the OS refuses, as a full disk refuses a
    /// write) leaves no partial folder and the previous checkpoint current and loadable.
    #[test]
    fn a_failed_save_keeps_the_previous_checkpoint() {
        let tmp = tempfile::tempdir().expect("tmp");
        let c = Checkpoints::new(tmp.path());
        c.save(&saved(1, &[("model", b"one")])).expect("first");
        let err = c
            .save(&saved(2, &[("model", b"two"), ("bad\0name", b"x")]))
            .expect_err("unwritable part");
        assert!(err.to_string().contains("step-00000002.partial"), "{err}");
        let names: Vec<String> = std::fs::read_dir(c.root())
            .expect("dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.contains("00000002")), "{names:?}");
        assert_eq!(c.latest_step(), Some(1));
        let back = c.load_latest(&["model"]).expect("load").expect("some");
        assert_eq!(back.state.step, 1);
        assert_eq!(back.parts[0].1, b"one");
    }

    proptest::proptest! {
        /// Whatever bytes replace a checkpoint's files, loading returns a value or an error.
        #[test]
        fn damaged_checkpoint_files_never_panic(
            file in 0usize..4,
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256),
        ) {
            let tmp = tempfile::tempdir().expect("tmp");
            let c = Checkpoints::new(tmp.path());
            c.save(&saved(4, &[("model", b"weights"), ("optim", b"moments")])).expect("save");
            let target = match file {
                0 => c.root().join("latest.json"),
                1 => c.root().join("step-00000004/state.json"),
                2 => c.root().join("step-00000004/model.bin"),
                _ => c.root().join("step-00000004/optim.bin"),
            };
            std::fs::write(&target, &bytes).expect("overwrite");
            let loaded = c.load_latest(&["model", "optim"]);
            if file >= 2 {
                // A record file that changed is always caught by its length or checksum.
                proptest::prop_assert!(loaded.is_err() || bytes == b"weights" || bytes == b"moments");
            }
        }
    }
}
