//! FCOS as a training [`Task`]: detection data from the config (synthetic or COCO), the
//! training forward pass with its typed FPN and head outputs, the dense loss, COCO evaluation
//! on the validation split, and self-describing export.

use std::path::{Path, PathBuf};

use burn::tensor::backend::{AutodiffBackend, Backend};

use crate::data::coco::Category;
use crate::data::detection::{DetBatch, DetTarget};
use crate::data::loader::EpochIter;
use crate::error::Result;
use crate::eval::coco::Detection;
use crate::model::det_splits::{DetSplits, DETECTION_METRICS};
use crate::model::fcos::config::{FcosDecodeConfig, FcosSection};
use crate::model::fcos::export::{export_fcos, load_fcos, FcosInfo};
use crate::model::fcos::loss::{fcos_loss, positives, FcosLosses, ImageBoxes};
use crate::model::fcos::postprocess::postprocess;
use crate::model::fcos::targets::{level_shapes, Points};
use crate::model::fcos::{Fcos, FcosOutput, LevelOutput};
use crate::task::{
    backbone_and_rest, InnerModel, Losses, Metrics, ParamGroup, Stats, Task, TaskInputs,
};

/// FCOS's statistics: the 12 COCO stats, AP first (as every detector's).
pub const FCOS_METRICS: Metrics = DETECTION_METRICS;

/// FCOS training on the configured data.
pub struct FcosTask {
    section: FcosSection,
    seed: u64,
    backbone_weights: Option<PathBuf>,
    backbone_lr_mult: f64,
    data: DetSplits,
}

/// Each image's boxes in padded-image pixels.
pub fn image_boxes(targets: &[DetTarget]) -> Vec<ImageBoxes> {
    targets
        .iter()
        .map(|t| {
            let (w, h) = (t.size.0 as f64, t.size.1 as f64);
            ImageBoxes {
                boxes: t
                    .boxes
                    .iter()
                    .map(|b| {
                        let (cx, cy) = (b[0] as f64 * w, b[1] as f64 * h);
                        let (bw, bh) = (b[2] as f64 * w, b[3] as f64 * h);
                        [cx - bw / 2.0, cy - bh / 2.0, cx + bw / 2.0, cy + bh / 2.0]
                    })
                    .collect(),
                classes: t.classes.clone(),
            }
        })
        .collect()
}

/// The padded `(height, width)` of a batch's images.
pub fn padded_size(batch: &DetBatch) -> (usize, usize) {
    let [_, _, h, w] = batch.shape;
    (h, w)
}

/// Detections of `model` on `batch`, in original-image pixels.
pub fn detect<B: Backend>(
    model: &Fcos<B>,
    strides: &[usize],
    decode: &FcosDecodeConfig,
    batch: &DetBatch,
) -> Vec<Vec<Detection>> {
    let out = model.forward(batch.images_tensor(&model.scales.device()));
    decode_levels(
        &out.levels,
        &batch.targets,
        padded_size(batch),
        strides,
        decode,
    )
}

/// Detections decoded from head outputs `levels` of the images of `targets`, padded to
/// `padded` (h, w), in original-image pixels.
pub fn decode_levels<B: Backend>(
    levels: &[LevelOutput<B>],
    targets: &[DetTarget],
    padded: (usize, usize),
    strides: &[usize],
    decode: &FcosDecodeConfig,
) -> Vec<Vec<Detection>> {
    let flat = LevelOutput::flatten(levels);
    let points = Points::new(padded, &flat.level_shapes, strides);
    let sizes: Vec<(u32, u32)> = targets.iter().map(|t| t.size).collect();
    let orig: Vec<(u32, u32)> = targets.iter().map(|t| t.orig_size).collect();
    postprocess(&flat, &points, &sizes, &orig, decode)
}

impl FcosTask {
    /// Opens the datasets, checking they agree with the model.
    pub fn new(inputs: &TaskInputs, section: &FcosSection) -> Result<Self> {
        Ok(FcosTask {
            data: DetSplits::open(inputs, section.model.num_classes, "fcos.model.num_classes")?,
            section: section.clone(),
            seed: inputs.seed,
            backbone_weights: inputs.backbone_weights.map(Path::to_path_buf),
            backbone_lr_mult: inputs.backbone_lr_mult,
        })
    }

    /// The categories of the data, in class order.
    pub fn categories(&self) -> &[Category] {
        self.data.categories()
    }

    /// The run's `[fcos]` section.
    pub fn section(&self) -> &FcosSection {
        &self.section
    }

    /// A freshly initialised model, with backbone weights if the config names them.
    pub fn init_model<B: Backend>(&self, device: &B::Device) -> Result<Fcos<B>> {
        B::seed(device, self.seed);
        let mut model = self.section.model.init::<B>(device)?;
        if let Some(spec) = &self.backbone_weights {
            model.backbone = model.backbone.load_pretrained(spec)?;
        }
        Ok(model)
    }

    /// What an exported model records about itself.
    pub fn info(&self) -> FcosInfo {
        FcosInfo {
            model: self.section.model.clone(),
            decode: self.section.eval.clone(),
            categories: self.data.categories().to_vec(),
            preprocess: self.data.preprocess.clone(),
            size_divisor: self.data.size_divisor,
        }
    }

    /// COCO statistics of the detections `detect` makes of each validation batch.
    pub fn evaluate_with(
        &self,
        detect: impl Fn(&DetBatch) -> Vec<Vec<Detection>> + Sync,
    ) -> Result<Stats> {
        self.data.evaluate(detect)
    }

    /// The unweighted loss terms of head outputs `levels` (the student's, or the head run on
    /// other maps of the same shapes) against `targets`, images padded to `padded` (h, w).
    pub fn loss_terms<B: Backend>(
        &self,
        levels: &[LevelOutput<B>],
        targets: &[DetTarget],
        padded: (usize, usize),
    ) -> FcosLosses<B> {
        let flat = LevelOutput::flatten(levels);
        let points = Points::new(padded, &flat.level_shapes, &self.section.model.strides);
        fcos_loss(&flat, &points, &image_boxes(targets), &self.section.loss)
    }

    /// The weighted total with its terms logged as `loss_cls`, `loss_box` and `loss_ctr`,
    /// each prefixed with `prefix`.
    pub fn losses<B: AutodiffBackend>(&self, terms: FcosLosses<B>, prefix: &str) -> Losses<B> {
        Losses {
            total: terms.weighted(&self.section.loss),
            terms: vec![
                (format!("{prefix}loss_cls"), terms.class),
                (format!("{prefix}loss_box"), terms.boxes),
                (format!("{prefix}loss_ctr"), terms.centerness),
            ],
        }
    }
}

impl<B: AutodiffBackend> Task<B> for FcosTask {
    type Model = Fcos<B>;
    type Batch = DetBatch;
    type Output = FcosOutput<B>;

    fn metrics(&self) -> Metrics {
        FCOS_METRICS
    }

    fn batches_per_epoch(&self) -> usize {
        self.data.train.batches_per_epoch()
    }

    fn train_batches(&self, epoch: usize, skip: usize) -> EpochIter<DetBatch> {
        self.data.train.epoch_from(epoch, skip)
    }

    fn forward(&self, model: &Fcos<B>, batch: &DetBatch) -> Result<FcosOutput<B>> {
        Ok(model.forward(batch.images_tensor(&model.scales.device())))
    }

    fn loss(&self, output: &FcosOutput<B>, batch: &DetBatch) -> Result<Losses<B>> {
        let terms = self.loss_terms(&output.levels, &batch.targets, padded_size(batch));
        Ok(self.losses(terms, ""))
    }

    fn split(&self, batch: DetBatch, parts: usize, seed: u64) -> Vec<DetBatch> {
        batch.split(parts, seed)
    }

    /// A shard's losses are normalised by its own positive points, so weighting it by them
    /// makes the weighted sum the whole batch's loss; a shard without any counts as one.
    fn shard_weight(&self, shard: &DetBatch) -> f64 {
        let size = padded_size(shard);
        let strides = &self.section.model.strides;
        let points = Points::new(size, &level_shapes(size, strides), strides);
        let radius = self.section.loss.center_sampling_radius;
        positives(&points, &image_boxes(&shard.targets), radius)
            .index
            .len()
            .max(1) as f64
    }

    fn param_groups(&self, model: &Fcos<B>, grads: &mut B::Gradients) -> Vec<ParamGroup> {
        backbone_and_rest(grads, &model.backbone, model, self.backbone_lr_mult)
    }

    fn evaluate(&self, model: &Fcos<B::InnerBackend>) -> Result<Stats> {
        let (strides, decode) = (&self.section.model.strides, &self.section.eval);
        self.evaluate_with(|batch| detect(model, strides, decode, batch))
    }

    fn export(&self, model: &Fcos<B::InnerBackend>, path: &Path) -> Result<()> {
        export_fcos(model, &self.info(), path)
    }

    fn load_export(&self, path: &Path) -> Result<InnerModel<B, Self>> {
        let (model, info) = load_fcos::<B::InnerBackend>(path, &Default::default())?;
        self.data.check_categories(path, &info.categories)?;
        Ok(model)
    }
}
