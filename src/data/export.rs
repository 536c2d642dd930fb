//! Writes the built-in synthetic dataset to disk as a real dataset (PNG images, COCO JSON, PNG
//! label maps), and checks a written copy by reading it back through the public readers.

use std::path::Path;

use hotcoco::{Annotation, Category, Dataset, Image, Segmentation};
use rayon::prelude::*;
use serde::Serialize;

use crate::data::coco::{write_json, CocoDataset, InvalidPolicy};
use crate::data::images::save_png;
use crate::data::labelmap::{write_label_map, LabelMap};
use crate::data::synth::{self, Split, SynthConfig, SynthSample};
use crate::error::{Error, Result};
use crate::eval::coco::{evaluate, CocoStats};
use crate::eval::seg::{evaluate_dirs, SegStats};

/// COCO image id of synthetic sample `index` (ids start at 1, as in COCO).
pub fn synth_image_id(index: usize) -> u64 {
    index as u64 + 1
}

/// The synthetic categories, COCO ids `1..=K` in class order.
pub fn synth_categories() -> Vec<Category> {
    synth::CLASS_NAMES
        .iter()
        .enumerate()
        .map(|(i, name)| Category {
            id: i as u64 + 1,
            name: (*name).to_string(),
            supercategory: Some("shape".to_string()),
            ..Default::default()
        })
        .collect()
}

/// File stem of sample `index`.
fn stem(index: usize) -> String {
    format!("{index:06}")
}

/// The image record and annotations of one generated sample.
fn coco_records(
    sample: &SynthSample,
    index: usize,
    first_ann_id: u64,
) -> Result<(Image, Vec<Annotation>)> {
    let (w, h) = sample.image.dimensions();
    let image_id = synth_image_id(index);
    let mut anns = Vec::with_capacity(sample.objects.len());
    for (k, obj) in sample.objects.iter().enumerate() {
        // hotcoco's RLE encoder takes column-major masks, like pycocotools.
        let mut col_major = vec![0u8; obj.mask.len()];
        for y in 0..h as usize {
            for x in 0..w as usize {
                col_major[x * h as usize + y] = obj.mask[y * w as usize + x];
            }
        }
        let rle = hotcoco::mask::encode(&col_major, h, w)
            .map_err(|e| Error::config("synth mask", e.to_string()))?;
        anns.push(Annotation {
            id: first_ann_id + k as u64,
            image_id,
            category_id: obj.class as u64 + 1,
            bbox: Some(obj.bbox),
            area: Some(obj.area as f64),
            segmentation: Some(Segmentation::CompressedRle {
                size: [h, w],
                counts: hotcoco::mask::rle_to_string(&rle),
            }),
            iscrowd: false,
            ..Default::default()
        });
    }
    let image = Image {
        id: image_id,
        file_name: format!("{}.png", stem(index)),
        width: w,
        height: h,
        ..Default::default()
    };
    Ok((image, anns))
}

/// The COCO ground truth of the first `n` samples of a split, built in memory.
pub fn synth_coco(config: &SynthConfig, split: Split, n: usize) -> Result<Dataset> {
    let per_image: Vec<(Image, Vec<Annotation>)> = (0..n)
        .into_par_iter()
        .map(|i| coco_records(&synth::generate(config, split, i), i, 0))
        .collect::<Result<_>>()?;
    Ok(assemble(per_image))
}

/// Joins per-image records into one dataset, numbering annotations from 1.
fn assemble(per_image: Vec<(Image, Vec<Annotation>)>) -> Dataset {
    let mut images = Vec::with_capacity(per_image.len());
    let mut annotations = Vec::new();
    for (image, anns) in per_image {
        images.push(image);
        annotations.extend(anns);
    }
    for (i, a) in annotations.iter_mut().enumerate() {
        a.id = i as u64 + 1;
    }
    Dataset {
        info: Some(hotcoco::types::Info {
            year: None,
            version: Some(env!("CARGO_PKG_VERSION").to_string()),
            description: Some("densekd built-in synthetic shapes dataset".to_string()),
            contributor: None,
            url: None,
            date_created: None,
        }),
        images,
        annotations,
        categories: synth_categories(),
        licenses: Vec::new(),
    }
}

/// Counts of what a split contains.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SplitSummary {
    /// Number of images.
    pub images: usize,
    /// Number of objects.
    pub objects: usize,
    /// Objects per class, in class order.
    pub per_class: Vec<usize>,
    /// Objects with area < 32².
    pub small: usize,
    /// Objects with 32² ≤ area ≤ 96².
    pub medium: usize,
    /// Objects with area > 96².
    pub large: usize,
}

impl SplitSummary {
    /// Tallies a COCO dataset.
    pub fn of(dataset: &Dataset) -> Self {
        let mut s = SplitSummary {
            images: dataset.images.len(),
            per_class: vec![0; dataset.categories.len()],
            ..Default::default()
        };
        let index: std::collections::HashMap<u64, usize> = dataset
            .categories
            .iter()
            .enumerate()
            .map(|(i, c)| (c.id, i))
            .collect();
        for a in &dataset.annotations {
            s.objects += 1;
            if let Some(&c) = index.get(&a.category_id) {
                s.per_class[c] += 1;
            }
            let area = a.area.unwrap_or(0.0);
            // pycocotools' ranges; the 32² and 96² boundaries fall in the middle range.
            if area < 1024.0 {
                s.small += 1;
            } else if area <= 9216.0 {
                s.medium += 1;
            } else {
                s.large += 1;
            }
        }
        s
    }
}

/// Writes `n` samples of `split` under `out`: `images/<split>/*.png`, `labels/<split>/*.png`
/// (palette PNG, class = index) and `annotations/instances_<split>.json`.
pub fn write_split(
    out: &Path,
    config: &SynthConfig,
    split: Split,
    n: usize,
) -> Result<SplitSummary> {
    let name = split.name();
    let (img_dir, label_dir) = (out.join("images").join(name), out.join("labels").join(name));
    for d in [&img_dir, &label_dir] {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    let per_image: Vec<(Image, Vec<Annotation>)> = (0..n)
        .into_par_iter()
        .map(|i| {
            let sample = synth::generate(config, split, i);
            save_png(&img_dir.join(format!("{}.png", stem(i))), &sample.image)?;
            let label = LabelMap {
                width: sample.label.width(),
                height: sample.label.height(),
                data: sample.label.as_raw().clone(),
            };
            write_label_map(&label_dir.join(format!("{}.png", stem(i))), &label, true)?;
            coco_records(&sample, i, 0)
        })
        .collect::<Result<_>>()?;
    let dataset = assemble(per_image);
    let json = out
        .join("annotations")
        .join(format!("instances_{name}.json"));
    write_json(&json, &dataset)?;
    Ok(SplitSummary::of(&dataset))
}

/// Reads a written split back through the public readers and evaluates its ground truth against
/// itself: the boxes as detections with score 1 (COCO AP must be 1) and the label maps as
/// predictions (mIoU must be 1). Catches any loss in the write/read round trip.
pub fn self_check(out: &Path, split: Split) -> Result<(CocoStats, SegStats)> {
    let name = split.name();
    let json = out
        .join("annotations")
        .join(format!("instances_{name}.json"));
    let dataset = crate::data::coco::read_dataset(&json)?;
    let validated = CocoDataset::from_dataset(&json, dataset.clone(), InvalidPolicy::Reject)?;
    let categories = &validated.categories;
    let detections: Vec<Annotation> = validated
        .images
        .iter()
        .flat_map(|img| {
            img.objects.iter().map(move |o| Annotation {
                image_id: img.id,
                category_id: categories[o.class].id,
                bbox: Some(o.bbox),
                score: Some(1.0),
                ..Default::default()
            })
        })
        .collect();
    let coco = evaluate(dataset, detections)?;
    let labels = out.join("labels").join(name);
    let seg = evaluate_dirs(
        &labels,
        &labels,
        synth::NUM_CLASSES + 1,
        synth::IGNORE_INDEX,
    )?;
    Ok((coco, seg))
}
