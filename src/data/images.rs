//! Image files: decoding to RGB with errors that name the file, and listing image folders.

use std::path::{Path, PathBuf};

use image::RgbImage;

use crate::error::{Error, Result};

/// Extensions recognised as images in a folder.
const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// Decodes an image file (PNG or JPEG, any colour type) to 8-bit RGB; grayscale is replicated.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let img = image::load_from_memory(&bytes).map_err(|source| Error::Image {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(img.to_rgb8())
}

/// Encodes `img` as PNG and writes it atomically.
pub fn save_png(path: &Path, img: &RgbImage) -> Result<()> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, image::ImageFormat::Png)
        .map_err(|source| Error::Image {
            path: path.to_path_buf(),
            source,
        })?;
    crate::error::write_atomic(path, bytes.get_ref())
}

/// Image files directly inside `dir` (PNG or JPEG by extension), sorted by name; or `[dir]` when
/// `dir` is itself a file.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    if dir.is_file() {
        return Ok(vec![dir.to_path_buf()]);
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let known = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|k| e.eq_ignore_ascii_case(k)));
        if known && path.is_file() {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}
