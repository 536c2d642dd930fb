//! Visualisation: PNG plots of training metrics and detections drawn on images.

pub mod draw;
pub mod plot;

use std::sync::Once;

/// DejaVu Sans (licence in `assets/fonts/LICENSE-DejaVu.txt`), embedded so that PNGs render the
/// same on headless machines without fontconfig or any system fonts.
pub(crate) static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// Distinct colours, dark enough to carry white label text; series `i` of a plot and class `i` of
/// a detection image both use `PALETTE[i % PALETTE.len()]`.
pub const PALETTE: [[u8; 3]; 12] = [
    [0, 114, 189],   // blue
    [217, 83, 25],   // orange
    [46, 139, 87],   // green
    [200, 30, 60],   // red
    [126, 47, 142],  // purple
    [0, 128, 128],   // teal
    [190, 40, 170],  // magenta
    [140, 86, 75],   // brown
    [0, 0, 128],     // navy
    [128, 128, 0],   // olive
    [128, 0, 0],     // maroon
    [100, 100, 100], // grey
];

/// The palette colour for series or class `index`, cycling through [`PALETTE`].
pub fn palette(index: usize) -> [u8; 3] {
    PALETTE[index % PALETTE.len()]
}

/// Registers [`FONT`] as plotters' "sans-serif" family, once per process: plotters keeps a global
/// font table, and its default text styles all ask for "sans-serif".
pub(crate) fn register_plot_font() {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        // Cannot fail for the embedded font (the tests render with it); were it ever invalid,
        // plotters would report the missing font as a drawing error, which the caller surfaces.
        let _ =
            plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, FONT);
    });
}
