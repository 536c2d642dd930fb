//! DETR as a training [`Task`]: data from the config (synthetic or COCO), the training forward
//! pass with room for a distiller's extra query groups, the set loss with denoising, COCO
//! evaluation on the validation split, matching instability, and self-describing export.

use std::path::{Path, PathBuf};

use burn::tensor::backend::{AutodiffBackend, Backend};
use serde_json::Value;

use crate::data::coco::Category;
use crate::data::detection::{DetBatch, DetSource, DetTarget};
use crate::data::loader::{EpochIter, Loader, Subset};
use crate::error::{Error, Result};
use crate::model::det_splits::{DetSplits, DETECTION_METRICS};
use crate::model::detr::config::DetrSection;
use crate::model::detr::denoising::{denoising_groups, DenoisingGroups};
use crate::model::detr::export::{export_detr, load_detector, DetectorInfo};
use crate::model::detr::instability::{instability, match_keys};
use crate::model::detr::loss::{detr_loss_with, GroupLoss};
use crate::model::detr::{postprocess, Detr, DetrOutput, InitialQueries, LayerPrediction};
use crate::task::{
    backbone_and_rest, Diagnostic, InnerModel, Losses, Metrics, ParamGroup, Stats, Task, TaskInputs,
};

/// DETR's statistics: the 12 COCO stats, AP first.
pub const DETR_METRICS: Metrics = DETECTION_METRICS;

/// DETR training on the configured data.
pub struct DetrTask {
    section: DetrSection,
    seed: u64,
    backbone_weights: Option<PathBuf>,
    backbone_lr_mult: f64,
    data: DetSplits,
    /// The first training images without augmentation, for matching instability.
    stability: Option<Loader<Subset<DetSource>, DetBatch>>,
}

/// A DETR training forward pass: the main query groups, the extra groups a distiller asked
/// for, and the denoising groups, decoded together and masked from each other.
pub struct DetrForward<B: Backend> {
    /// The main groups (what inference runs, plus training-only groups).
    pub output: DetrOutput<B>,
    /// Per extra group, in the order asked for, its per-layer predictions.
    pub extra: Vec<Vec<LayerPrediction<B>>>,
    /// The denoising groups and their per-layer predictions, when denoising is on.
    pub denoising: Option<(DenoisingGroups<B>, Vec<LayerPrediction<B>>)>,
}

impl DetrTask {
    /// Opens the datasets, checking they agree with the model.
    pub fn new(inputs: &TaskInputs, section: &DetrSection) -> Result<Self> {
        let data = DetSplits::open(inputs, section.model.num_classes, "detr.model.num_classes")?;
        let stability = match section.eval.instability_images {
            0 => None,
            n => Some(data.train_subset(n, inputs.batch_size, inputs.seed)?),
        };
        Ok(DetrTask {
            data,
            stability,
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

    /// The run's `[detr]` section.
    pub fn section(&self) -> &DetrSection {
        &self.section
    }

    /// A freshly initialised model, with backbone weights if the config names them.
    pub fn init_model<B: Backend>(&self, device: &B::Device) -> Result<Detr<B>> {
        B::seed(device, self.seed);
        let mut model = self.section.model.init::<B>(device)?;
        if let Some(spec) = &self.backbone_weights {
            model.backbone = model.backbone.load_pretrained(spec)?;
        }
        Ok(model)
    }

    /// What an exported model records about itself.
    pub fn info(&self) -> DetectorInfo {
        DetectorInfo {
            model: self.section.model.clone(),
            categories: self.data.categories().to_vec(),
            preprocess: self.data.preprocess.clone(),
            size_divisor: self.data.size_divisor,
        }
    }

    /// The training forward pass with `extra` query groups (one group each) decoded after the
    /// main groups and before the denoising groups.
    pub fn forward_with<B: AutodiffBackend>(
        &self,
        model: &Detr<B>,
        batch: &DetBatch,
        extra: Vec<InitialQueries<B>>,
    ) -> DetrForward<B> {
        let device = model.query_content.device();
        let images = batch.images_tensor::<B>(&device);
        let dn = denoising_groups(model, &batch.targets, batch.seed);
        let mut groups: Vec<(InitialQueries<B>, Vec<usize>)> = extra
            .into_iter()
            .map(|q| (q.clone(), vec![q.len()]))
            .collect();
        if let Some(dn) = &dn {
            groups.push((dn.queries.clone(), dn.group_sizes()));
        }
        let (output, mut layers) =
            model.forward_with_extra(images, &batch.padding, model.groups, groups);
        let denoising = match dn {
            Some(dn) => layers.pop().map(|l| (dn, l)),
            None => None,
        };
        DetrForward {
            output,
            extra: layers,
            denoising,
        }
    }

    /// The weighted set loss of the main groups over every layer (plus proposals), logged as
    /// `loss_class`, `loss_bbox` and `loss_giou`; `group_loss` replaces a main group's set loss.
    pub fn main_losses<B: AutodiffBackend>(
        &self,
        forward: &DetrForward<B>,
        targets: &[DetTarget],
        group_loss: Option<&GroupLoss<'_, B>>,
    ) -> Result<Losses<B>> {
        let (w, costs) = (&self.section.loss, &self.section.matcher);
        let l = detr_loss_with(&forward.output, targets, w, costs, group_loss)?;
        Ok(Losses {
            total: l.weighted(w),
            terms: vec![
                ("loss_class".into(), l.class),
                ("loss_bbox".into(), l.bbox),
                ("loss_giou".into(), l.giou),
            ],
        })
    }

    /// Adds the denoising loss (`loss_dn`), when the forward pass had denoising groups.
    pub fn add_denoising<B: AutodiffBackend>(
        &self,
        losses: &mut Losses<B>,
        forward: &DetrForward<B>,
        targets: &[DetTarget],
    ) {
        let Some((dn, layers)) = &forward.denoising else {
            return;
        };
        if let Some(dn_loss) = dn.loss(layers, targets, &self.section.loss) {
            losses.add("loss_dn", dn_loss, self.section.model.denoising.weight);
        }
    }
}

impl<B: AutodiffBackend> Task<B> for DetrTask {
    type Model = Detr<B>;
    type Batch = DetBatch;
    type Output = DetrForward<B>;

    fn metrics(&self) -> Metrics {
        DETR_METRICS
    }

    fn batches_per_epoch(&self) -> usize {
        self.data.train.batches_per_epoch()
    }

    fn train_batches(&self, epoch: usize, skip: usize) -> EpochIter<DetBatch> {
        self.data.train.epoch_from(epoch, skip)
    }

    fn forward(&self, model: &Detr<B>, batch: &DetBatch) -> Result<DetrForward<B>> {
        Ok(self.forward_with(model, batch, Vec::new()))
    }

    fn loss(&self, forward: &DetrForward<B>, batch: &DetBatch) -> Result<Losses<B>> {
        let mut losses = self.main_losses(forward, &batch.targets, None)?;
        self.add_denoising(&mut losses, forward, &batch.targets);
        Ok(losses)
    }

    fn split(&self, batch: DetBatch, parts: usize, seed: u64) -> Vec<DetBatch> {
        batch.split(parts, seed)
    }

    /// A shard's losses are normalised by its own boxes, so weighting it by its share of the
    /// boxes makes the weighted sum the whole batch's loss (Deformable-DETR all-reduces the box
    /// count for the same reason); a shard without boxes counts as one box.
    fn shard_weight(&self, shard: &DetBatch) -> f64 {
        shard
            .targets
            .iter()
            .map(|t| t.boxes.len())
            .sum::<usize>()
            .max(1) as f64
    }

    fn param_groups(&self, model: &Detr<B>, grads: &mut B::Gradients) -> Vec<ParamGroup> {
        backbone_and_rest(grads, &model.backbone, model, self.backbone_lr_mult)
    }

    fn evaluate(&self, model: &Detr<B::InnerBackend>) -> Result<Stats> {
        let device = model.query_content.device();
        let max_dets = self.section.eval.max_dets;
        self.data.evaluate(|batch| {
            let out = model.forward(batch.images_tensor(&device), &batch.padding, 1);
            let sizes: Vec<(u32, u32)> = batch.targets.iter().map(|t| t.orig_size).collect();
            postprocess(out.last(), model.num_queries, &sizes, max_dets)
        })
    }

    fn export(&self, model: &Detr<B::InnerBackend>, path: &Path) -> Result<()> {
        export_detr(model, &self.info(), path)
    }

    fn load_export(&self, path: &Path) -> Result<InnerModel<B, Self>> {
        let (model, info) = load_detector::<B::InnerBackend>(path, &Default::default())?;
        self.data.check_categories(path, &info.categories)?;
        Ok(model)
    }

    fn probe(&self, model: &Detr<B::InnerBackend>) -> Result<Option<Value>> {
        let Some(loader) = &self.stability else {
            return Ok(None);
        };
        let keys = match_keys(model, loader, &self.section.matcher)?;
        serde_json::to_value(keys)
            .map(Some)
            .map_err(|e| Error::config("instability", e.to_string()))
    }

    fn diagnose(&self, previous: &Value, current: &Value) -> Result<Option<Diagnostic>> {
        instability(previous, current)
    }
}
