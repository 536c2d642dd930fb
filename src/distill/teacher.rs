//! Frozen teachers: inference models loaded from an earlier densekd run, evaluated once before
//! training starts and never updated.

use std::path::{Path, PathBuf};

use burn::tensor::backend::AutodiffBackend;

use crate::error::{Error, Result};
use crate::task::{InnerModel, Task};

/// A frozen teacher and where it came from.
#[derive(Debug, Clone)]
pub struct FrozenTeacher<M> {
    /// Its label in `metrics.jsonl` and messages.
    pub label: String,
    /// The exported weights it was loaded from.
    pub source: PathBuf,
    /// The model, without autodiff.
    pub model: M,
}

/// The exported weights a teacher spec names: a run folder's `model.safetensors`, or the file.
pub fn export_path(spec: &Path) -> PathBuf {
    if spec.is_dir() {
        spec.join("model.safetensors")
    } else {
        spec.to_path_buf()
    }
}

impl<M> FrozenTeacher<M> {
    /// Loads the teacher `spec` (a densekd run folder or its `model.safetensors`) for `task`;
    /// a missing file or one of another architecture is an error naming the file.
    pub fn load<B, T>(task: &T, label: &str, spec: &Path) -> Result<Self>
    where
        B: AutodiffBackend,
        T: Task<B>,
        T: Task<B, Model: burn::module::AutodiffModule<B, InnerModule = M>>,
    {
        let source = export_path(spec);
        if !source.is_file() {
            return Err(Error::invalid(
                &source,
                label,
                "no such file: name a finished densekd run folder or its model.safetensors",
            ));
        }
        let model: InnerModel<B, T> = task.load_export(&source)?;
        Ok(FrozenTeacher {
            label: label.to_string(),
            source,
            model,
        })
    }
}
