//! Image files: decoding to RGB with errors that name the file, and listing image folders.

use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageDecoder, RgbImage};

use crate::error::{Error, Result};

/// Extensions recognised as images in a folder.
const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// The largest image side accepted: a header declaring more is refused before any allocation.
pub const MAX_SIDE: u32 = 16_384;

/// The largest pixel count accepted (a 16k × 16k image); bounds every decode's allocation.
pub const MAX_PIXELS: u64 = 1 << 28;

/// Refuses a declared `width` × `height` that is empty or exceeds [`MAX_SIDE`] / [`MAX_PIXELS`].
pub fn check_size(path: &Path, width: u32, height: u32) -> Result<()> {
    let pixels = width as u64 * height as u64;
    if width == 0 || height == 0 || width > MAX_SIDE || height > MAX_SIDE || pixels > MAX_PIXELS {
        return Err(Error::invalid(
            path,
            "header",
            format!(
                "declares {width}x{height} pixels; densekd reads images of 1 to {MAX_SIDE} pixels \
                 a side"
            ),
        ));
    }
    Ok(())
}

/// A JPEG is complete when its last end-of-image marker (`FF D9`) follows its last start-of-scan
/// (`FF DA`). Neither pair can occur inside entropy-coded data (an `FF` there is followed by `00`
/// or a restart marker), and an EXIF thumbnail's markers precede the main scan, so a truncated
/// file, which the decoder would fill with grey, fails the test.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let last = |marker: u8| bytes.windows(2).rposition(|w| w == [0xFF, marker]);
    matches!((last(0xDA), last(0xD9)), (Some(sos), Some(eoi)) if eoi > sos)
}

fn decode_error(path: &Path, source: image::ImageError) -> Error {
    Error::Image {
        path: path.to_path_buf(),
        source,
    }
}

/// Decodes an image file (PNG or JPEG, any colour type) to 8-bit RGB; grayscale is replicated.
/// Truncated files and headers larger than [`MAX_SIDE`] are errors naming the file.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let reader = image::ImageReader::new(std::io::Cursor::new(&bytes))
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    if reader.format() == Some(image::ImageFormat::Jpeg) && !jpeg_is_complete(&bytes) {
        return Err(Error::invalid(
            path,
            "jpeg",
            "the file is truncated (no end-of-image marker after the image data)",
        ));
    }
    let decoder = reader.into_decoder().map_err(|e| decode_error(path, e))?;
    let (width, height) = decoder.dimensions();
    check_size(path, width, height)?;
    let img = DynamicImage::from_decoder(decoder).map_err(|e| decode_error(path, e))?;
    Ok(img.to_rgb8())
}

/// Reads only an image's header: its `(width, height)`, checked against [`MAX_SIDE`].
pub fn read_size(path: &Path) -> Result<(u32, u32)> {
    let (width, height) = image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?
        .into_dimensions()
        .map_err(|e| decode_error(path, e))?;
    check_size(path, width, height)?;
    Ok((width, height))
}

/// Encodes `img` as PNG and writes it atomically.
pub fn save_png(path: &Path, img: &RgbImage) -> Result<()> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, image::ImageFormat::Png)
        .map_err(|e| decode_error(path, e))?;
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
