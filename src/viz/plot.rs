//! Line plots rendered to PNG, and the standard plots of a training run's `metrics.jsonl`.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::{Map, Value};

use crate::error::{write_atomic, Error, Result};
use crate::viz::{palette, register_plot_font};

/// Plot size in pixels.
const WIDTH: u32 = 800;
/// Plot size in pixels.
const HEIGHT: u32 = 500;
/// Smoothing factor of the exponential moving average applied to training losses.
const LOSS_EMA_ALPHA: f64 = 0.1;
/// Series with at most this many points also get a marker per point, so sparse curves (a few
/// evaluations, or a single one) stay visible.
const MAX_MARKED_POINTS: usize = 30;
/// Evaluation metrics plotted into `ap.png`: COCO detection AP, or segmentation mIoU / aAcc.
const EVAL_KEYS: [&str; 5] = ["AP", "AP50", "AP75", "mIoU", "aAcc"];

/// One named curve of a line plot.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend entry.
    pub name: String,
    /// `(x, y)` points in drawing order.
    pub points: Vec<(f64, f64)>,
}

/// Writes an 800×500 PNG line plot to `path`, one coloured line per series (series `i` in
/// [`palette`]`(i)`) with a legend. Non-finite points (and, with `log_y`, non-positive y) are
/// dropped and series left empty are skipped; with nothing to draw the PNG shows the title and
/// "no data".
pub fn line_plot(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log_y: bool,
) -> Result<()> {
    register_plot_font();
    let drawable: Vec<Drawable<'_>> = series
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let points: Vec<(f64, f64)> = s
                .points
                .iter()
                .copied()
                .filter(|&(x, y)| x.is_finite() && y.is_finite() && (!log_y || y > 0.0))
                .collect();
            Drawable {
                color: i,
                name: &s.name,
                points,
            }
        })
        .filter(|d| !d.points.is_empty())
        .collect();

    let mut buf = vec![0u8; WIDTH as usize * HEIGHT as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
        let drawn = match bounds(&drawable) {
            None => draw_no_data(&root, title),
            Some((xs, ys)) => {
                let labels = Labels {
                    title,
                    x: x_label,
                    y: y_label,
                    legend: legend_corner(&drawable, &xs, &ys, log_y),
                };
                if log_y {
                    let ys = pad_log(ys);
                    draw_chart(&root, &labels, pad_linear(xs), ys.log_scale(), &drawable)
                } else {
                    draw_chart(&root, &labels, pad_linear(xs), pad_linear(ys), &drawable)
                }
            }
        };
        drawn.map_err(|e| render_error(path, e))?;
        root.present().map_err(|e| render_error(path, e))?;
    }

    let image = image::RgbImage::from_raw(WIDTH, HEIGHT, buf)
        .ok_or_else(|| render_error(path, "plot buffer has the wrong size"))?;
    let mut png = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut png, image::ImageFormat::Png)
        .map_err(|source| Error::Image {
            path: path.to_path_buf(),
            source,
        })?;
    write_atomic(path, png.get_ref())
}

/// Reads a training run's `metrics.jsonl` and writes its plots into `out_dir`: `loss.png` (every
/// `loss*` key of `"kind": "train"` lines vs step, EMA-smoothed, log y), `ap.png` (AP / AP50 /
/// AP75, or mIoU / aAcc for segmentation, of `"kind": "eval"` lines vs step, per model) and, when
/// the run has `"kind": "instability"` lines, `instability.png` (their numeric keys vs epoch, per
/// model). Returns the written paths.
pub fn plot_run(metrics_jsonl: &Path, out_dir: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(metrics_jsonl).map_err(|e| Error::io(metrics_jsonl, e))?;
    let mut losses = SeriesSet::default();
    let mut evals = SeriesSet::default();
    let mut instability = SeriesSet::default();
    let mut has_instability = false;

    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let field = format!("line {}", index + 1);
        let invalid = |message: String| Error::invalid(metrics_jsonl, &field, message);
        let record: Map<String, Value> =
            serde_json::from_str(line).map_err(|e| invalid(format!("not a JSON object: {e}")))?;
        let kind = record
            .get("kind")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("missing string field `kind`".into()))?;
        let number = |key: &str| {
            record
                .get(key)
                .and_then(Value::as_f64)
                .ok_or_else(|| invalid(format!("`{kind}` line without numeric `{key}`")))
        };
        let model = || match record.get("model") {
            None => Ok("student"),
            Some(v) => v
                .as_str()
                .ok_or_else(|| invalid("`model` is not a string".into())),
        };
        match kind {
            "train" => {
                let step = number("step")?;
                for (key, y) in numeric_fields(&record) {
                    if key.starts_with("loss") {
                        losses.push(key, (step, y));
                    }
                }
            }
            "eval" => {
                let (step, model) = (number("step")?, model()?);
                for key in EVAL_KEYS {
                    if let Some(y) = record.get(key).and_then(Value::as_f64) {
                        evals.push(&format!("{model} {key}"), (step, y));
                    }
                }
            }
            "instability" => {
                has_instability = true;
                let (epoch, model) = (number("epoch")?, model()?);
                for (key, y) in numeric_fields(&record) {
                    if key != "epoch" && key != "step" {
                        instability.push(&format!("{model} {key}"), (epoch, y));
                    }
                }
            }
            // Other kinds (e.g. run metadata) carry nothing these plots show.
            _ => {}
        }
    }

    let mut written = Vec::new();
    let loss_path = out_dir.join("loss.png");
    let smoothed: Vec<Series> = losses.series.iter().map(ema).collect();
    let title = format!("Training loss (EMA, alpha = {LOSS_EMA_ALPHA})");
    line_plot(&loss_path, &title, "step", "loss", &smoothed, true)?;
    written.push(loss_path);

    let ap_path = out_dir.join("ap.png");
    let detection = evals.series.iter().any(|s| s.name.contains(" AP"));
    let segmentation = evals
        .series
        .iter()
        .any(|s| s.name.ends_with(" mIoU") || s.name.ends_with(" aAcc"));
    let (title, y_label) = match (detection, segmentation) {
        (false, true) => ("Evaluation mIoU", "mIoU / aAcc"),
        (true, true) => ("Evaluation", "score"),
        _ => ("Evaluation AP", "AP"),
    };
    line_plot(&ap_path, title, "step", y_label, &evals.series, false)?;
    written.push(ap_path);

    if has_instability {
        let path = out_dir.join("instability.png");
        let only_changed = instability
            .series
            .iter()
            .all(|s| s.name.ends_with(" changed"));
        let y_label = if only_changed {
            "fraction changed"
        } else {
            "value"
        };
        let series = &instability.series;
        line_plot(
            &path,
            "Prediction instability",
            "epoch",
            y_label,
            series,
            false,
        )?;
        written.push(path);
    }
    Ok(written)
}

/// The fields of a metrics record whose values are numbers.
fn numeric_fields(record: &Map<String, Value>) -> impl Iterator<Item = (&str, f64)> {
    record
        .iter()
        .filter_map(|(key, value)| Some((key.as_str(), value.as_f64()?)))
}

/// Series built up line by line, in the order their names first appear.
#[derive(Default)]
struct SeriesSet {
    series: Vec<Series>,
    index: HashMap<String, usize>,
}

impl SeriesSet {
    /// Appends `point` to the series `name`, creating it on first use.
    fn push(&mut self, name: &str, point: (f64, f64)) {
        let i = *self.index.entry(name.to_string()).or_insert_with(|| {
            self.series.push(Series {
                name: name.to_string(),
                points: Vec::new(),
            });
            self.series.len() - 1
        });
        self.series[i].points.push(point);
    }
}

/// Exponential moving average of a series' y values; non-finite values are dropped first so one
/// diverged step does not turn the rest of the curve into NaN.
fn ema(series: &Series) -> Series {
    let mut state: Option<f64> = None;
    let points = series
        .points
        .iter()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .map(|&(x, y)| {
            let s = state.map_or(y, |s| LOSS_EMA_ALPHA * y + (1.0 - LOSS_EMA_ALPHA) * s);
            state = Some(s);
            (x, s)
        })
        .collect();
    Series {
        name: series.name.clone(),
        points,
    }
}

/// A series ready to draw: its palette index (its position in the caller's list, so colours
/// stay put when other series are skipped), legend name and drawable points.
struct Drawable<'a> {
    color: usize,
    name: &'a str,
    points: Vec<(f64, f64)>,
}

/// Title, axis labels and legend corner of a chart.
struct Labels<'a> {
    title: &'a str,
    x: &'a str,
    y: &'a str,
    legend: SeriesLabelPosition,
}

/// The chart corner holding the fewest points, so the legend hides as little of the curves as
/// possible (falling losses leave the upper right free, rising AP the lower right).
fn legend_corner(
    series: &[Drawable<'_>],
    xs: &Range<f64>,
    ys: &Range<f64>,
    log_y: bool,
) -> SeriesLabelPosition {
    let y_axis = |y: f64| if log_y { y.log10() } else { y };
    let (y0, y1) = (y_axis(ys.start), y_axis(ys.end));
    let right = |x: f64| x - xs.start > 0.5 * (xs.end - xs.start);
    let upper = |y: f64| y_axis(y) - y0 > 0.5 * (y1 - y0);
    let mut counts = [0usize; 4];
    for &(x, y) in series.iter().flat_map(|d| d.points.iter()) {
        counts[usize::from(!upper(y)) * 2 + usize::from(!right(x))] += 1;
    }
    let corners = [
        SeriesLabelPosition::UpperRight,
        SeriesLabelPosition::UpperLeft,
        SeriesLabelPosition::LowerRight,
        SeriesLabelPosition::LowerLeft,
    ];
    // `min_by_key` keeps the first minimum, so ties prefer the upper right.
    let best = (0..4).min_by_key(|&i| counts[i]).unwrap_or(0);
    corners[best].clone()
}

/// The x and y extents over all points, or `None` when there are none.
fn bounds(series: &[Drawable<'_>]) -> Option<(Range<f64>, Range<f64>)> {
    let mut points = series.iter().flat_map(|d| d.points.iter());
    let &(x, y) = points.next()?;
    let (mut xs, mut ys) = (x..x, y..y);
    for &(x, y) in points {
        xs = xs.start.min(x)..xs.end.max(x);
        ys = ys.start.min(y)..ys.end.max(y);
    }
    Some((xs, ys))
}

/// A linear axis range with a 5% margin, widened when all values are equal (plotters needs a
/// non-empty range).
fn pad_linear(r: Range<f64>) -> Range<f64> {
    let span = r.end - r.start;
    let pad = if span > 0.0 {
        0.05 * span
    } else {
        (0.1 * r.start.abs()).max(0.5)
    };
    r.start - pad..r.end + pad
}

/// A log axis range (positive bounds) with a multiplicative margin, widened when all values are
/// equal.
fn pad_log(r: Range<f64>) -> Range<f64> {
    let factor = if r.end > r.start { 1.1 } else { 2.0 };
    r.start / factor..r.end * factor
}

/// Compact tick labels: plain decimals at ordinary magnitudes, scientific otherwise, and no float
/// noise such as `0.30000000000000004`.
fn tick_label(v: &f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.1e}")
    } else {
        let text = format!("{v:.4}");
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// Draws axes, lines (with markers on sparse series) and the legend.
fn draw_chart<Y>(
    root: &DrawingArea<BitMapBackend<'_>, Shift>,
    labels: &Labels<'_>,
    x_range: Range<f64>,
    y_range: Y,
    series: &[Drawable<'_>],
) -> std::result::Result<(), Box<dyn std::error::Error>>
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(root)
        .caption(labels.title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(x_range, y_range)?;
    chart
        .configure_mesh()
        .x_desc(labels.x)
        .y_desc(labels.y)
        .x_label_formatter(&tick_label)
        .y_label_formatter(&tick_label)
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 15))
        .draw()?;
    for Drawable {
        color,
        name,
        points,
    } in series
    {
        let [r, g, b] = palette(*color);
        let color = RGBColor(r, g, b);
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 4), (x + 18, y + 4)], color.filled()));
        if points.len() <= MAX_MARKED_POINTS {
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
    }
    chart
        .configure_series_labels()
        .position(labels.legend.clone())
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    Ok(())
}

/// Draws the title and "no data", for runs with nothing to plot yet.
fn draw_no_data(
    root: &DrawingArea<BitMapBackend<'_>, Shift>,
    title: &str,
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    root.fill(&WHITE)?;
    let centred = |size: u32| {
        ("sans-serif", size)
            .into_font()
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Center))
    };
    let (w, h) = (WIDTH as i32, HEIGHT as i32);
    root.draw(&Text::new(title, (w / 2, 30), centred(22)))?;
    root.draw(&Text::new("no data", (w / 2, h / 2), centred(20)))?;
    Ok(())
}

/// A rendering failure; the plot goes to an in-memory buffer, so this is a font or plotting
/// error rather than a file problem, reported against the file that was not written.
fn render_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::io(path, std::io::Error::other(format!("rendering plot: {e}")))
}
