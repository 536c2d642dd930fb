//! COCO bbox evaluation with pycocotools semantics, backed by `hotcoco` (bit-exact with
//! pycocotools on our fixtures; see `tests/coco_eval.rs`).

use std::collections::HashSet;
use std::path::Path;

use hotcoco::{Annotation, Dataset, EvalMode, Image, IouType, StreamingEval, COCO};
use serde::{Deserialize, Serialize};

use crate::data::coco::{
    first_few, read_dataset, read_results, CocoDataset, ImageEntry, InvalidPolicy,
};
use crate::error::{Error, Result};

/// The 12 COCO summary statistics under the keys `eval coco --json` prints; -1 where pycocotools
/// gives -1 (no ground truth in that area range).
#[allow(non_snake_case)]
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CocoStats {
    /// AP @ IoU .50:.95, all areas, 100 detections.
    pub AP: f64,
    /// AP @ IoU .50.
    pub AP50: f64,
    /// AP @ IoU .75.
    pub AP75: f64,
    /// AP for small objects (area < 32²).
    pub APs: f64,
    /// AP for medium objects (32² ≤ area ≤ 96²).
    pub APm: f64,
    /// AP for large objects (area > 96²).
    pub APl: f64,
    /// AR with 1 detection per image.
    pub AR1: f64,
    /// AR with 10 detections per image.
    pub AR10: f64,
    /// AR with 100 detections per image.
    pub AR100: f64,
    /// AR for small objects.
    pub ARs: f64,
    /// AR for medium objects.
    pub ARm: f64,
    /// AR for large objects.
    pub ARl: f64,
}

/// The stat keys in pycocotools' `stats` order.
pub const STAT_KEYS: [&str; 12] = [
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
];

impl CocoStats {
    /// Builds the stats from pycocotools' `stats` array order.
    pub fn from_array(s: [f64; 12]) -> Self {
        CocoStats {
            AP: s[0],
            AP50: s[1],
            AP75: s[2],
            APs: s[3],
            APm: s[4],
            APl: s[5],
            AR1: s[6],
            AR10: s[7],
            AR100: s[8],
            ARs: s[9],
            ARm: s[10],
            ARl: s[11],
        }
    }

    /// The stats in pycocotools' `stats` array order.
    pub fn to_array(&self) -> [f64; 12] {
        [
            self.AP, self.AP50, self.AP75, self.APs, self.APm, self.APl, self.AR1, self.AR10,
            self.AR100, self.ARs, self.ARm, self.ARl,
        ]
    }

    /// The 12-line summary exactly as pycocotools' `COCOeval.summarize()` prints it.
    pub fn summary_lines(&self) -> Vec<String> {
        const ROWS: [(bool, &str, &str, u32); 12] = [
            (true, "0.50:0.95", "all", 100),
            (true, "0.50", "all", 100),
            (true, "0.75", "all", 100),
            (true, "0.50:0.95", "small", 100),
            (true, "0.50:0.95", "medium", 100),
            (true, "0.50:0.95", "large", 100),
            (false, "0.50:0.95", "all", 1),
            (false, "0.50:0.95", "all", 10),
            (false, "0.50:0.95", "all", 100),
            (false, "0.50:0.95", "small", 100),
            (false, "0.50:0.95", "medium", 100),
            (false, "0.50:0.95", "large", 100),
        ];
        ROWS.iter()
            .zip(self.to_array())
            .map(|(&(ap, iou, area, max_dets), value)| {
                let (title, kind) = if ap {
                    ("Average Precision", "(AP)")
                } else {
                    ("Average Recall", "(AR)")
                };
                format!(
                    " {title:<18} {kind} @[ IoU={iou:<9} | area={area:>6} | maxDets={max_dets:>3} ] = {value:0.3}"
                )
            })
            .collect()
    }
}

/// Runs evaluate → accumulate → summarize on a hotcoco evaluator and returns the 12 stats.
fn stats_of(mut ev: hotcoco::COCOeval) -> Result<CocoStats> {
    if !ev.evaluated() {
        ev.evaluate()
            .map_err(|e| Error::config("coco evaluation", e.to_string()))?;
    }
    ev.accumulate();
    ev.summarize_lines();
    let stats = ev
        .stats()
        .filter(|s| s.len() >= 12)
        .ok_or_else(|| Error::config("coco evaluation", "no summary statistics were produced"))?;
    let mut out = [0.0; 12];
    out.copy_from_slice(&stats[..12]);
    Ok(CocoStats::from_array(out))
}

/// Evaluates a results file against a ground-truth file, as `pycocotools` would.
///
/// The ground truth is validated as training reads it first (duplicate ids and empty lists are
/// errors naming the GT file); annotations training would skip are rejected under
/// [`InvalidPolicy::Reject`], and otherwise reported in the returned warnings and evaluated as
/// they are, as pycocotools does. Detections on images absent from the ground truth are an error
/// (pycocotools asserts); detections of categories absent from the ground truth are reported in
/// the returned warnings and never match, as in pycocotools.
pub fn evaluate_files(
    gt_path: &Path,
    dt_path: &Path,
    policy: InvalidPolicy,
) -> Result<(CocoStats, Vec<String>)> {
    let gt_dataset = read_dataset(gt_path)?;
    // pycocotools needs no image sizes; where the GT has none, boxes go unchecked against them.
    let mut sized = gt_dataset.clone();
    for img in &mut sized.images {
        if img.width == 0 || img.height == 0 {
            (img.width, img.height) = (u32::MAX, u32::MAX);
        }
    }
    let validated = CocoDataset::from_dataset(gt_path, sized, policy)?;
    let mut warnings = Vec::new();
    if !validated.skipped.is_empty() {
        warnings.push(format!(
            "{}: {} of {} annotations are unusable (training skips them; evaluation keeps them, \
             as pycocotools does): {}",
            gt_path.display(),
            validated.skipped.len(),
            gt_dataset.annotations.len(),
            first_few(&validated.skipped)
        ));
    }
    let detections = read_results(dt_path)?;
    let image_ids: HashSet<u64> = gt_dataset.images.iter().map(|i| i.id).collect();
    let cat_ids: HashSet<u64> = gt_dataset.categories.iter().map(|c| c.id).collect();
    if let Some((i, d)) = detections
        .iter()
        .enumerate()
        .find(|(_, d)| !image_ids.contains(&d.image_id))
    {
        return Err(Error::invalid(
            dt_path,
            format!("[{i}].image_id"),
            format!(
                "image id {} is not in {}; the results belong to another split",
                d.image_id,
                gt_path.display()
            ),
        ));
    }
    let unknown: HashSet<u64> = detections
        .iter()
        .map(|d| d.category_id)
        .filter(|c| !cat_ids.contains(c))
        .collect();
    if !unknown.is_empty() {
        let mut ids: Vec<u64> = unknown.into_iter().collect();
        ids.sort_unstable();
        warnings.push(format!(
            "{}: category ids {ids:?} are not in {}; those detections never match",
            dt_path.display(),
            gt_path.display()
        ));
    }
    if let Some(i) = gt_dataset.annotations.iter().position(|a| a.id == 0) {
        warnings.push(format!(
            "{}: annotations[{i}] has id 0; pycocotools counts detections matched to it as false \
             positives (a bug densekd does not reproduce), so its numbers will differ from these",
            gt_path.display()
        ));
    }
    let stats = evaluate(gt_dataset, detections)
        .map_err(|e| Error::invalid(dt_path, "detections", e.to_string()))?;
    Ok((stats, warnings))
}

/// Evaluates detections (COCO result records) against a ground-truth dataset.
pub fn evaluate(gt: Dataset, detections: Vec<Annotation>) -> Result<CocoStats> {
    let gt = COCO::from_dataset(gt);
    let dt = gt
        .load_res_anns(detections)
        .map_err(|e| Error::config("detections", e.to_string()))?;
    stats_of(hotcoco::COCOeval::new(gt, dt, IouType::Bbox))
}

/// One detection in class-index space, as a model produces it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detection {
    /// Contiguous class index.
    pub class: usize,
    /// Box `[x, y, w, h]` in original image pixels.
    pub bbox: [f64; 4],
    /// Confidence.
    pub score: f64,
}

/// Streaming COCO evaluation for training loops: feed each image's detections as they come, read
/// the 12 stats at the end. Ground truth comes from a validated [`CocoDataset`].
pub struct CocoEvaluator {
    categories: Vec<u64>,
    stream: StreamingEval,
}

impl CocoEvaluator {
    /// Starts an evaluation over the categories of `dataset`.
    pub fn new(dataset: &CocoDataset) -> Result<Self> {
        let categories: Vec<hotcoco::Category> = dataset
            .categories
            .iter()
            .map(|c| hotcoco::Category {
                id: c.id,
                name: c.name.clone(),
                ..Default::default()
            })
            .collect();
        let params = EvalMode::Coco.default_params(IouType::Bbox);
        let stream = StreamingEval::new(params, EvalMode::Coco, categories)
            .map_err(|e| Error::config("coco evaluation", e.to_string()))?;
        Ok(CocoEvaluator {
            categories: dataset.categories.iter().map(|c| c.id).collect(),
            stream,
        })
    }

    /// Adds one image: its ground truth from `entry` and the model's detections.
    pub fn add_image(&mut self, entry: &ImageEntry, detections: &[Detection]) -> Result<()> {
        self.add_images(std::iter::once((entry, detections)))
    }

    /// Adds a batch of images at once (cheaper than one call per image).
    pub fn add_images<'a>(
        &mut self,
        batch: impl IntoIterator<Item = (&'a ImageEntry, &'a [Detection])>,
    ) -> Result<()> {
        let (mut images, mut gts, mut dts) = (Vec::new(), Vec::new(), Vec::new());
        for (entry, detections) in batch {
            images.push(Image {
                id: entry.id,
                file_name: entry.file_name.clone(),
                width: entry.width,
                height: entry.height,
                ..Default::default()
            });
            for o in &entry.objects {
                gts.push(Annotation {
                    image_id: entry.id,
                    category_id: self.categories[o.class],
                    bbox: Some(o.bbox),
                    area: Some(o.area),
                    iscrowd: o.iscrowd,
                    ..Default::default()
                });
            }
            for d in detections {
                let category_id = *self.categories.get(d.class).ok_or_else(|| {
                    Error::config(
                        "detection.class",
                        format!("class {} >= {} classes", d.class, self.categories.len()),
                    )
                })?;
                dts.push(Annotation {
                    image_id: entry.id,
                    category_id,
                    bbox: Some(d.bbox),
                    score: Some(d.score),
                    ..Default::default()
                });
            }
        }
        self.stream
            .update(images, gts, dts)
            .map_err(|e| Error::config("coco evaluation", e.to_string()))
    }

    /// Finishes the evaluation and returns the 12 stats.
    pub fn finish(self) -> Result<CocoStats> {
        stats_of(self.stream.finalize())
    }
}
