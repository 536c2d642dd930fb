//! Semantic segmentation mIoU with mmsegmentation's `IoUMetric` convention.
//!
//! Pixels whose ground truth is the ignore index are dropped; per-class intersection, prediction
//! and label histograms are summed over the whole dataset (not averaged per image); IoU is
//! undefined (null) for a class with zero union and mIoU averages the defined ones. A predicted
//! value ≥ K (an abstention, such as 255) counts as a miss for its ground-truth class and as a
//! prediction of no class, exactly as mmseg's `torch.histc` drops it. hotcoco's `SemanticEval`
//! rejects such predictions, hence this small counter of our own.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::labelmap::{read_label_map, LabelMap};
use crate::error::{Error, Result};

/// The result of a segmentation evaluation.
#[allow(non_snake_case)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegStats {
    /// Mean IoU over classes with a non-empty union (null if there are none).
    pub mIoU: Option<f64>,
    /// Overall pixel accuracy over non-ignored pixels (null if there are none).
    pub aAcc: Option<f64>,
    /// IoU per class, null where the union is empty.
    pub IoU: Vec<Option<f64>>,
}

/// Streaming mIoU accumulator: feed (ground truth, prediction) pairs, read [`SegStats`] at the end.
#[derive(Debug, Clone)]
pub struct SegEvaluator {
    num_classes: usize,
    ignore_index: u8,
    intersect: Vec<u64>,
    pred_area: Vec<u64>,
    label_area: Vec<u64>,
    images: usize,
}

impl SegEvaluator {
    /// An empty evaluator for `num_classes` classes.
    pub fn new(num_classes: usize, ignore_index: u8) -> Self {
        SegEvaluator {
            num_classes,
            ignore_index,
            intersect: vec![0; num_classes],
            pred_area: vec![0; num_classes],
            label_area: vec![0; num_classes],
            images: 0,
        }
    }

    /// Number of image pairs counted so far.
    pub fn images(&self) -> usize {
        self.images
    }

    /// Counts one pair of equally sized, row-major maps. A ground-truth label that is neither a
    /// class nor the ignore index is an error (the pair is then not counted); `name` labels it.
    pub fn update(&mut self, gt: &[u8], pred: &[u8], name: &str) -> Result<()> {
        if gt.len() != pred.len() {
            return Err(Error::config(
                name,
                format!(
                    "ground truth has {} pixels, prediction {}",
                    gt.len(),
                    pred.len()
                ),
            ));
        }
        let k = self.num_classes;
        if let Some(i) = self.first_out_of_range(gt) {
            return Err(Error::config(
                name,
                format!(
                    "ground-truth pixel {i} has label {} but there are {k} classes and the ignore index is {}",
                    gt[i], self.ignore_index
                ),
            ));
        }
        for (&g, &p) in gt.iter().zip(pred) {
            if g == self.ignore_index {
                continue;
            }
            self.label_area[g as usize] += 1;
            if (p as usize) < k {
                self.pred_area[p as usize] += 1;
                if p == g {
                    self.intersect[g as usize] += 1;
                }
            }
        }
        self.images += 1;
        Ok(())
    }

    /// Index of the first ground-truth label that is neither a class nor the ignore index.
    fn first_out_of_range(&self, gt: &[u8]) -> Option<usize> {
        gt.iter()
            .position(|&g| g != self.ignore_index && g as usize >= self.num_classes)
    }

    /// Counts one pair of label maps; errors name the files.
    pub fn update_maps(
        &mut self,
        gt: &LabelMap,
        pred: &LabelMap,
        gt_path: &Path,
        pred_path: &Path,
    ) -> Result<()> {
        if (gt.width, gt.height) != (pred.width, pred.height) {
            return Err(Error::invalid(
                pred_path,
                "size",
                format!(
                    "{}x{} but the ground truth {} is {}x{}",
                    pred.width,
                    pred.height,
                    gt_path.display(),
                    gt.width,
                    gt.height
                ),
            ));
        }
        if let Some(i) = self.first_out_of_range(&gt.data) {
            let w = gt.width as usize;
            return Err(Error::invalid(
                gt_path,
                format!("pixel ({}, {})", i % w, i / w),
                format!(
                    "label {} is out of range for {} classes (ignore index {})",
                    gt.data[i], self.num_classes, self.ignore_index
                ),
            ));
        }
        self.update(&gt.data, &pred.data, &gt_path.display().to_string())
    }

    /// Adds another evaluator's counts (e.g. a parallel shard).
    pub fn merge(&mut self, other: &SegEvaluator) -> Result<()> {
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index) {
            return Err(Error::config(
                "merge",
                "evaluators differ in number of classes or ignore index",
            ));
        }
        for (a, b) in [
            (&mut self.intersect, &other.intersect),
            (&mut self.pred_area, &other.pred_area),
            (&mut self.label_area, &other.label_area),
        ] {
            a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        }
        self.images += other.images;
        Ok(())
    }

    /// The metrics over everything counted so far.
    pub fn stats(&self) -> SegStats {
        let iou: Vec<Option<f64>> = (0..self.num_classes)
            .map(|c| {
                let union = self.pred_area[c] + self.label_area[c] - self.intersect[c];
                (union > 0).then(|| self.intersect[c] as f64 / union as f64)
            })
            .collect();
        let defined: Vec<f64> = iou.iter().flatten().copied().collect();
        let miou =
            (!defined.is_empty()).then(|| defined.iter().sum::<f64>() / defined.len() as f64);
        let labelled: u64 = self.label_area.iter().sum();
        let aacc =
            (labelled > 0).then(|| self.intersect.iter().sum::<u64>() as f64 / labelled as f64);
        SegStats {
            mIoU: miou,
            aAcc: aacc,
            IoU: iou,
        }
    }
}

/// PNG files of a folder keyed by file stem.
fn pngs_by_stem(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let is_png = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("png"));
        if let (true, Some(stem)) = (is_png, path.file_stem()) {
            out.insert(stem.to_string_lossy().into_owned(), path);
        }
    }
    Ok(out)
}

/// Evaluates every ground-truth PNG in `gt_dir` against the prediction with the same stem in
/// `pred_dir`. A missing prediction is an error naming it; extra predictions are ignored.
pub fn evaluate_dirs(
    gt_dir: &Path,
    pred_dir: &Path,
    num_classes: usize,
    ignore_index: u8,
) -> Result<SegStats> {
    let gts = pngs_by_stem(gt_dir)?;
    if gts.is_empty() {
        return Err(Error::invalid(gt_dir, "files", "no PNG label maps found"));
    }
    let preds = pngs_by_stem(pred_dir)?;
    let missing: Vec<&String> = gts.keys().filter(|s| !preds.contains_key(*s)).collect();
    if let Some(first) = missing.first() {
        return Err(Error::invalid(
            pred_dir,
            "files",
            format!(
                "{} ground-truth map(s) have no prediction, first: {first}.png",
                missing.len()
            ),
        ));
    }
    let mut evaluator = SegEvaluator::new(num_classes, ignore_index);
    for (stem, gt_path) in &gts {
        let pred_path = &preds[stem];
        let gt = read_label_map(gt_path)?;
        let pred = read_label_map(pred_path)?;
        evaluator.update_maps(&gt, &pred, gt_path, pred_path)?;
    }
    Ok(evaluator.stats())
}
