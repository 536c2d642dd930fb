//! Semantic label maps as PNG: 8-bit grayscale or palette (class = palette index, as Pascal VOC).

use std::io::BufReader;
use std::path::Path;

use crate::data::images::check_size;
use crate::error::{write_atomic, Error, Result};

/// A row-major map of class indices, one byte per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelMap {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `width * height` class indices, row-major.
    pub data: Vec<u8>,
}

impl LabelMap {
    /// A map filled with `value`.
    pub fn filled(width: u32, height: u32, value: u8) -> Self {
        LabelMap {
            width,
            height,
            data: vec![value; width as usize * height as usize],
        }
    }

    /// The label at column `x`, row `y`.
    pub fn get(&self, x: u32, y: u32) -> u8 {
        self.data[y as usize * self.width as usize + x as usize]
    }
}

/// Reads a label map. Palette PNGs are not expanded: the palette index is the class. RGB files
/// are refused because their colours carry no class ids. The header's size and format are checked
/// before anything is allocated for the pixels; a truncated file is an error naming it.
pub fn read_label_map(path: &Path) -> Result<LabelMap> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut decoder = png::Decoder::new(BufReader::new(file));
    // Identity: keep palette indices and sub-byte samples as stored.
    decoder.set_transformations(png::Transformations::IDENTITY);
    let bad = |e: png::DecodingError| Error::invalid(path, "png", e.to_string());
    let header = decoder.read_header_info().map_err(bad)?;
    check_size(path, header.width, header.height)?;
    match (header.color_type, header.bit_depth) {
        (png::ColorType::Grayscale | png::ColorType::Indexed, png::BitDepth::Sixteen) => {
            return Err(Error::invalid(
                path,
                "bit depth",
                "16-bit label maps are not supported; classes must fit in 8 bits",
            ))
        }
        (png::ColorType::Grayscale | png::ColorType::Indexed, _) => {}
        (other, _) => {
            return Err(Error::invalid(
                path,
                "color type",
                format!(
                    "{other:?} label map; class ids must be stored as 8-bit grayscale or palette \
                     PNG"
                ),
            ))
        }
    }
    let mut reader = decoder.read_info().map_err(bad)?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| Error::invalid(path, "png", "image too large to decode"))?;
    let mut buf = vec![0u8; size];
    let info = reader.next_frame(&mut buf).map_err(bad)?;
    let (w, h) = (info.width, info.height);
    let rows = buf.chunks_exact(info.line_size).take(h as usize);
    let data = if info.bit_depth == png::BitDepth::Eight {
        rows.flat_map(|r| r[..w as usize].iter().copied()).collect()
    } else {
        // 1, 2 or 4 bits per sample, packed high bit first.
        let bits = info.bit_depth as u32;
        let per_byte = 8 / bits;
        let mask = (1u8 << bits) - 1;
        rows.flat_map(|row| {
            (0..w).map(move |x| {
                let byte = row[(x / per_byte) as usize];
                (byte >> (8 - bits * (x % per_byte + 1))) & mask
            })
        })
        .collect()
    };
    Ok(LabelMap {
        width: w,
        height: h,
        data,
    })
}

/// The Pascal VOC colour map: a distinct colour per class index, so palette label maps are
/// readable in any image viewer while their pixel values stay class ids.
pub fn voc_palette() -> Vec<u8> {
    let mut palette = Vec::with_capacity(256 * 3);
    for i in 0..=255u8 {
        let (mut r, mut g, mut b) = (0u8, 0u8, 0u8);
        let mut c = i;
        for j in 0..8 {
            r |= (c & 1) << (7 - j);
            g |= ((c >> 1) & 1) << (7 - j);
            b |= ((c >> 2) & 1) << (7 - j);
            c >>= 3;
        }
        palette.extend_from_slice(&[r, g, b]);
    }
    palette
}

/// Writes a label map atomically as an 8-bit PNG: palette (VOC colours) or grayscale.
pub fn write_label_map(path: &Path, map: &LabelMap, palette: bool) -> Result<()> {
    let mut bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut bytes, map.width, map.height);
        if palette {
            encoder.set_color(png::ColorType::Indexed);
            encoder.set_palette(voc_palette());
        } else {
            encoder.set_color(png::ColorType::Grayscale);
        }
        encoder.set_depth(png::BitDepth::Eight);
        let encode_err = |e: png::EncodingError| Error::invalid(path, "png", e.to_string());
        let mut writer = encoder.write_header().map_err(encode_err)?;
        writer.write_image_data(&map.data).map_err(encode_err)?;
        writer.finish().map_err(encode_err)?;
    }
    write_atomic(path, &bytes)
}
