//! Prediction with an exported detector: COCO results JSON (what `eval coco --dt` reads) and
//! PNGs with the detections drawn.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use serde_json::json;

use crate::data::coco::{CocoDataset, InvalidPolicy};
use crate::data::detection::{collate_detection, prepare_image};
use crate::data::images::{list_images, load_rgb, save_png};
use crate::error::{Error, Result};
use crate::model::detr::postprocess;
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
}

/// What a prediction run wrote.
#[derive(Debug, Clone)]
pub struct PredictSummary {
    /// Images processed.
    pub images: usize,
    /// Detections written.
    pub detections: usize,
    /// The results JSON.
    pub results: PathBuf,
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

/// Runs the detector in `weights` on `images`, writing `out/detections.json` and, if asked,
/// `out/vis/*.png`.
pub fn predict<B: Backend>(
    weights: &Path,
    images: &[PathBuf],
    out: &Path,
    options: &PredictOptions,
    device: &B::Device,
) -> Result<PredictSummary> {
    let Exported::Detr(model, info) = load_export::<B>(weights, device)?;
    let names: Vec<String> = info.categories.iter().map(|c| c.name.clone()).collect();
    let ids: Vec<u64> = match &options.gt {
        Some(gt_path) => {
            let gt = CocoDataset::load(gt_path, InvalidPolicy::Skip)?;
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
    let mut stems = HashSet::new();
    for (path, &id) in images.iter().zip(&ids) {
        let image = load_rgb(path)?;
        let batch = collate_detection(
            vec![prepare_image(id, &image, &info.preprocess)],
            info.size_divisor,
        )?;
        let prediction = model.forward(batch.images_tensor::<B>(device), &batch.padding, 1);
        let dets: Vec<_> = postprocess(
            prediction.last(),
            model.num_queries,
            &[image.dimensions()],
            options.max_dets,
        )
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
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| id.to_string());
            let stem = if stems.insert(stem.clone()) {
                stem
            } else {
                format!("{stem}-{id}")
            };
            let drawn = crate::viz::draw::draw_detections(&image, &dets, &names);
            save_png(&out.join("vis").join(format!("{stem}.png")), &drawn)?;
        }
    }
    let results_path = out.join("detections.json");
    crate::data::coco::write_json(&results_path, &results)?;
    Ok(PredictSummary {
        images: images.len(),
        detections: results.len(),
        results: results_path,
    })
}
