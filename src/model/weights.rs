//! Importing PyTorch weights (`.pth` zip or legacy pickle, `.safetensors`) with `burn-store`.
//!
//! Every load reports what was applied, what the module expected but the file lacked (missing),
//! and what the file had but the module did not use (unused). Shape mismatches always fail;
//! missing tensors fail unless partial loading is explicitly allowed, so weights are never
//! loaded silently-partially.

use std::collections::HashSet;
use std::path::Path;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Tensor};
use burn_store::pytorch::PytorchReader;
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

/// Whether file key `key` was loaded into a norm's `gamma` / `beta`: burn's store finds those
/// under PyTorch's `weight` / `bias` but still lists the file keys as unused.
fn loaded_as_norm_affine(key: &str, applied: &HashSet<&str>) -> bool {
    [("weight", "gamma"), ("bias", "beta")]
        .iter()
        .any(|(torch, burn)| {
            key.strip_suffix(torch)
                .and_then(|stem| stem.strip_suffix('.'))
                .is_some_and(|stem| applied.contains(format!("{stem}.{burn}").as_str()))
        })
}

/// Records the paths of float parameters holding NaN or an infinity.
struct NonFinite {
    path: Vec<String>,
    found: Vec<String>,
}

impl<B: Backend> ModuleVisitor<B> for NonFinite {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        // A NaN or infinity makes the sum non-finite; real weights are far too small to overflow.
        let sum = param.val().sum().into_scalar().elem::<f64>();
        if !sum.is_finite() {
            self.found.push(self.path.join("."));
        }
    }
}

/// Refuses a module whose loaded parameters hold NaN or infinities (a damaged file).
fn check_finite<B: Backend, M: Module<B>>(module: &M, path: &Path) -> Result<()> {
    let mut visitor = NonFinite {
        path: Vec::new(),
        found: Vec::new(),
    };
    module.visit(&mut visitor);
    match visitor.found.first() {
        None => Ok(()),
        Some(first) => Err(Error::invalid(
            path,
            "tensors",
            format!(
                "{} tensor(s) hold NaN or infinite values (first: {first}); the file is damaged \
                 or was saved from a diverged run",
                visitor.found.len()
            ),
        )),
    }
}

/// Reads every member of a zip-format `.pth` once, so that the zip's CRC-32 of each member is
/// checked: burn-store reads members by range, which skips the check, and loads a damaged
/// member as zeros. A legacy (non-zip) file passes unchecked.
fn verify_zip(path: &Path) -> Result<()> {
    let damaged = |e: &dyn std::fmt::Display| {
        Error::invalid(
            path,
            "zip",
            format!("the file is damaged or cut short ({e}); download or copy it again"),
        )
    };
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut magic = [0u8; 4];
    use std::io::Read;
    if (&file).read_exact(&mut magic).is_err() || magic != *b"PK\x03\x04" {
        return Ok(());
    }
    let mut archive = zip::ZipArchive::new(file).map_err(|e| damaged(&e))?;
    for i in 0..archive.len() {
        let mut member = archive.by_index(i).map_err(|e| damaged(&e))?;
        let name = member.name().to_string();
        std::io::copy(&mut member, &mut std::io::sink())
            .map_err(|e| damaged(&format!("member {name}: {e}")))?;
    }
    Ok(())
}

/// Checks that a legacy (pre-zip) `.pth` holds exactly the bytes its tensors need: burn-store
/// reads a tensor that lies past the end of a cut-short file as zeros instead of failing. The
/// layout is five pickles (magic, protocol, system info, the state dict, the storage keys)
/// followed by each storage as a u64 element count and its elements.
fn verify_legacy(path: &Path, top_level_key: Option<&str>) -> Result<()> {
    use burn_store::pytorch::pickle_reader::{read_pickle, skip_pickle, Object};
    use std::io::Seek;
    let reader = match top_level_key {
        Some(key) => PytorchReader::with_top_level_key(path, key),
        None => PytorchReader::new(path),
    }
    .map_err(|e| Error::invalid(path, "pickle", e.to_string()))?;
    if !reader.metadata().is_legacy_format() {
        return Ok(());
    }
    let bad = |e: &dyn std::fmt::Display| Error::invalid(path, "pickle", e.to_string());
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut stream = std::io::BufReader::new(file);
    for _ in 0..3 {
        read_pickle(&mut stream).map_err(|e| bad(&e))?;
    }
    skip_pickle(&mut stream).map_err(|e| bad(&e))?;
    let keys = match read_pickle(&mut stream).map_err(|e| bad(&e))? {
        Object::List(keys) => keys.len(),
        _ => return Err(bad(&"the storage key list is missing")),
    };
    let start = stream.stream_position().map_err(|e| Error::io(path, e))?;
    let end = stream
        .seek(std::io::SeekFrom::End(0))
        .map_err(|e| Error::io(path, e))?;
    let held = end - start;
    let tensors = reader.tensors();
    // One storage per tensor (what `torch.save(model.state_dict())` writes) gives the exact
    // size; shared storages give only a lower bound.
    let needed: u64 = if tensors.len() == keys {
        tensors
            .values()
            .map(|t| 8 + (t.shape.num_elements() * t.dtype.size()) as u64)
            .sum()
    } else {
        8 * keys as u64
    };
    let exact = tensors.len() == keys;
    if held < needed || (exact && held != needed) {
        return Err(Error::invalid(
            path,
            "tensors",
            format!(
                "the file holds {held} bytes of tensor data where its {keys} tensors need \
                 {needed}: it is cut short or damaged; download or copy it again"
            ),
        ));
    }
    Ok(())
}

/// Refuses a load in which some tensor failed (e.g. a shape mismatch), naming the first.
fn check_errors(result: &ApplyResult, path: &Path) -> Result<()> {
    match result.errors.first() {
        None => Ok(()),
        Some(err) => Err(Error::invalid(
            path,
            "tensors",
            format!(
                "{} tensor(s) could not be loaded, first: {err}",
                result.errors.len()
            ),
        )),
    }
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
        verify_zip(path)?;
        verify_legacy(path, options.top_level_key.as_deref())?;
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
    check_errors(&result, path)?;
    let applied: HashSet<&str> = result.applied.iter().map(String::as_str).collect();
    let report = LoadReport {
        applied: result.applied.len(),
        missing: result.missing.iter().map(|(p, _)| p.clone()).collect(),
        unused: result
            .unused
            .iter()
            .filter(|k| !is_bookkeeping(k) && !loaded_as_norm_affine(k, &applied))
            .cloned()
            .collect(),
    };
    if !report.missing.is_empty() && !options.allow_partial {
        let shown: Vec<&str> = report.missing.iter().take(5).map(String::as_str).collect();
        return Err(Error::invalid(
            path,
            "tensors",
            format!(
                "{} module tensor(s) missing from the file (first: {}); it holds weights of \
                 another architecture or size",
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
    check_finite(&module, path)?;
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
    let mut store = SafetensorsStore::from_file(path)
        .skip_enum_variants(true)
        .allow_partial(true);
    let result = module
        .load_from(&mut store)
        .map_err(|e| Error::invalid(path, "tensors", e.to_string()))?;
    check_errors(&result, path)?;
    if let Some((first, _)) = result.missing.first() {
        return Err(Error::invalid(
            path,
            "tensors",
            format!(
                "{} tensor(s) of the model are missing (first: {first}); the file was exported \
                 for another model or by another densekd version",
                result.missing.len()
            ),
        ));
    }
    check_finite(&module, path)?;
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
