//! Prediction with an exported model. A detector writes COCO results JSON (what `eval coco --dt`
//! reads) and PNGs with the detections drawn; a segmenter writes palette label maps (what
//! `eval seg --pred` reads, the same format as the dataset's labels) and colour overlays.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use serde_json::json;

use crate::data::coco::{Category, CocoDataset, InvalidPolicy};
use crate::data::detection::{collate_detection, prepare_image, DetAugment, DetBatch};
use crate::data::images::{list_images, load_rgb, save_png};
use crate::data::labelmap::{write_label_map, LabelMap};
use crate::data::segmentation::{collate_segmentation, SegSample};
use crate::error::{Error, Result};
use crate::eval::coco::Detection;
use crate::model::deeplabv3::config::TestFlips;
use crate::model::deeplabv3::export::SegmenterInfo;
use crate::model::deeplabv3::task::predict_labels;
use crate::model::deeplabv3::DeepLabV3;
use crate::model::detr::postprocess;
use crate::model::fcos::config::FcosDecodeConfig;
use crate::model::{load_export, Exported};

/// How to predict.
#[derive(Debug, Clone)]
pub struct PredictOptions {
    /// Detections below this score are neither written nor drawn.
    pub score_thr: f64,
    /// Detections kept per image before the threshold.
    pub max_dets: usize,
    /// Ground truth whose image ids (matched by file name) the results should use.
    pub gt: Option<PathBuf>,
    /// Also write annotated PNGs.
    pub draw: bool,
    /// A segmenter's test-time flips, instead of those its run evaluated with.
    pub flips: Option<TestFlips>,
}

/// What a prediction run wrote.
#[derive(Debug)]
pub struct PredictSummary {
    /// Images processed.
    pub images: usize,
    /// Detections written (`None` for a segmenter).
    pub detections: Option<usize>,
    /// The results JSON (detector) or the label-map folder (segmenter).
    pub results: PathBuf,
    /// Images that could not be read, with why; the others were processed.
    pub skipped: Vec<Error>,
}

/// Expands folders into their images (sorted) and keeps files as given.
pub fn collect_images(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in inputs {
        if p.is_dir() {
            let found = list_images(p)?;
            if found.is_empty() {
                return Err(Error::invalid(
                    p,
                    "--images",
                    "the folder holds no PNG or JPEG images",
                ));
            }
            out.extend(found);
        } else {
            out.push(p.clone());
        }
    }
    if out.is_empty() {
        return Err(Error::config("--images", "no images found"));
    }
    Ok(out)
}

/// Runs the model in `weights` on `images`: a detector writes `out/detections.json`, a
/// segmenter `out/labels/<stem>.png`; both draw `out/vis/<stem>.png` if asked. An unreadable
/// image is listed in [`PredictSummary::skipped`] and the others are still processed.
pub fn predict<B: Backend>(
    weights: &Path,
    images: &[PathBuf],
    out: &Path,
    options: &PredictOptions,
    device: &B::Device,
) -> Result<PredictSummary> {
    match load_export::<B>(weights, device)? {
        Exported::Detr(model, info) => {
            let header = DetectorHeader {
                categories: &info.categories,
                preprocess: &info.preprocess,
                size_divisor: info.size_divisor,
            };
            detect(&header, weights, images, out, options, |batch| {
                let prediction = model.forward(batch.images_tensor::<B>(device), &batch.padding, 1);
                let sizes: Vec<(u32, u32)> = batch.targets.iter().map(|t| t.orig_size).collect();
                postprocess(
                    prediction.last(),
                    model.num_queries,
                    &sizes,
                    options.max_dets,
                )
            })
        }
        Exported::Fcos(model, info) => {
            let header = DetectorHeader {
                categories: &info.categories,
                preprocess: &info.preprocess,
                size_divisor: info.size_divisor,
            };
            let decode = FcosDecodeConfig {
                max_dets: options.max_dets,
                ..info.decode.clone()
            };
            detect(&header, weights, images, out, options, |batch| {
                crate::model::fcos::task::detect(&model, &info.model.strides, &decode, batch)
            })
        }
        Exported::DeepLabV3(model, info) => segment(&model, &info, images, out, options),
    }
}

/// What a detector's export records about its input and output.
struct DetectorHeader<'a> {
    categories: &'a [Category],
    preprocess: &'a DetAugment,
    size_divisor: u32,
}

/// Output file stems of `images`: their own, suffixed with the position where two collide.
fn unique_stems(images: &[PathBuf]) -> Vec<String> {
    let mut seen = HashSet::new();
    images
        .iter()
        .enumerate()
        .map(|(i, path)| {
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| (i + 1).to_string());
            if seen.insert(stem.clone()) {
                stem
            } else {
                format!("{stem}-{}", i + 1)
            }
        })
        .collect()
}

/// Segments each image whole: `out/labels/<stem>.png` and, if asked, `out/vis/<stem>.png`.
fn segment<B: Backend>(
    model: &DeepLabV3<B>,
    info: &SegmenterInfo,
    images: &[PathBuf],
    out: &Path,
    options: &PredictOptions,
) -> Result<PredictSummary> {
    let labels_dir = out.join("labels");
    let mut skipped = Vec::new();
    for (path, stem) in images.iter().zip(unique_stems(images)) {
        let image = match load_rgb(path) {
            Ok(image) => image,
            Err(e) => {
                skipped.push(e);
                continue;
            }
        };
        let (width, height) = image.dimensions();
        let sample = SegSample {
            name: stem.clone(),
            label: LabelMap::filled(width, height, info.ignore_index),
            image,
        };
        let batch = collate_segmentation(vec![sample.clone()], info.ignore_index)?;
        let label = LabelMap {
            width,
            height,
            data: predict_labels(model, &batch, options.flips.unwrap_or(info.test.flips)),
        };
        write_label_map(&labels_dir.join(format!("{stem}.png")), &label, true)?;
        if options.draw {
            let drawn = crate::viz::draw::draw_segmentation(
                &sample.image,
                &label,
                &info.class_names,
                info.ignore_index,
            );
            save_png(&out.join("vis").join(format!("{stem}.png")), &drawn)?;
        }
    }
    Ok(PredictSummary {
        images: images.len() - skipped.len(),
        detections: None,
        results: labels_dir,
        skipped,
    })
}

/// Detects objects in each image with `run` (detections per image of a batch): writes
/// `out/detections.json` and, if asked, `out/vis/<stem>.png`.
fn detect(
    info: &DetectorHeader,
    weights: &Path,
    images: &[PathBuf],
    out: &Path,
    options: &PredictOptions,
    run: impl Fn(&DetBatch) -> Vec<Vec<Detection>>,
) -> Result<PredictSummary> {
    let names: Vec<String> = info.categories.iter().map(|c| c.name.clone()).collect();
    let ids: Vec<u64> = match &options.gt {
        Some(gt_path) => {
            let gt = CocoDataset::load(gt_path, InvalidPolicy::Skip)?;
            gt.print_warnings();
            if gt.categories != info.categories {
                return Err(Error::invalid(
                    gt_path,
                    "categories",
                    format!(
                        "differ from those the model in {} was trained on",
                        weights.display()
                    ),
                ));
            }
            let by_name: HashMap<&str, u64> = gt
                .images
                .iter()
                .map(|e| (e.file_name.as_str(), e.id))
                .collect();
            images
                .iter()
                .map(|p| {
                    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                    by_name
                        .iter()
                        .find(|(f, _)| {
                            **f == name || Path::new(f).file_name() == Some(name.as_ref())
                        })
                        .map(|(_, &id)| id)
                        .ok_or_else(|| {
                            Error::invalid(
                                gt_path,
                                "images",
                                format!("no entry for {}", p.display()),
                            )
                        })
                })
                .collect::<Result<_>>()?
        }
        None => (1..=images.len() as u64).collect(),
    };

    let mut results = Vec::new();
    let mut skipped = Vec::new();
    for ((path, &id), stem) in images.iter().zip(&ids).zip(unique_stems(images)) {
        let image = match load_rgb(path) {
            Ok(image) => image,
            Err(e) => {
                skipped.push(e);
                continue;
            }
        };
        let batch = collate_detection(
            vec![prepare_image(id, &image, info.preprocess)],
            info.size_divisor,
        )?;
        let dets: Vec<_> = run(&batch)
            .into_iter()
            .flatten()
            .filter(|d| d.score >= options.score_thr)
            .collect();
        for d in &dets {
            let category = info.categories.get(d.class).ok_or_else(|| {
                Error::invalid(
                    weights,
                    "categories",
                    format!("no category for class {}", d.class),
                )
            })?;
            results.push(json!({
                "image_id": id,
                "category_id": category.id,
                "bbox": d.bbox,
                "score": d.score,
            }));
        }
        if options.draw {
            let drawn = crate::viz::draw::draw_detections(&image, &dets, &names);
            save_png(&out.join("vis").join(format!("{stem}.png")), &drawn)?;
        }
    }
    let results_path = out.join("detections.json");
    crate::data::coco::write_json(&results_path, &results)?;
    Ok(PredictSummary {
        images: images.len() - skipped.len(),
        detections: Some(results.len()),
        results: results_path,
        skipped,
    })
}
