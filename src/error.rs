//! Errors that name the file and the field at fault.

use std::path::{Path, PathBuf};

/// Result alias for densekd's library API.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A failure with enough context for the user to fix the input.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A JSON file is malformed; serde names the field, line and column.
    #[error("{path}: {source}")]
    Json {
        /// The JSON file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
    /// An image could not be decoded or encoded.
    #[error("{path}: {source}")]
    Image {
        /// The image file.
        path: PathBuf,
        /// The codec error.
        source: image::ImageError,
    },
    /// A value in a file is invalid.
    #[error("{path}: {field}: {message}")]
    Invalid {
        /// The file holding the value.
        path: PathBuf,
        /// Where in the file, e.g. `annotations[3].bbox`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// A computed value is NaN or infinite (diverged training: too high a learning rate).
    #[error("{what} is not finite: the model has diverged")]
    NotFinite {
        /// The value and where it was computed.
        what: String,
    },
    /// A configuration or argument value is invalid.
    #[error("{field}: {message}")]
    Config {
        /// The key or argument name.
        field: String,
        /// What is wrong with it.
        message: String,
    },
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// An invalid value at `field` of `path`.
    pub fn invalid(path: &Path, field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Invalid {
            path: path.to_path_buf(),
            field: field.into(),
            message: message.into(),
        }
    }

    /// An invalid configuration value.
    pub fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, fsync, then rename,
/// so a killed process or a full disk never leaves a truncated file behind.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}
