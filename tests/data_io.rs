//! Readers, validation, transforms and the loader.

use std::path::{Path, PathBuf};

use densekd::data::coco::{CocoDataset, InvalidPolicy};
use densekd::data::detection::{collate_detection, CocoSource, DetAugment, DetSample};
use densekd::data::images::{list_images, load_rgb};
use densekd::data::labelmap::{read_label_map, write_label_map, LabelMap};
use densekd::data::loader::{Loader, LoaderConfig, Source};
use densekd::data::segmentation::{collate_segmentation, LabelMapFolder, SegAugment};
use densekd::data::transforms::{hflip_boxes, resize_scale, rotate, ColourChange, Photometric};
use image::{GrayImage, Luma, Rgb, RgbImage};
use rand_chacha::ChaCha8Rng;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p
}

const COCO: &str = r#"{
 "images": [{"id": 10, "file_name": "a.png", "width": 64, "height": 48},
            {"id": 20, "file_name": "b.jpg", "width": 32, "height": 32}],
 "categories": [{"id": 90, "name": "zebra"}, {"id": 3, "name": "car"}, {"id": 17, "name": "cat"}],
 "annotations": [
  {"id": 1, "image_id": 10, "category_id": 3, "bbox": [1, 2, 10, 20], "area": 150, "iscrowd": 0,
   "segmentation": [[1, 2, 11, 2, 11, 22, 1, 22]]},
  {"id": 2, "image_id": 10, "category_id": 90, "bbox": [50, 40, 30, 30], "area": 10, "iscrowd": 1,
   "segmentation": {"size": [48, 64], "counts": [100, 20, 2952]}},
  {"id": 3, "image_id": 20, "category_id": 17, "bbox": [5, 5, 0, 4], "area": 0, "iscrowd": 0},
  {"id": 4, "image_id": 20, "category_id": 5, "bbox": [5, 5, 4, 4], "area": 16, "iscrowd": 0},
  {"id": 5, "image_id": 20, "category_id": 17, "bbox": [40, 40, 4, 4], "area": 16, "iscrowd": 0},
  {"id": 6, "image_id": 99, "category_id": 17, "bbox": [1, 1, 4, 4], "area": 16, "iscrowd": 0}
 ]}"#;

#[test]
fn coco_reader_maps_ids_and_applies_policy() {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = write(tmp.path(), "instances.json", COCO);
    let ds = CocoDataset::load(&path, InvalidPolicy::Skip).expect("loads with skips");
    assert_eq!(
        ds.class_names(),
        vec!["car", "cat", "zebra"],
        "sorted by id"
    );
    assert_eq!(
        (
            ds.class_of(3),
            ds.class_of(17),
            ds.class_of(90),
            ds.class_of(5)
        ),
        (Some(0), Some(1), Some(2), None)
    );
    assert_eq!(ds.category_id(2), Some(90));
    let a = &ds.images[0];
    assert_eq!(a.objects.len(), 2);
    assert_eq!(a.objects[0].class, 0);
    assert_eq!(a.objects[0].area, 150.0, "the area field, not w*h");
    assert!(a.objects[1].iscrowd);
    assert_eq!(
        a.objects[1].bbox,
        [50.0, 40.0, 14.0, 8.0],
        "clipped to the 64x48 image"
    );
    assert!(ds.images[1].objects.is_empty());
    // zero width, unknown category, outside the image, unknown image: one count, plus the clip note.
    assert_eq!(ds.skipped.len(), 4, "{:#?}", ds.skipped);
    assert_eq!(ds.warnings.len(), 2, "{:#?}", ds.warnings);
    assert!(
        ds.warnings[0].starts_with("skipped 4 of 6 annotations: annotations[2].bbox"),
        "{}",
        ds.warnings[0]
    );
    assert!(ds.warnings[1].contains("1 box(es)"), "{}", ds.warnings[1]);
    for (i, needle) in [
        ("annotations[2].bbox", "id 3"),
        ("annotations[3].category_id", "unknown category id 5"),
        ("annotations[4].bbox", "outside"),
        ("annotations[5].image_id", "99"),
    ]
    .iter()
    .enumerate()
    {
        assert!(
            ds.skipped[i].starts_with(needle.0) && ds.skipped[i].contains(needle.1),
            "{}",
            ds.skipped[i]
        );
    }

    let err = CocoDataset::load(&path, InvalidPolicy::Reject)
        .expect_err("rejects")
        .to_string();
    assert!(
        err.contains("instances.json") && err.contains("annotations[2].bbox"),
        "{err}"
    );
}

#[test]
fn coco_reader_errors_name_file_and_field() {
    let tmp = tempfile::tempdir().expect("tmp");
    let cases = [
        (
            r#"{"images": [{"id": 1, "file_name": "a", "width": 0, "height": 4}], "annotations": [], "categories": [{"id": 1, "name": "a"}]}"#,
            "images[0]",
        ),
        (
            r#"{"images": [{"id": 1, "width": 4, "height": 4}, {"id": 1, "width": 4, "height": 4}], "annotations": [], "categories": [{"id": 1, "name": "a"}]}"#,
            "images[1].id",
        ),
        (
            r#"{"images": [{"id": 1, "width": 4, "height": 4}], "annotations": [], "categories": [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]}"#,
            "categories[1].id",
        ),
        (
            r#"{"images": [], "annotations": [{"id": 1, "category_id": 1}], "categories": []}"#,
            "annotations[0]: missing field `image_id`",
        ),
        (r#"{"images": [{"id": "x"}]}"#, "images[0].id: invalid type"),
        (
            r#"{"images": [], "annotations": []}"#,
            "categories: missing",
        ),
        (
            r#"{"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}"#,
            "images: empty",
        ),
        (
            r#"{"images": [{"id": 1, "width": 4, "height": 4}], "annotations": [], "categories": []}"#,
            "categories: empty",
        ),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let path = write(tmp.path(), &format!("bad{i}.json"), text);
        let err = CocoDataset::load(&path, InvalidPolicy::Skip)
            .expect_err(needle)
            .to_string();
        assert!(
            err.contains(&format!("bad{i}.json")) && err.contains(needle),
            "case {i}: {err}"
        );
    }
    let err = CocoDataset::load(&tmp.path().join("missing.json"), InvalidPolicy::Skip)
        .expect_err("missing")
        .to_string();
    assert!(err.contains("missing.json"), "{err}");
}

#[test]
fn images_decode_to_rgb_and_corrupt_files_name_their_path() {
    let tmp = tempfile::tempdir().expect("tmp");
    let gray = GrayImage::from_fn(5, 3, |x, _| Luma([x as u8 * 40]));
    gray.save(tmp.path().join("g.png")).expect("save");
    RgbImage::from_pixel(4, 4, Rgb([10, 200, 30]))
        .save(tmp.path().join("c.jpg"))
        .expect("save");
    std::fs::write(
        tmp.path().join("broken.png"),
        b"\x89PNG\r\n\x1a\nnot really",
    )
    .expect("write");
    std::fs::write(tmp.path().join("notes.txt"), b"ignored").expect("write");

    let rgb = load_rgb(&tmp.path().join("g.png")).expect("grayscale loads");
    assert_eq!(rgb.dimensions(), (5, 3));
    assert_eq!(rgb.get_pixel(2, 1).0, [80, 80, 80]);
    let jpg = load_rgb(&tmp.path().join("c.jpg")).expect("jpeg loads");
    assert!(jpg.get_pixel(1, 1).0[1] > 150);

    let listed = list_images(tmp.path()).expect("lists");
    let names: Vec<_> = listed
        .iter()
        .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["broken.png", "c.jpg", "g.png"]);

    let err = load_rgb(&tmp.path().join("broken.png"))
        .expect_err("corrupt")
        .to_string();
    assert!(err.contains("broken.png"), "{err}");
}

#[test]
fn label_maps_round_trip_as_gray_and_palette() {
    let tmp = tempfile::tempdir().expect("tmp");
    let map = LabelMap {
        width: 7,
        height: 3,
        data: (0..21)
            .map(|i| if i == 5 { 255 } else { i as u8 % 4 })
            .collect(),
    };
    for palette in [false, true] {
        let p = tmp.path().join(format!("m{palette}.png"));
        write_label_map(&p, &map, palette).expect("write");
        assert_eq!(
            read_label_map(&p).expect("read"),
            map,
            "palette = {palette}"
        );
    }
    // A palette PNG written by another library keeps indices, not colours.
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, 3, 1);
        enc.set_color(png::ColorType::Indexed);
        enc.set_depth(png::BitDepth::Four);
        enc.set_palette(vec![0u8; 16 * 3]);
        let mut w = enc.write_header().expect("header");
        w.write_image_data(&[0x1F, 0x20]).expect("data");
    }
    let p = tmp.path().join("four_bit.png");
    std::fs::write(&p, bytes).expect("write");
    assert_eq!(read_label_map(&p).expect("read").data, vec![1, 15, 2]);
    // RGB is refused with the file named.
    RgbImage::new(2, 2)
        .save(tmp.path().join("rgb.png"))
        .expect("save");
    let err = read_label_map(&tmp.path().join("rgb.png"))
        .expect_err("rgb")
        .to_string();
    assert!(
        err.contains("rgb.png") && err.contains("grayscale or palette"),
        "{err}"
    );
}

#[test]
fn label_maps_with_huge_headers_or_truncated_data_are_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    // A header alone, declaring 100000 x 50000 pixels (5 GB at one byte each).
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, 100_000, 50_000);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        enc.write_header().expect("header");
    }
    let p = tmp.path().join("huge.png");
    std::fs::write(&p, bytes).expect("write");
    let err = read_label_map(&p).expect_err("huge").to_string();
    assert!(
        err.contains("huge.png") && err.contains("declares 100000x50000 pixels"),
        "{err}"
    );

    let map = LabelMap {
        width: 64,
        height: 64,
        data: (0..64 * 64).map(|i| (i * 7 % 251) as u8).collect(),
    };
    let p = tmp.path().join("whole.png");
    write_label_map(&p, &map, true).expect("write");
    let whole = std::fs::read(&p).expect("read");
    for cut in [whole.len() / 2, whole.len() - 12, 40] {
        let p = tmp.path().join(format!("cut{cut}.png"));
        std::fs::write(&p, &whole[..cut]).expect("write");
        let err = read_label_map(&p).expect_err("truncated").to_string();
        assert!(err.contains(&format!("cut{cut}.png")), "{err}");
    }
}

#[test]
fn transforms_keep_boxes_consistent() {
    assert_eq!(resize_scale(200, 100, 50, 1000), 0.5);
    assert_eq!(resize_scale(400, 100, 50, 100), 0.25, "capped by max_size");
    let mut b = [[10.0f32, 5.0, 30.0, 9.0]];
    hflip_boxes(&mut b, 100);
    assert_eq!(b, [[70.0, 5.0, 90.0, 9.0]]);
}

fn coco_fixture_dir() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tmp");
    RgbImage::from_fn(64, 48, |x, y| Rgb([x as u8, y as u8, 7]))
        .save(tmp.path().join("a.png"))
        .expect("save");
    RgbImage::from_pixel(32, 32, Rgb([1, 2, 3]))
        .save(tmp.path().join("b.jpg"))
        .expect("save");
    write(tmp.path(), "instances.json", COCO);
    tmp
}

#[test]
fn coco_source_resizes_and_batches_with_padding() {
    let tmp = coco_fixture_dir();
    let dataset =
        CocoDataset::load(&tmp.path().join("instances.json"), InvalidPolicy::Skip).expect("loads");
    let source = CocoSource {
        dataset,
        image_root: tmp.path().to_path_buf(),
        augment: DetAugment {
            shorter: 24,
            max_size: 64,
            hflip_prob: 0.0,
        },
    };
    let mut rng = <ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
    let a: DetSample = source.get(0, &mut rng).expect("loads");
    assert_eq!(a.image.dimensions(), (32, 24));
    assert_eq!(
        a.boxes,
        vec![[0.5, 1.0, 5.5, 11.0]],
        "crowd excluded, scaled by 0.5"
    );
    let b = source.get(1, &mut rng).expect("loads");
    let batch = collate_detection(vec![a, b], 32).expect("collates");
    assert_eq!(batch.shape, [2, 3, 32, 32]);
    // Image 0 is 32x24: rows 24.. are padding; image 1 (24x24) has columns 24.. padded.
    assert!(!batch.padding[23 * 32] && batch.padding[24 * 32]);
    assert!(!batch.padding[32 * 32 + 23] && batch.padding[32 * 32 + 24]);
    let t = &batch.targets[0];
    assert_eq!(t.size, (32, 24));
    assert_eq!(
        t.boxes[0],
        [3.0 / 32.0, 6.0 / 24.0, 5.0 / 32.0, 10.0 / 24.0]
    );
    assert_eq!(t.orig_size, (64, 48));
    assert_eq!(batch.images[(3 * 32 + 30) * 32], 0.0, "padding is zero");

    // A file that does not match its record is an error naming it.
    std::fs::write(tmp.path().join("b.jpg"), b"garbage").expect("write");
    let err = source.get(1, &mut rng).expect_err("corrupt").to_string();
    assert!(err.contains("b.jpg"), "{err}");
}

/// A source whose items reveal their index and RNG stream.
struct Probe(usize);

impl Source for Probe {
    type Item = (usize, u64);
    fn len(&self) -> usize {
        self.0
    }
    fn get(&self, index: usize, rng: &mut ChaCha8Rng) -> densekd::Result<(usize, u64)> {
        Ok((index, rand::Rng::random(rng)))
    }
}

#[test]
fn loader_is_deterministic_whatever_the_worker_count() {
    let run = |workers: usize, epoch: usize| -> Vec<Vec<(usize, u64)>> {
        let cfg = LoaderConfig {
            batch_size: 3,
            shuffle: true,
            drop_last: false,
            workers,
            prefetch: 1,
            seed: 42,
        };
        let loader = Loader::new(Probe(10), Ok, cfg).expect("loader");
        assert_eq!(loader.batches_per_epoch(), 4);
        loader.epoch(epoch).map(|b| b.expect("batch")).collect()
    };
    let reference = run(0, 0);
    assert_eq!(run(1, 0), reference);
    assert_eq!(run(3, 0), reference);
    assert_ne!(run(2, 1), reference, "a new epoch reshuffles");
    let mut seen: Vec<usize> = reference.iter().flatten().map(|x| x.0).collect();
    assert_ne!(seen, (0..10).collect::<Vec<_>>(), "shuffled");
    seen.sort();
    assert_eq!(seen, (0..10).collect::<Vec<_>>(), "every sample once");
    // Stopping early does not hang.
    let cfg = LoaderConfig {
        batch_size: 1,
        workers: 2,
        prefetch: 1,
        ..LoaderConfig::default()
    };
    let loader = Loader::new(Probe(50), Ok, cfg).expect("loader");
    assert_eq!(loader.epoch(0).take(2).count(), 2);
}

#[test]
fn segmentation_flips_and_transpose_move_image_and_labels_together() {
    // A 6×4 image whose red channel is its label, `y · 6 + x`: every pixel names its source.
    let tmp = tempfile::tempdir().expect("tmp");
    let (imgs, labels) = (tmp.path().join("img"), tmp.path().join("lbl"));
    std::fs::create_dir_all(&imgs).expect("mkdir");
    std::fs::create_dir_all(&labels).expect("mkdir");
    let (w, h) = (6u32, 4u32);
    let image = RgbImage::from_fn(w, h, |x, y| Rgb([(y * w + x) as u8, 0, 0]));
    image.save(imgs.join("x.png")).expect("save");
    let map = LabelMap {
        width: w,
        height: h,
        data: (0..(w * h) as u8).collect(),
    };
    write_label_map(&labels.join("x.png"), &map, false).expect("write");
    let sample = |hflip: f64, vflip: f64, transpose: f64, crop: (u32, u32)| {
        let aug = SegAugment {
            scale_range: (1.0, 1.0),
            crop,
            hflip_prob: hflip,
            vflip_prob: vflip,
            transpose_prob: transpose,
            rotate_prob: 0.0,
            rotate_degrees: 0.0,
            photometric: None,
        };
        aug.validate().expect("valid");
        let src = LabelMapFolder::new(&imgs, &labels, ("", ""), 24, 255, Some(aug)).expect("pairs");
        let mut rng = <ChaCha8Rng as rand::SeedableRng>::seed_from_u64(3);
        let s = src.get(0, &mut rng).expect("loads");
        for (px, &l) in s.image.pixels().zip(&s.label.data) {
            assert_eq!(px[0], l, "image and labels moved together");
        }
        (s.label.width, s.label.height, s.label.data)
    };
    let source = |x: u32, y: u32| (y * w + x) as u8;
    let expect = |ow: u32, oh: u32, f: &dyn Fn(u32, u32) -> u8| {
        let data: Vec<u8> = (0..oh)
            .flat_map(|y| (0..ow).map(move |x| (x, y)))
            .map(|(x, y)| f(x, y))
            .collect();
        (ow, oh, data)
    };
    assert_eq!(
        sample(0.0, 1.0, 0.0, (w, h)),
        expect(w, h, &|x, y| source(x, h - 1 - y))
    );
    assert_eq!(
        sample(0.0, 0.0, 1.0, (h, w)),
        expect(h, w, &|x, y| source(y, x))
    );
    // Transpose, then both flips: a half turn of the transpose, i.e. a quarter turn.
    assert_eq!(
        sample(1.0, 1.0, 1.0, (h, w)),
        expect(h, w, &|x, y| source(w - 1 - y, h - 1 - x))
    );
    let bad = SegAugment {
        scale_range: (1.0, 1.0),
        crop: (4, 4),
        hflip_prob: 0.5,
        vflip_prob: 1.5,
        transpose_prob: 0.0,
        rotate_prob: 0.0,
        rotate_degrees: 0.0,
        photometric: None,
    };
    let err = bad.validate().expect_err("probability above 1").to_string();
    assert!(err.contains("data.seg_augment.vflip_prob"), "{err}");
}

#[test]
fn segmentation_folder_pairs_by_stem_and_pads_with_ignore() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (imgs, labels) = (tmp.path().join("img"), tmp.path().join("lbl"));
    std::fs::create_dir_all(&imgs).expect("mkdir");
    std::fs::create_dir_all(&labels).expect("mkdir");
    RgbImage::new(8, 6).save(imgs.join("x.png")).expect("save");
    write_label_map(&labels.join("x.png"), &LabelMap::filled(8, 6, 2), true).expect("write");
    let src = LabelMapFolder::new(
        &imgs,
        &labels,
        ("", ""),
        3,
        255,
        Some(SegAugment {
            scale_range: (1.0, 1.0),
            crop: (10, 10),
            hflip_prob: 0.5,
            vflip_prob: 0.0,
            transpose_prob: 0.0,
            rotate_prob: 0.0,
            rotate_degrees: 0.0,
            photometric: None,
        }),
    )
    .expect("pairs");
    let mut rng = <ChaCha8Rng as rand::SeedableRng>::seed_from_u64(1);
    let s = src.get(0, &mut rng).expect("loads");
    assert_eq!(s.image.dimensions(), (10, 10));
    assert_eq!(
        s.label.data.iter().filter(|&&l| l == 2).count(),
        48,
        "all labelled pixels kept"
    );
    assert_eq!(
        s.label.data.iter().filter(|&&l| l == 255).count(),
        52,
        "padding is ignore"
    );
    let batch = collate_segmentation(vec![s], 255).expect("collates");
    assert_eq!(batch.shape, [1, 3, 10, 10]);

    let bad = LabelMapFolder::new(&imgs, &labels, ("", ""), 2, 255, None).expect("pairs");
    let err = bad
        .get(0, &mut rng)
        .expect_err("label 2 with 2 classes")
        .to_string();
    assert!(
        err.contains("x.png") && err.contains("out of range"),
        "{err}"
    );

    RgbImage::new(8, 6).save(imgs.join("y.png")).expect("save");
    let err = LabelMapFolder::new(&imgs, &labels, ("", ""), 3, 255, None)
        .err()
        .expect("y has no label")
        .to_string();
    assert!(err.contains("y.png"), "{err}");
}

#[test]
fn rotation_and_colour_changes_match_opencv_and_colorsys() {
    let text = std::fs::read_to_string("tests/fixtures/augment.json").expect("fixture");
    let fx: serde_json::Value = serde_json::from_str(&text).expect("json");
    let bytes = |v: &serde_json::Value| -> Vec<u8> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|x| x.as_u64().expect("integer") as u8)
            .collect()
    };
    let size = |v: &serde_json::Value| {
        (
            v["width"].as_u64().expect("width") as u32,
            v["height"].as_u64().expect("height") as u32,
        )
    };

    let rot = &fx["rotation"];
    let (w, h) = size(rot);
    let image = RgbImage::from_raw(w, h, bytes(&rot["image"])).expect("image");
    let label = LabelMap {
        width: w,
        height: h,
        data: bytes(&rot["label"]),
    };
    for case in rot["cases"].as_array().expect("cases") {
        let degrees = case["degrees"].as_f64().expect("degrees");
        let (img, lbl) = rotate(&image, &label, degrees, 255);
        let worst = img
            .as_raw()
            .iter()
            .zip(bytes(&case["image"]))
            .map(|(&a, b)| (a as i32 - b as i32).abs())
            .max();
        assert!(worst <= Some(1), "{degrees}°: image off by {worst:?}");
        let checked = bytes(&case["label_checked"]);
        for (i, (&got, want)) in lbl.data.iter().zip(bytes(&case["label"])).enumerate() {
            if checked[i] == 1 {
                assert_eq!(got, want, "{degrees}°: label at pixel {i}");
            }
        }
    }

    let col = &fx["colour"];
    let (w, h) = size(col);
    let input = RgbImage::from_raw(w, h, bytes(&col["input"])).expect("image");
    for case in col["cases"].as_array().expect("cases") {
        let change = ColourChange {
            brightness: case["brightness"].as_f64().expect("brightness"),
            contrast: case["contrast"].as_f64().expect("contrast"),
            contrast_first: case["contrast_first"].as_bool().expect("contrast_first"),
            saturation: case["saturation"].as_f64().expect("saturation"),
            hue: case["hue"].as_f64().expect("hue"),
        };
        // Half-way values may round either way after float64 HSV round trips.
        let got = change.apply(&input).into_raw();
        let want = bytes(&case["output"]);
        let off: Vec<i32> = got
            .iter()
            .zip(&want)
            .map(|(&a, &b)| (a as i32 - b as i32).abs())
            .filter(|&d| d > 0)
            .collect();
        assert!(
            off.iter().all(|&d| d == 1) && off.len() * 20 <= want.len(),
            "{change:?}: {off:?}"
        );
    }
}

#[test]
fn rotation_and_colour_options_are_validated_and_drawn() {
    let aug = |rotate_degrees: f64, photometric: Option<Photometric>| SegAugment {
        scale_range: (1.0, 1.0),
        crop: (16, 16),
        hflip_prob: 0.0,
        vflip_prob: 0.0,
        transpose_prob: 0.0,
        rotate_prob: 1.0,
        rotate_degrees,
        photometric,
    };
    let err = aug(200.0, None).validate().expect_err("angle").to_string();
    assert!(err.contains("data.seg_augment.rotate_degrees"), "{err}");
    let bad = Photometric {
        contrast_range: (1.5, 0.5),
        ..Photometric::default()
    };
    let err = aug(10.0, Some(bad))
        .validate()
        .expect_err("range")
        .to_string();
    assert!(
        err.contains("data.seg_augment.photometric.contrast_range"),
        "{err}"
    );
    let err = toml::from_str::<SegAugment>(
        "scale_range = [1.0, 1.0]\ncrop = [8, 8]\nhflip_prob = 0.5\nrotate_deg = 10.0",
    )
    .expect_err("typo")
    .to_string();
    assert!(err.contains("rotate_deg"), "{err}");

    // Every drawn change stays within its configured range, and each part is sometimes off.
    let p = Photometric::default();
    let mut rng = <ChaCha8Rng as rand::SeedableRng>::seed_from_u64(5);
    let draws: Vec<ColourChange> = (0..400).map(|_| p.draw(&mut rng)).collect();
    for d in &draws {
        assert!(d.brightness.abs() <= 32.0 && d.hue.abs() <= 36.0, "{d:?}");
        assert!((0.5..=1.5).contains(&d.contrast) && (0.5..=1.5).contains(&d.saturation));
    }
    let off = |f: &dyn Fn(&ColourChange) -> bool| draws.iter().filter(|d| f(d)).count();
    for count in [
        off(&|d| d.brightness == 0.0),
        off(&|d| d.contrast == 1.0),
        off(&|d| d.saturation == 1.0),
        off(&|d| d.hue == 0.0),
        off(&|d| d.contrast_first),
    ] {
        assert!((150..=250).contains(&count), "about half of 400: {count}");
    }

    // A rotated sample keeps image and labels together: a uniform object stays labelled as one.
    let tmp = tempfile::tempdir().expect("tmp");
    let (imgs, labels) = (tmp.path().join("img"), tmp.path().join("lbl"));
    std::fs::create_dir_all(&imgs).expect("mkdir");
    std::fs::create_dir_all(&labels).expect("mkdir");
    let inside = |x: u32, y: u32| (4..12).contains(&x) && (6..10).contains(&y);
    RgbImage::from_fn(16, 16, |x, y| {
        Rgb(if inside(x, y) { [200; 3] } else { [50; 3] })
    })
    .save(imgs.join("x.png"))
    .expect("save");
    let map = LabelMap {
        width: 16,
        height: 16,
        data: (0..256u32).map(|i| inside(i % 16, i / 16) as u8).collect(),
    };
    write_label_map(&labels.join("x.png"), &map, false).expect("write");
    let src = LabelMapFolder::new(&imgs, &labels, ("", ""), 2, 255, Some(aug(180.0, None)))
        .expect("pairs");
    let mut rng = <ChaCha8Rng as rand::SeedableRng>::seed_from_u64(9);
    for _ in 0..8 {
        let s = src.get(0, &mut rng).expect("loads");
        let mut sums = [(0.0, 0usize); 2];
        for (px, &l) in s.image.pixels().zip(&s.label.data) {
            assert!(l <= 1 || l == 255, "label {l}");
            if l <= 1 {
                sums[l as usize].0 += px[0] as f64;
                sums[l as usize].1 += 1;
            }
        }
        let mean = |(sum, n): (f64, usize)| sum / n as f64;
        assert!(mean(sums[1]) > 170.0 && mean(sums[0]) < 80.0, "{sums:?}");
        assert!(
            (24..=40).contains(&sums[1].1),
            "the 8×4 object keeps its area: {sums:?}"
        );
    }
}
