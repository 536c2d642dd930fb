//! Detections drawn on images (class-coloured boxes with "name score" labels) and label maps
//! overlaid on images (with a legend of the classes present).

use std::sync::OnceLock;

use ab_glyph::{point, Font, FontRef, GlyphId, PxScale, PxScaleFont, ScaleFont};
use image::{Rgb, RgbImage};

use crate::data::labelmap::{voc_palette, LabelMap};
use crate::eval::coco::Detection;
use crate::viz::{palette, FONT};

/// Label text colour, on a box filled with the class colour.
const TEXT: Rgb<u8> = Rgb([255, 255, 255]);
/// Coordinates are clamped to this magnitude before integer conversion, so absurd boxes from a
/// diverged model cannot overflow the border arithmetic.
const COORD_LIMIT: f64 = 1e7;

/// A copy of `image` with each detection drawn as a hollow rectangle in its class colour
/// ([`palette`]`(class)`; 2 px, or 1 px on images under 100 px on a side) and a "name 0.87" label
/// in white on a filled box of that colour, above the box or inside it at the top edge. Parts
/// outside the image are clipped; boxes with non-finite coordinates or entirely outside are
/// skipped; classes without a name are labelled "class N".
pub fn draw_detections(
    image: &RgbImage,
    detections: &[Detection],
    class_names: &[String],
) -> RgbImage {
    let mut out = image.clone();
    let (width, height) = (i64::from(out.width()), i64::from(out.height()));
    let shorter = width.min(height);
    let thickness = if shorter < 100 { 1 } else { 2 };
    let boxes: Vec<(PixelBox, &Detection)> = detections
        .iter()
        .filter_map(|d| Some((PixelBox::new(d.bbox)?, d)))
        .filter(|(b, _)| b.x0 < width && b.y0 < height && b.x1 >= 0 && b.y1 >= 0)
        .collect();

    for (b, det) in &boxes {
        let color = class_color(det.class);
        let t = thickness - 1;
        fill(&mut out, b.x0, b.y0, b.x1, (b.y0 + t).min(b.y1), color);
        fill(&mut out, b.x0, (b.y1 - t).max(b.y0), b.x1, b.y1, color);
        fill(&mut out, b.x0, b.y0, (b.x0 + t).min(b.x1), b.y1, color);
        fill(&mut out, (b.x1 - t).max(b.x0), b.y0, b.x1, b.y1, color);
    }
    // Labels after all boxes, so a neighbouring box's border never cuts through the text.
    let font = font().as_scaled(PxScale::from(label_text_px(shorter)));
    for (b, det) in &boxes {
        let name = class_names
            .get(det.class)
            .cloned()
            .unwrap_or_else(|| format!("class {}", det.class));
        draw_label(
            &mut out,
            &font,
            &format!("{name} {:.2}", det.score),
            b,
            class_color(det.class),
        );
    }
    out
}

/// A copy of `image` with `label` (same size) blended over it at half opacity in the VOC
/// colours of the label PNGs, except for the ignore label and a class named "background", and a
/// legend (top left) naming each class present in its colour.
pub fn draw_segmentation(
    image: &RgbImage,
    label: &LabelMap,
    class_names: &[String],
    ignore_index: u8,
) -> RgbImage {
    let mut out = image.clone();
    let colours = voc_palette();
    let skip = |c: u8| {
        c == ignore_index
            || class_names
                .get(c as usize)
                .is_some_and(|n| n.eq_ignore_ascii_case("background"))
    };
    let mut present = [false; 256];
    for (i, pixel) in out.pixels_mut().enumerate() {
        let c = label.data[i];
        present[c as usize] = true;
        if skip(c) {
            continue;
        }
        let colour = &colours[c as usize * 3..c as usize * 3 + 3];
        for (p, &q) in pixel.0.iter_mut().zip(colour) {
            *p = ((u16::from(*p) + u16::from(q)) / 2) as u8;
        }
    }
    let shorter = i64::from(out.width().min(out.height()));
    let font = font().as_scaled(PxScale::from(label_text_px(shorter)));
    let row_h = (font.ascent() - font.descent()).ceil() as i64 + 3;
    let shown = (0..=255u8).filter(|&c| present[c as usize] && !skip(c));
    for (row, c) in (1..).zip(shown) {
        let name = class_names
            .get(c as usize)
            .cloned()
            .unwrap_or_else(|| format!("class {c}"));
        let colour = &colours[c as usize * 3..c as usize * 3 + 3];
        let anchor = PixelBox {
            x0: 1,
            y0: row * row_h,
            x1: 1,
            y1: row * row_h,
        };
        draw_label(
            &mut out,
            &font,
            &name,
            &anchor,
            Rgb([colour[0], colour[1], colour[2]]),
        );
    }
    out
}

/// A detection box in inclusive integer pixel coordinates.
struct PixelBox {
    x0: i64,
    y0: i64,
    x1: i64,
    y1: i64,
}

impl PixelBox {
    /// Rounds an `[x, y, w, h]` box to pixels, at least one pixel wide and high; `None` when a
    /// coordinate is not finite.
    fn new([x, y, w, h]: [f64; 4]) -> Option<Self> {
        if ![x, y, w, h].iter().all(|v| v.is_finite()) {
            return None;
        }
        let px = |v: f64| v.round().clamp(-COORD_LIMIT, COORD_LIMIT) as i64;
        let (x0, y0) = (px(x), px(y));
        Some(PixelBox {
            x0,
            y0,
            x1: (px(x + w) - 1).max(x0),
            y1: (px(y + h) - 1).max(y0),
        })
    }
}

/// The embedded font, parsed once.
fn font() -> &'static FontRef<'static> {
    static PARSED: OnceLock<FontRef<'static>> = OnceLock::new();
    PARSED.get_or_init(|| {
        FontRef::try_from_slice(FONT).expect("the embedded DejaVuSans.ttf is a valid font")
    })
}

/// Label text height in pixels for an image whose shorter side is `shorter`: 11 px keeps labels
/// legible yet small on thumbnails up to 256 px; larger images scale with their size.
fn label_text_px(shorter: i64) -> f32 {
    if shorter <= 256 {
        11.0
    } else {
        (shorter as f32 / 40.0).max(12.0)
    }
}

/// The [`palette`] colour of `class`.
fn class_color(class: usize) -> Rgb<u8> {
    Rgb(palette(class))
}

/// Fills the inclusive rectangle `(x0, y0)..=(x1, y1)`, clipped to the image.
fn fill(image: &mut RgbImage, x0: i64, y0: i64, x1: i64, y1: i64, color: Rgb<u8>) {
    let (w, h) = (i64::from(image.width()), i64::from(image.height()));
    for y in y0.max(0)..=y1.min(h - 1) {
        for x in x0.max(0)..=x1.min(w - 1) {
            image.put_pixel(x as u32, y as u32, color);
        }
    }
}

/// Draws `text` in white on a box of `color` whose bottom edge sits on the detection's top edge;
/// when that would leave the image the label moves inside the image (inside the box at the top
/// edge), and it shifts left to stay within the right edge.
fn draw_label(
    image: &mut RgbImage,
    font: &PxScaleFont<&FontRef<'_>>,
    text: &str,
    b: &PixelBox,
    color: Rgb<u8>,
) {
    let (w, h) = (i64::from(image.width()), i64::from(image.height()));
    let (pad_x, pad_y) = (2, 1);
    let (glyphs, advance) = layout(font, text);
    let text_w = advance.ceil() as i64;
    let text_h = (font.ascent() - font.descent()).ceil() as i64;
    let (label_w, label_h) = (text_w + 2 * pad_x, text_h + 2 * pad_y);
    let left = b.x0.min(w - label_w).max(0);
    let above = b.y0 - label_h;
    let top = if above >= 0 { above } else { b.y0.max(0) }
        .min(h - label_h)
        .max(0);
    fill(
        image,
        left,
        top,
        left + label_w - 1,
        top + label_h - 1,
        color,
    );

    let baseline = font.ascent();
    for (glyph_id, caret) in glyphs {
        let glyph = glyph_id.with_scale_and_position(font.scale, point(caret, baseline));
        let Some(outline) = font.outline_glyph(glyph) else {
            continue; // Spaces have no outline.
        };
        let bounds = outline.px_bounds();
        let ox = left + pad_x + bounds.min.x as i64;
        let oy = top + pad_y + bounds.min.y as i64;
        outline.draw(|gx, gy, coverage| {
            let (x, y) = (ox + i64::from(gx), oy + i64::from(gy));
            if (0..w).contains(&x) && (0..h).contains(&y) {
                let pixel = image.get_pixel_mut(x as u32, y as u32);
                let c = coverage.clamp(0.0, 1.0);
                for (p, t) in pixel.0.iter_mut().zip(TEXT.0) {
                    *p = (f32::from(*p) * (1.0 - c) + f32::from(t) * c).round() as u8;
                }
            }
        });
    }
}

/// Each glyph of `text` with its caret position (advances plus kerning), and the total advance.
fn layout(font: &PxScaleFont<&FontRef<'_>>, text: &str) -> (Vec<(GlyphId, f32)>, f32) {
    let mut caret = 0.0;
    let mut previous: Option<GlyphId> = None;
    let mut glyphs = Vec::new();
    for c in text.chars() {
        let id = font.glyph_id(c);
        if let Some(p) = previous {
            caret += font.kern(p, id);
        }
        glyphs.push((id, caret));
        caret += font.h_advance(id);
        previous = Some(id);
    }
    (glyphs, caret)
}
