//! DeepLabV3 as a training [`Task`]: label maps from the config (synthetic or folders), the
//! pixel loss of the main and auxiliary heads, mIoU on the validation split (mmseg's exact
//! convention), and self-describing export.

use std::path::{Path, PathBuf};

use burn::tensor::activation::softmax;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;

use crate::backend::map_ordered;
use crate::data::loader::{EpochIter, Loader, LoaderConfig};
use crate::data::segmentation::{
    collate_segmentation, LabelMapFolder, SegBatch, SegSource, SynthSegSource,
};
use crate::data::synth::{self, Split};
use crate::error::{Error, Result};
use crate::eval::seg::SegEvaluator;
use crate::model::deeplabv3::config::{DeepLabV3Section, TestFlips};
use crate::model::deeplabv3::export::{export_deeplabv3, load_segmenter, SegmenterInfo};
use crate::model::deeplabv3::{DeepLabV3, SegOutput};
use crate::model::layers::resize::{resize, Sampling};
use crate::ops::pixel::PixelLabels;
use crate::task::{
    backbone_and_rest, InnerModel, Losses, Metrics, ParamGroup, Stats, Task, TaskInputs,
};

/// Segmentation statistics: mIoU, aAcc, then `IoU.<class>` per class.
pub const SEG_METRICS: Metrics = Metrics {
    headline: "mIoU",
    reported: &["mIoU", "aAcc"],
    // Predicting background everywhere scores about 1 / classes.
    chance: 0.1,
};

/// Class names of the built-in data's label maps: background, then the shapes.
pub fn synthetic_class_names() -> Vec<String> {
    std::iter::once("background")
        .chain(synth::CLASS_NAMES)
        .map(String::from)
        .collect()
}

/// DeepLabV3 training on the configured data.
pub struct SegTask {
    section: DeepLabV3Section,
    seed: u64,
    backbone_weights: Option<PathBuf>,
    backbone_lr_mult: f64,
    class_names: Vec<String>,
    ignore_index: u8,
    train: Loader<SegSource, SegBatch>,
    val: Loader<SegSource, SegBatch>,
}

impl SegTask {
    /// Opens the datasets, checking they agree with the model.
    pub fn new(inputs: &TaskInputs, section: &DeepLabV3Section) -> Result<Self> {
        let d = inputs.data;
        let augment = d.seg_augment()?.clone();
        let (train, val, class_names, ignore_index) = match &d.segmentation {
            Some(f) => {
                let k = f.class_names.len();
                let suffixes = (f.image_suffix.as_str(), f.label_suffix.as_str());
                let folder = |images: &Path, labels: &Path, aug| {
                    LabelMapFolder::new(images, labels, suffixes, k, f.ignore_index, aug)
                        .map(SegSource::Folder)
                };
                (
                    folder(&f.train_images, &f.train_labels, Some(augment))?,
                    folder(&f.val_images, &f.val_labels, None)?,
                    f.class_names.clone(),
                    f.ignore_index,
                )
            }
            None => {
                let s = &d.synthetic;
                let source = |split, len, augment| {
                    SegSource::Synth(SynthSegSource {
                        config: s.generator.clone(),
                        split,
                        len,
                        augment,
                    })
                };
                (
                    source(Split::Train, s.train_images, Some(augment)),
                    source(Split::Val, s.val_images, None),
                    synthetic_class_names(),
                    synth::IGNORE_INDEX,
                )
            }
        };
        if class_names.len() != section.model.num_classes {
            return Err(Error::config(
                "deeplabv3.model.num_classes",
                format!(
                    "is {} but the data has {} classes ({})",
                    section.model.num_classes,
                    class_names.len(),
                    class_names.join(", ")
                ),
            ));
        }
        let loader = |source, shuffle| {
            Loader::<SegSource, SegBatch>::new(
                source,
                move |samples| collate_segmentation(samples, ignore_index),
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
        Ok(SegTask {
            train: loader(train, true)?,
            val: loader(val, false)?,
            section: section.clone(),
            seed: inputs.seed,
            backbone_weights: inputs.backbone_weights.map(Path::to_path_buf),
            backbone_lr_mult: inputs.backbone_lr_mult,
            class_names,
            ignore_index,
        })
    }

    /// The run's `[deeplabv3]` section.
    pub fn section(&self) -> &DeepLabV3Section {
        &self.section
    }

    /// The label of unlabelled pixels.
    pub fn ignore_index(&self) -> u8 {
        self.ignore_index
    }

    /// A freshly initialised model, with backbone weights if the config names them.
    pub fn init_model<B: Backend>(&self, device: &B::Device) -> Result<DeepLabV3<B>> {
        B::seed(device, self.seed);
        let mut model = self.section.model.init::<B>(device)?;
        if let Some(spec) = &self.backbone_weights {
            model.backbone = model.backbone.load_pretrained(spec)?;
        }
        Ok(model)
    }

    /// What an exported model records about itself.
    pub fn info(&self) -> SegmenterInfo {
        SegmenterInfo {
            model: self.section.model.clone(),
            class_names: self.class_names.clone(),
            ignore_index: self.ignore_index,
            test: self.section.test,
        }
    }

    /// A batch's labels on `device`.
    pub fn labels<B: Backend>(&self, batch: &SegBatch, device: &B::Device) -> PixelLabels<B> {
        let [n, _, h, w] = batch.shape;
        PixelLabels::new(batch.labels.clone(), [n, h, w], self.ignore_index, device)
    }

    /// The supervised loss of a forward pass against `labels`: `loss_ce` of the main head and
    /// `loss_aux` of the auxiliary head.
    pub fn pixel_losses<B: AutodiffBackend>(
        &self,
        output: &SegOutput<B>,
        labels: &PixelLabels<B>,
    ) -> Losses<B> {
        let loss = &self.section.loss;
        let ce = loss.head_loss(output.logits.clone(), labels);
        let mut losses = Losses::single("loss_ce", ce);
        if let Some(aux) = &output.aux_logits {
            losses.add(
                "loss_aux",
                loss.head_loss(aux.clone(), labels),
                loss.aux_weight,
            );
        }
        losses
    }
}

impl<B: AutodiffBackend> Task<B> for SegTask {
    type Model = DeepLabV3<B>;
    type Batch = SegBatch;
    type Output = SegOutput<B>;

    fn metrics(&self) -> Metrics {
        SEG_METRICS
    }

    fn batches_per_epoch(&self) -> usize {
        self.train.batches_per_epoch()
    }

    fn train_batches(&self, epoch: usize, skip: usize) -> EpochIter<SegBatch> {
        self.train.epoch_from(epoch, skip)
    }

    fn forward(&self, model: &DeepLabV3<B>, batch: &SegBatch) -> Result<SegOutput<B>> {
        let device = model.classifier.out.weight.device();
        Ok(model.forward(batch.images_tensor::<B>(&device)))
    }

    fn loss(&self, output: &SegOutput<B>, batch: &SegBatch) -> Result<Losses<B>> {
        let labels = self.labels::<B>(batch, &output.logits.device());
        Ok(self.pixel_losses(output, &labels))
    }

    fn split(&self, batch: SegBatch, parts: usize, _seed: u64) -> Vec<SegBatch> {
        batch.split(parts)
    }

    /// A shard's loss is a mean over its labelled pixels, so its share of them makes the
    /// weighted sum the whole batch's mean (exact without class weights or OHEM).
    fn shard_weight(&self, shard: &SegBatch) -> f64 {
        shard.labelled_pixels(self.ignore_index).max(1) as f64
    }

    fn param_groups(&self, model: &DeepLabV3<B>, grads: &mut B::Gradients) -> Vec<ParamGroup> {
        backbone_and_rest(grads, &model.backbone, model, self.backbone_lr_mult)
    }

    fn evaluate(&self, model: &DeepLabV3<B::InnerBackend>) -> Result<Stats> {
        let mut evaluator = SegEvaluator::new(self.class_names.len(), self.ignore_index);
        let flips = self.section.test.flips;
        map_ordered(
            self.val.epoch(0),
            |batch| predict_labels(model, batch, flips),
            |batch, pred| {
                let [n, _, h, w] = batch.shape;
                for i in 0..n {
                    let range = i * h * w..(i + 1) * h * w;
                    evaluator.update(
                        &batch.labels[range.clone()],
                        &pred[range],
                        &batch.names[i],
                    )?;
                }
                Ok(())
            },
        )?;
        let stats = evaluator.stats();
        let nan = |v: Option<f64>| v.unwrap_or(f64::NAN);
        let mut out = vec![
            ("mIoU".to_string(), nan(stats.mIoU)),
            ("aAcc".to_string(), nan(stats.aAcc)),
        ];
        out.extend(
            self.class_names
                .iter()
                .zip(&stats.IoU)
                .map(|(name, iou)| (format!("IoU.{name}"), nan(*iou))),
        );
        Ok(out)
    }

    fn export(&self, model: &DeepLabV3<B::InnerBackend>, path: &Path) -> Result<()> {
        export_deeplabv3(model, &self.info(), path)
    }

    fn load_export(&self, path: &Path) -> Result<InnerModel<B, Self>> {
        let (model, info) = load_segmenter::<B::InnerBackend>(path, &Default::default())?;
        if info.class_names != self.class_names {
            return Err(Error::invalid(
                path,
                "class_names",
                format!(
                    "[{}] differ from this run's data [{}]",
                    info.class_names.join(", "),
                    self.class_names.join(", ")
                ),
            ));
        }
        Ok(model)
    }
}

/// Per-pixel argmax labels `[N, H, W]` (row-major) of a batch, at the batch's resolution, from
/// the class probabilities averaged over `flips`' views.
pub fn predict_labels<B: Backend>(
    model: &DeepLabV3<B>,
    batch: &SegBatch,
    flips: TestFlips,
) -> Vec<u8> {
    let device = model.classifier.out.weight.device();
    let [_, _, h, w] = batch.shape;
    let images = batch.images_tensor::<B>(&device);
    let scores = if flips == TestFlips::None {
        resize(model.forward(images).logits, [h, w], Sampling::Bilinear)
    } else {
        let views = flips.views().iter().map(|&(transpose, flip_x, flip_y)| {
            let (mut x, size) = if transpose {
                (images.clone().swap_dims(2, 3), [w, h])
            } else {
                (images.clone(), [h, w])
            };
            // Each step is its own inverse: the probabilities go back in reverse order.
            x = flip(flip(x, flip_x, 3), flip_y, 2);
            let logits = resize(model.forward(x).logits, size, Sampling::Bilinear);
            let p = flip(flip(softmax(logits, 1), flip_y, 2), flip_x, 3);
            if transpose {
                p.swap_dims(2, 3)
            } else {
                p
            }
        });
        views
            .reduce(|a, b| a + b)
            .expect("every flip setting has a view")
    };
    scores
        .argmax(1)
        .into_data()
        .convert::<i64>()
        .to_vec::<i64>()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c as u8)
        .collect()
}

/// `x` mirrored along `axis` if `yes`.
fn flip<B: Backend>(x: Tensor<B, 4>, yes: bool, axis: isize) -> Tensor<B, 4> {
    if yes {
        x.flip([axis])
    } else {
        x
    }
}
