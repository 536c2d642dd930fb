//! What every detector task reads: the training and validation loaders of the configured data
//! (synthetic or COCO), the validation ground truth for COCO evaluation, and an unaugmented view
//! of the training images.

use std::collections::HashMap;
use std::path::Path;

use crate::backend::map_ordered;
use crate::data::coco::{Category, CocoDataset, InvalidPolicy};
use crate::data::detection::check_image_headers;
use crate::data::detection::{
    collate_detection, CocoSource, DetAugment, DetBatch, DetSource, SynthDetSource,
};
use crate::data::export::synth_coco;
use crate::data::loader::{Loader, LoaderConfig, Subset};
use crate::data::synth::Split;
use crate::error::{Error, Result};
use crate::eval::coco::{CocoEvaluator, Detection, STAT_KEYS};
use crate::task::{Metrics, Stats, TaskInputs};

/// Every detector's statistics: the 12 COCO stats, AP first.
pub const DETECTION_METRICS: Metrics = Metrics {
    headline: "AP",
    reported: &["AP", "AP50", "AP75"],
    chance: 0.01,
};

/// A detector's datasets.
pub struct DetSplits {
    /// Shuffled, augmented training batches.
    pub train: Loader<DetSource, DetBatch>,
    /// Validation batches with the evaluation preprocessing.
    pub val: Loader<DetSource, DetBatch>,
    /// The training images with the evaluation preprocessing.
    pub train_eval: DetSource,
    /// Validation ground truth.
    pub val_gt: CocoDataset,
    /// Position of each validation image id in `val_gt.images`.
    pub val_index: HashMap<u64, usize>,
    /// Evaluation preprocessing.
    pub preprocess: DetAugment,
    /// Padding multiple of batched images.
    pub size_divisor: u32,
}

impl DetSplits {
    /// Opens the configured data, refusing it unless it has `num_classes` categories
    /// (`classes_key` names the model's setting in the error).
    pub fn open(inputs: &TaskInputs, num_classes: usize, classes_key: &str) -> Result<Self> {
        let d = inputs.data;
        let augment = d.det_augment()?;
        let eval_aug = augment.eval();
        let (train_source, train_eval, val_source, val_gt) = match &d.coco {
            Some(c) => {
                let train = CocoDataset::load(&c.train_json, c.policy)?;
                let val = CocoDataset::load(&c.val_json, c.policy)?;
                train.print_warnings();
                val.print_warnings();
                if train.categories != val.categories {
                    return Err(Error::invalid(
                        &c.val_json,
                        "categories",
                        format!("differ from those of {}", c.train_json.display()),
                    ));
                }
                let source = |dataset, root: &Path, augment| {
                    DetSource::Coco(CocoSource {
                        dataset,
                        image_root: root.to_path_buf(),
                        augment,
                    })
                };
                (
                    source(train.clone(), &c.train_images, augment.clone()),
                    source(train, &c.train_images, eval_aug.clone()),
                    source(val.clone(), &c.val_images, eval_aug),
                    val,
                )
            }
            None => {
                let s = &d.synthetic;
                let gt = synth_coco(&s.generator, Split::Val, s.val_images)?;
                let gt = CocoDataset::from_dataset(
                    Path::new("synthetic validation split"),
                    gt,
                    InvalidPolicy::Reject,
                )?;
                let source = |split, len, augment| {
                    DetSource::Synth(SynthDetSource {
                        config: s.generator.clone(),
                        split,
                        len,
                        augment,
                    })
                };
                (
                    source(Split::Train, s.train_images, augment.clone()),
                    source(Split::Train, s.train_images, eval_aug.clone()),
                    source(Split::Val, s.val_images, eval_aug),
                    gt,
                )
            }
        };
        if val_gt.num_classes() != num_classes {
            return Err(Error::config(
                classes_key,
                format!(
                    "is {num_classes} but the data has {} categories",
                    val_gt.num_classes()
                ),
            ));
        }
        // After the cheaper checks: every listed image must exist and match its record.
        for source in [&train_source, &val_source] {
            if let DetSource::Coco(s) = source {
                check_image_headers(&s.dataset, &s.image_root)?;
            }
        }
        let divisor = d.size_divisor;
        let loader = |source, shuffle| {
            Loader::<DetSource, DetBatch>::new(
                source,
                move |samples| collate_detection(samples, divisor),
                LoaderConfig {
                    batch_size: inputs.batch_size,
                    shuffle,
                    drop_last: shuffle,
                    workers: d.workers,
                    prefetch: 2,
                    seed: inputs.seed,
                },
            )
        };
        let val_index = val_gt
            .images
            .iter()
            .enumerate()
            .map(|(i, e)| (e.id, i))
            .collect();
        Ok(DetSplits {
            train: loader(train_source, true)?,
            val: loader(val_source, false)?,
            train_eval,
            val_gt,
            val_index,
            preprocess: augment.eval(),
            size_divisor: divisor,
        })
    }

    /// The first `len` training images, unaugmented, in order, in batches of `batch_size`.
    pub fn train_subset(
        &self,
        len: usize,
        batch_size: usize,
        seed: u64,
    ) -> Result<Loader<Subset<DetSource>, DetBatch>> {
        let divisor = self.size_divisor;
        Loader::new(
            Subset {
                inner: self.train_eval.clone(),
                len,
            },
            move |samples| collate_detection(samples, divisor),
            LoaderConfig {
                batch_size,
                shuffle: false,
                drop_last: false,
                workers: 0,
                prefetch: 2,
                seed,
            },
        )
    }

    /// The categories of the data, in class order.
    pub fn categories(&self) -> &[Category] {
        &self.val_gt.categories
    }

    /// The 12 COCO statistics, named, of the detections `detect` returns for each validation
    /// batch (one list per image).
    pub fn evaluate(
        &self,
        detect: impl Fn(&DetBatch) -> Vec<Vec<Detection>> + Sync,
    ) -> Result<Stats> {
        let gt = &self.val_gt;
        let mut evaluator = CocoEvaluator::new(gt)?;
        map_ordered(self.val.epoch(0), detect, |batch, dets| {
            for (target, d) in batch.targets.iter().zip(&dets) {
                let entry = self
                    .val_index
                    .get(&target.image_id)
                    .map(|&i| &gt.images[i])
                    .ok_or_else(|| {
                        Error::invalid(
                            &gt.path,
                            "images",
                            format!("no image id {}", target.image_id),
                        )
                    })?;
                evaluator.add_image(entry, d)?;
            }
            Ok(())
        })?;
        let stats = evaluator.finish()?;
        Ok(STAT_KEYS
            .iter()
            .zip(stats.to_array())
            .map(|(k, v)| ((*k).to_string(), v))
            .collect())
    }

    /// Refuses an exported detector trained on other categories.
    pub fn check_categories(&self, path: &Path, categories: &[Category]) -> Result<()> {
        if categories == self.val_gt.categories.as_slice() {
            return Ok(());
        }
        let names = |c: &[Category]| {
            c.iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        Err(Error::invalid(
            path,
            "categories",
            format!(
                "[{}] differ from this run's data [{}]",
                names(categories),
                names(&self.val_gt.categories)
            ),
        ))
    }
}
