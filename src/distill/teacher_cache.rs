//! An on-disk cache of a frozen teacher's outputs, one safetensors file per batch, keyed by the
//! teacher's weights, the densekd build and the batch's exact pixels. Batches are a function of
//! the seed alone, so the variants of an experiment that share a seed run the teacher once per
//! batch instead of once per variant; a cached output is bit-identical to a recomputed one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use burn::tensor::TensorData;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use sha2::{Digest, Sha256};

use crate::digest::hex;
use crate::error::{write_atomic, Error, Result};

/// A folder of cached teacher outputs for one teacher.
#[derive(Debug)]
pub struct TeacherCache {
    dir: PathBuf,
    /// SHA-256 of the teacher's weights file, of what the caller stores and of this build.
    teacher: [u8; 32],
    /// Set after a failed write (e.g. a full disk): the run goes on without storing.
    write_failed: AtomicBool,
}

impl TeacherCache {
    /// A cache in `dir` for the teacher loaded from `weights`; `schema` names what the caller
    /// stores, so that two kinds of distiller never read each other's entries.
    pub fn open(dir: &Path, weights: &Path, schema: &str) -> Result<Self> {
        let bytes = std::fs::read(weights).map_err(|e| Error::io(weights, e))?;
        let mut hash = Sha256::new();
        hash.update(&bytes);
        hash.update(schema.as_bytes());
        hash.update(build_digest());
        Ok(TeacherCache {
            dir: dir.to_path_buf(),
            teacher: hash.finalize().into(),
            write_failed: AtomicBool::new(false),
        })
    }

    /// The entry of the input `pixels` of shape `shape`.
    pub fn entry(&self, shape: &[usize], pixels: &[f32]) -> PathBuf {
        let mut hash = Sha256::new();
        hash.update(self.teacher);
        for &d in shape {
            hash.update((d as u64).to_le_bytes());
        }
        // In blocks: one `update` per pixel would dominate a cache hit's cost.
        let mut block = Vec::with_capacity(4 * 4096);
        for chunk in pixels.chunks(4096) {
            block.clear();
            block.extend(chunk.iter().flat_map(|p| p.to_le_bytes()));
            hash.update(&block);
        }
        let name = hex(&hash.finalize());
        self.dir.join(format!("{name}.safetensors"))
    }

    /// The tensors stored at `entry` under `names`, or `None` when it is absent; an entry that
    /// cannot be read or lacks a name is an error naming the file.
    pub fn load(&self, entry: &Path, names: &[&str]) -> Result<Option<Vec<TensorData>>> {
        let bytes = match std::fs::read(entry) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(entry, e)),
        };
        let corrupt = |field: &str, why: String| {
            Error::invalid(
                entry,
                field,
                format!("{why}: a damaged teacher-cache entry; delete it (or the folder)"),
            )
        };
        let file =
            SafeTensors::deserialize(&bytes).map_err(|e| corrupt("safetensors", e.to_string()))?;
        names
            .iter()
            .map(|&name| {
                let view = file
                    .tensor(name)
                    .map_err(|e| corrupt(name, e.to_string()))?;
                if view.dtype() != Dtype::F32 {
                    return Err(corrupt(name, format!("dtype {:?}, not F32", view.dtype())));
                }
                Ok(TensorData::from_bytes_vec(
                    view.data().to_vec(),
                    view.shape().to_vec(),
                    burn::tensor::DType::F32,
                ))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// Stores `tensors` (f32) at `entry`, atomically. A failed write is reported once and the
    /// run goes on uncached: the cache saves time, it never costs a run.
    pub fn store(&self, entry: &Path, tensors: &[(&str, &TensorData)]) {
        if self.write_failed.load(Ordering::Relaxed) {
            return;
        }
        let written = tensors
            .iter()
            .map(|(name, data)| {
                TensorView::new(Dtype::F32, data.shape.to_vec(), data.as_bytes())
                    .map(|view| (name.to_string(), view))
            })
            .collect::<std::result::Result<HashMap<_, _>, _>>()
            .map_err(|e| Error::invalid(entry, "safetensors", e.to_string()))
            .and_then(|views| {
                safetensors::tensor::serialize(views, None)
                    .map_err(|e| Error::invalid(entry, "safetensors", e.to_string()))
            })
            .and_then(|bytes| write_atomic(entry, &bytes));
        if let Err(e) = written {
            self.write_failed.store(true, Ordering::Relaxed);
            eprintln!("warning: teacher cache disabled for this run: {e}");
        }
    }
}

/// SHA-256 of the running program. Another build may round the teacher's forward pass
/// differently (kernels, fused operations), so its entries would no longer be bit-identical to
/// a recomputed output: a rebuilt densekd starts a fresh set.
fn build_digest() -> [u8; 32] {
    static DIGEST: OnceLock<[u8; 32]> = OnceLock::new();
    *DIGEST.get_or_init(|| {
        let mut hash = Sha256::new();
        let read = std::env::current_exe()
            .and_then(std::fs::File::open)
            .and_then(|mut exe| std::io::copy(&mut exe, &mut hash));
        if let Err(e) = read {
            eprintln!(
                "warning: cannot read the running program ({e}): teacher-cache entries are \
                 keyed by the version {} only",
                env!("CARGO_PKG_VERSION")
            );
            hash.update(env!("CARGO_PKG_VERSION"));
        }
        hash.finalize().into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_depend_on_teacher_and_pixels() {
        let tmp = tempfile::tempdir().expect("tmp");
        let weights = tmp.path().join("w.safetensors");
        std::fs::write(&weights, b"teacher one").expect("weights");
        let cache = TeacherCache::open(&tmp.path().join("cache"), &weights, "s").expect("open");
        let pixels = [0.5f32, -1.0, 2.0, 0.0];
        let entry = cache.entry(&[1, 1, 2, 2], &pixels);
        assert_ne!(entry, cache.entry(&[1, 1, 2, 2], &[0.5, -1.0, 2.0, 1e-9]));
        assert_ne!(entry, cache.entry(&[1, 1, 4, 1], &pixels));
        let other = TeacherCache::open(&tmp.path().join("cache"), &weights, "t").expect("open");
        assert_ne!(entry, other.entry(&[1, 1, 2, 2], &pixels));

        assert!(cache.load(&entry, &["a"]).expect("absent").is_none());
        let a = TensorData::new(vec![1.5f32, f32::MIN_POSITIVE, -0.0], [1, 3]);
        let b = TensorData::new(vec![7.0f32; 4], [2, 2]);
        cache.store(&entry, &[("a", &a), ("b", &b)]);
        let back = cache
            .load(&entry, &["b", "a"])
            .expect("load")
            .expect("stored");
        assert_eq!(back, vec![b, a]);

        assert!(cache
            .load(&entry, &["c"])
            .expect_err("missing name")
            .to_string()
            .contains("c"));
        std::fs::write(&entry, b"\x10\x00").expect("corrupt");
        let e = cache.load(&entry, &["a"]).expect_err("corrupt");
        assert!(e.to_string().contains(&*entry.to_string_lossy()), "{e}");
    }
}
