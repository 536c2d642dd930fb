//! PNG plots of metrics and detections drawn on images.

use std::path::Path;

use densekd::eval::coco::Detection;
use densekd::viz::draw::draw_detections;
use densekd::viz::palette;
use densekd::viz::plot::{line_plot, plot_run, Series};
use densekd::Error;
use image::{Rgb, RgbImage};

/// Decodes a PNG written by the plotting code.
fn read_png(path: &Path) -> RgbImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
}

/// How many pixels of `image` are exactly `color`.
fn count_color(image: &RgbImage, color: [u8; 3]) -> usize {
    image.pixels().filter(|p| p.0 == color).count()
}

/// Pixels that are not white background.
fn count_non_background(image: &RgbImage) -> usize {
    image.pixels().filter(|p| p.0 != [255, 255, 255]).count()
}

#[test]
fn line_plot_writes_png_with_series_colours() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/plot.png");
    let series = vec![
        Series {
            name: "train".into(),
            points: (0..50)
                .map(|i| (i as f64, 1.0 / (1.0 + i as f64)))
                .collect(),
        },
        Series {
            name: "val".into(),
            points: vec![
                (0.0, 0.9),
                (f64::NAN, 0.5),
                (25.0, f64::INFINITY),
                (49.0, 0.1),
            ],
        },
        Series {
            name: "empty".into(),
            points: vec![],
        },
    ];
    line_plot(&path, "Loss", "step", "loss", &series, true).unwrap();
    let image = read_png(&path);
    assert_eq!(image.dimensions(), (800, 500));
    // Lines plus the legend swatch give each drawn series many pixels of its exact colour.
    assert!(
        count_color(&image, palette(0)) > 100,
        "series 0 colour missing"
    );
    assert!(
        count_color(&image, palette(1)) > 100,
        "series 1 colour missing"
    );
    assert_eq!(count_color(&image, palette(2)), 0, "empty series was drawn");
    // No temporary file left behind by the atomic write.
    let names: Vec<_> = std::fs::read_dir(dir.path().join("sub")).unwrap().collect();
    assert_eq!(names.len(), 1);
}

#[test]
fn line_plot_without_data_still_writes_png() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.png");
    let series = vec![Series {
        name: "nan".into(),
        points: vec![(0.0, f64::NAN), (1.0, f64::NAN)],
    }];
    line_plot(&path, "Nothing yet", "step", "loss", &series, false).unwrap();
    let image = read_png(&path);
    assert_eq!(image.dimensions(), (800, 500));
    // Title and "no data" text are drawn, but no series colour.
    assert!(count_non_background(&image) > 200);
    assert_eq!(count_color(&image, palette(0)), 0);
}

#[test]
fn line_plot_linear_handles_constant_series() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("const.png");
    let series = vec![Series {
        name: "flat".into(),
        points: vec![(5.0, 0.0)],
    }];
    line_plot(&path, "Flat", "epoch", "value", &series, false).unwrap();
    assert!(count_color(&read_png(&path), palette(0)) > 20);
}

const METRICS: &str = r#"{"kind":"train","epoch":0,"step":10,"lr":0.0002,"loss":12.3,"loss_class":1.2,"loss_bbox":0.8,"loss_giou":0.9}
{"kind":"train","epoch":0,"step":20,"lr":0.0002,"loss":10.1,"loss_class":1.0,"loss_bbox":0.7,"loss_giou":0.8}

{"kind":"train","epoch":1,"step":30,"lr":0.0002,"loss":9.0,"loss_class":0.9,"loss_bbox":0.6,"loss_giou":0.7,"loss_distill":2.0}
{"kind":"eval","epoch":1,"step":30,"model":"student","AP":0.31,"AP50":0.6,"AP75":0.3,"APs":0.1,"ARl":0.5}
{"kind":"eval","epoch":1,"step":30,"model":"teacher","AP":0.41,"AP50":0.7,"AP75":0.4}
{"kind":"eval","epoch":2,"step":60,"AP":0.35,"AP50":0.65,"AP75":0.33}
"#;

#[test]
fn plot_run_writes_loss_and_ap() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("metrics.jsonl");
    std::fs::write(&metrics, METRICS).unwrap();
    let out = dir.path().join("plots");
    let written = plot_run(&metrics, &out).unwrap();
    assert_eq!(written, vec![out.join("loss.png"), out.join("ap.png")]);
    for path in &written {
        let image = read_png(path);
        assert_eq!(image.dimensions(), (800, 500));
        assert!(count_color(&image, palette(0)) > 20, "{}", path.display());
    }
    // Five loss keys (loss, loss_class, loss_bbox, loss_giou, loss_distill) → five colours.
    let loss = read_png(&out.join("loss.png"));
    assert!(count_color(&loss, palette(4)) > 20);
    // student AP/AP50/AP75 and teacher AP/AP50/AP75 → six colours.
    let ap = read_png(&out.join("ap.png"));
    assert!(count_color(&ap, palette(5)) > 20);
    assert_eq!(count_color(&ap, palette(6)), 0);
    assert!(!out.join("instability.png").exists());
}

#[test]
fn plot_run_writes_instability_and_segmentation() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("metrics.jsonl");
    std::fs::write(
        &metrics,
        concat!(
            r#"{"kind":"train","epoch":0,"step":1,"loss":1.5}"#,
            "\n",
            r#"{"kind":"eval","epoch":0,"step":1,"mIoU":0.41,"aAcc":0.8}"#,
            "\n",
            r#"{"kind":"instability","epoch":3,"step":300,"model":"student","changed":0.12}"#,
            "\n",
            r#"{"kind":"instability","epoch":4,"step":400,"model":"student","changed":0.08}"#,
            "\n",
        ),
    )
    .unwrap();
    let written = plot_run(&metrics, dir.path()).unwrap();
    let names: Vec<_> = written
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["loss.png", "ap.png", "instability.png"]);
    let ap = read_png(&dir.path().join("ap.png"));
    assert!(count_color(&ap, palette(1)) > 20, "aAcc series missing");
    let instability = read_png(&dir.path().join("instability.png"));
    assert!(count_color(&instability, palette(0)) > 20);
}

#[test]
fn plot_run_names_malformed_line() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("metrics.jsonl");
    std::fs::write(
        &metrics,
        "{\"kind\":\"train\",\"step\":1,\"loss\":1.0}\n{\"kind\":\"train\",\"step\":\n",
    )
    .unwrap();
    let err = plot_run(&metrics, dir.path()).unwrap_err();
    assert!(matches!(err, Error::Invalid { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("line 2"), "{message}");
    assert!(message.contains("metrics.jsonl"), "{message}");

    // A train line without a step is malformed too.
    std::fs::write(&metrics, "{\"kind\":\"train\",\"loss\":1.0}\n").unwrap();
    let message = plot_run(&metrics, dir.path()).unwrap_err().to_string();
    assert!(
        message.contains("line 1") && message.contains("step"),
        "{message}"
    );

    let missing = dir.path().join("missing.jsonl");
    assert!(matches!(
        plot_run(&missing, dir.path()),
        Err(Error::Io { .. })
    ));
}

/// A plain light-blue test image, a colour that no palette entry (nor white text blended onto
/// one) produces.
fn grey(width: u32, height: u32) -> RgbImage {
    RgbImage::from_pixel(width, height, Rgb([90, 160, 200]))
}

/// Near-white: the core of an anti-aliased white glyph (small text rarely covers a pixel fully).
fn is_white(p: &Rgb<u8>) -> bool {
    p.0.iter().all(|&c| c >= 200)
}

#[test]
fn draw_detections_draws_class_coloured_boxes() {
    let image = grey(320, 240);
    let detections = [
        Detection {
            class: 1,
            bbox: [50.0, 60.0, 100.0, 80.0],
            score: 0.87,
        },
        Detection {
            class: 7,
            bbox: [200.0, 0.0, 60.0, 50.0],
            score: 0.5,
        },
    ];
    let names = vec!["person".to_string(), "car".to_string()];
    let out = draw_detections(&image, &detections, &names);
    assert_eq!(out.dimensions(), image.dimensions());
    let car = Rgb(palette(1));
    // 2-px border on every side of the 100×80 box at (50, 60).
    for (x, y) in [
        (50, 100),
        (51, 100),
        (149, 100),
        (148, 100),
        (100, 139),
        (100, 138),
    ] {
        assert_eq!(*out.get_pixel(x, y), car, "border pixel ({x}, {y})");
    }
    // Interior and far-away pixels are untouched.
    assert_eq!(out.get_pixel(100, 100), image.get_pixel(100, 100));
    assert_eq!(out.get_pixel(5, 230), image.get_pixel(5, 230));
    // The label sits above the box: a filled class-coloured box with white text in it.
    let label = (50..150u32)
        .flat_map(|x| (44..60u32).map(move |y| (x, y)))
        .map(|(x, y)| *out.get_pixel(x, y))
        .collect::<Vec<_>>();
    assert!(label.iter().filter(|p| **p == car).count() > 100);
    assert!(label.iter().any(is_white), "no white text");
    // The second box touches the top edge: its label (unknown class 7) lies inside the image,
    // within the box.
    let unknown = Rgb(palette(7));
    assert_eq!(*out.get_pixel(230, 49), unknown);
    let inside: Vec<_> = (202..258u32)
        .flat_map(|x| (2..16u32).map(move |y| (x, y)))
        .map(|(x, y)| *out.get_pixel(x, y))
        .collect();
    assert!(inside.iter().filter(|p| **p == unknown).count() > 50);
    assert!(inside.iter().any(is_white), "no white text");
}

#[test]
fn draw_detections_small_image_uses_thin_border() {
    let image = grey(64, 64);
    let detections = [Detection {
        class: 0,
        bbox: [10.0, 20.0, 30.0, 30.0],
        score: 0.99,
    }];
    let out = draw_detections(&image, &detections, &[]);
    let color = Rgb(palette(0));
    assert_eq!(*out.get_pixel(10, 35), color);
    assert_eq!(
        *out.get_pixel(11, 35),
        *image.get_pixel(11, 35),
        "border is 1 px"
    );
    assert_eq!(*out.get_pixel(39, 35), color);
    assert_eq!(*out.get_pixel(25, 49), color);
    assert_eq!(out.get_pixel(60, 60), image.get_pixel(60, 60));
}

#[test]
fn draw_detections_clips_boxes_outside_the_image() {
    let image = grey(128, 128);
    let detections = [
        Detection {
            class: 2,
            bbox: [-30.0, -30.0, 80.0, 200.0],
            score: 0.7,
        },
        Detection {
            class: 3,
            bbox: [100.0, 100.0, 1e12, 1e12],
            score: 0.6,
        },
        Detection {
            class: 4,
            bbox: [500.0, 500.0, 10.0, 10.0],
            score: 0.6,
        },
        Detection {
            class: 5,
            bbox: [f64::NAN, 0.0, 10.0, 10.0],
            score: 0.6,
        },
    ];
    let out = draw_detections(&image, &detections, &[]);
    assert_eq!(out.dimensions(), (128, 128));
    // Only the right edge (x = 49) of the first box is inside the image.
    assert_eq!(*out.get_pixel(49, 100), Rgb(palette(2)));
    // The second box's top-left corner is visible.
    assert_eq!(*out.get_pixel(110, 100), Rgb(palette(3)));
    assert_eq!(count_color(&out, palette(4)), 0);
    assert_eq!(count_color(&out, palette(5)), 0);
}
