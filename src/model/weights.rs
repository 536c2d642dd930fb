//! Importing PyTorch weights (`.pth` zip or legacy pickle, `.safetensors`) with `burn-store`.
//!
//! Every load reports what was applied, what the module expected but the file lacked (missing),
//! and what the file had but the module did not use (unused). Shape mismatches always fail;
//! missing tensors fail unless partial loading is explicitly allowed, so weights are never
//! loaded silently-partially.

use std::path::Path;

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn_store::{
    ApplyResult, KeyRemapper, ModuleSnapshot, PyTorchToBurnAdapter, PytorchStore, SafetensorsStore,
};

use crate::error::{Error, Result};

/// What a weight import did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadReport {
    /// Tensors loaded.
    pub applied: usize,
    /// Module tensors the file did not provide (kept at their initial values).
    pub missing: Vec<String>,
    /// File tensors the module has no place for.
    pub unused: Vec<String>,
}

/// How to read a checkpoint.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Regex rules `(from, to)` applied to the file's keys, in order.
    pub key_rules: Vec<(String, String)>,
    /// Key under which the state dict is nested (`"state_dict"`, `"model"`), if any.
    pub top_level_key: Option<String>,
    /// Accept a file that leaves some module tensors missing.
    pub allow_partial: bool,
}

/// Bookkeeping entries PyTorch saves that carry no weights.
fn is_bookkeeping(key: &str) -> bool {
    key.ends_with("num_batches_tracked")
}

/// Loads `path` into `module`, returning it with the report.
pub fn load_pytorch<B: Backend, M: Module<B> + ModuleSnapshot<B>>(
    mut module: M,
    path: &Path,
    options: &LoadOptions,
) -> Result<(M, LoadReport)> {
    if !path.is_file() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "weights file not found"),
        ));
    }
    let remapper = KeyRemapper::from_patterns(options.key_rules.clone())
        .map_err(|e| Error::config("key_rules", e.to_string()))?;
    let is_safetensors = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    let result: ApplyResult = if is_safetensors {
        let mut store = SafetensorsStore::from_file(path)
            .with_from_adapter(PyTorchToBurnAdapter)
            .remap(remapper)
            .skip_enum_variants(true)
            .allow_partial(true);
        module
            .load_from(&mut store)
            .map_err(|e| Error::invalid(path, "tensors", e.to_string()))?
    } else {
        let mut store = PytorchStore::from_file(path)
            .remap(remapper)
            .allow_partial(true);
        if let Some(key) = &options.top_level_key {
            store = store.with_top_level_key(key.clone());
        }
        module
            .load_from(&mut store)
            .map_err(|e| Error::invalid(path, "tensors", e.to_string()))?
    };
    if let Some(err) = result.errors.first() {
        return Err(Error::invalid(
            path,
            "tensors",
            format!(
                "{} tensor(s) could not be loaded, first: {err:?}",
                result.errors.len()
            ),
        ));
    }
    let report = LoadReport {
        applied: result.applied.len(),
        missing: result.missing.iter().map(|(p, _)| p.clone()).collect(),
        unused: result
            .unused
            .into_iter()
            .filter(|k| !is_bookkeeping(k))
            .collect(),
    };
    if !report.missing.is_empty() && !options.allow_partial {
        let shown: Vec<&str> = report.missing.iter().take(5).map(String::as_str).collect();
        return Err(Error::invalid(
            path,
            "tensors",
            format!(
                "{} module tensor(s) missing from the file (first: {}); set allow_partial to load anyway",
                report.missing.len(),
                shown.join(", ")
            ),
        ));
    }
    if report.applied == 0 {
        return Err(Error::invalid(
            path,
            "tensors",
            "no tensor matched the module; wrong architecture or key layout?",
        ));
    }
    Ok((module, report))
}

/// Writes `module` as `.safetensors` in burn's own layout (no PyTorch renaming), with `metadata`
/// in the header, atomically.
pub fn save_native<B: Backend, M: Module<B> + ModuleSnapshot<B>>(
    module: &M,
    path: &Path,
    metadata: &[(&str, String)],
) -> Result<()> {
    let mut store = SafetensorsStore::from_bytes(None).skip_enum_variants(true);
    for (k, v) in metadata {
        store = store.metadata(*k, v.clone());
    }
    module
        .save_into(&mut store)
        .map_err(|e| Error::invalid(path, "tensors", e.to_string()))?;
    let bytes = store
        .get_bytes()
        .map_err(|e| Error::invalid(path, "tensors", e.to_string()))?;
    crate::error::write_atomic(path, &bytes)
}

/// Loads weights written by [`save_native`]; every module tensor must be present.
pub fn load_native<B: Backend, M: Module<B> + ModuleSnapshot<B>>(
    mut module: M,
    path: &Path,
) -> Result<M> {
    let mut store = SafetensorsStore::from_file(path).skip_enum_variants(true);
    module
        .load_from(&mut store)
        .map_err(|e| Error::invalid(path, "tensors", e.to_string()))?;
    Ok(module)
}

/// The string metadata of a `.safetensors` file's header.
pub fn safetensors_metadata(path: &Path) -> Result<std::collections::HashMap<String, String>> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| Error::io(path, e))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(Error::invalid(
            path,
            "header",
            "not a safetensors file (header too large)",
        ));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)
        .map_err(|e| Error::io(path, e))?;
    let header: serde_json::Value = serde_json::from_slice(&header).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        source: e,
    })?;
    Ok(header
        .get("__metadata__")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default())
}
