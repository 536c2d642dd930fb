//! DETR as a training [`Task`]: data from the config (synthetic or COCO), the set loss, COCO
//! evaluation on the validation split, and self-describing `.safetensors` export.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use serde::{Deserialize, Serialize};

use crate::data::coco::{Category, CocoDataset, InvalidPolicy};
use crate::data::detection::{
    collate_detection, CocoSource, DetAugment, DetBatch, DetSource, SynthDetSource,
};
use crate::data::export::synth_coco;
use crate::data::loader::{EpochIter, Loader, LoaderConfig, Subset};
use crate::data::synth::Split;
use crate::error::{Error, Result};
use crate::eval::coco::{CocoEvaluator, STAT_KEYS};
use crate::loss::detr::detr_loss;
use crate::model::denoising::denoising_groups;
use crate::model::detr::{postprocess, Detr, DetrConfig};
use crate::model::weights::{load_native, load_pytorch, safetensors_metadata, save_native};
use crate::train::config::TrainConfig;
use crate::train::{Losses, MatchKeys, Stats, Task};

/// Metadata key of the exported model's description.
const META_KEY: &str = "densekd.detector";

/// What predicting with an exported model needs besides its tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetectorInfo {
    /// The architecture.
    pub model: DetrConfig,
    /// Categories in class order (COCO ids and names).
    pub categories: Vec<Category>,
    /// Evaluation preprocessing.
    pub preprocess: DetAugment,
    /// Padding multiple of batched images.
    pub size_divisor: u32,
}

/// DETR training on the configured data.
pub struct DetrTask {
    config: TrainConfig,
    train: Loader<DetSource, DetBatch>,
    val: Loader<DetSource, DetBatch>,
    /// The first training images without augmentation, for matching instability.
    stability: Option<Loader<Subset<DetSource>, DetBatch>>,
    val_gt: CocoDataset,
    val_index: HashMap<u64, usize>,
}

impl DetrTask {
    /// Opens the datasets of `config`, checking they agree with the model.
    pub fn new(config: &TrainConfig) -> Result<Self> {
        let d = &config.data;
        let eval_aug = d.augment.eval();
        let (train_source, stability_source, val_source, val_gt) = match &d.coco {
            Some(c) => {
                let train = CocoDataset::load(&c.train_json, InvalidPolicy::Skip)?;
                let val = CocoDataset::load(&c.val_json, InvalidPolicy::Skip)?;
                if train.categories != val.categories {
                    return Err(Error::invalid(
                        &c.val_json,
                        "categories",
                        format!("differ from those of {}", c.train_json.display()),
                    ));
                }
                (
                    DetSource::Coco(CocoSource {
                        dataset: train.clone(),
                        image_root: c.train_images.clone(),
                        augment: d.augment.clone(),
                    }),
                    DetSource::Coco(CocoSource {
                        dataset: train,
                        image_root: c.train_images.clone(),
                        augment: eval_aug.clone(),
                    }),
                    DetSource::Coco(CocoSource {
                        dataset: val.clone(),
                        image_root: c.val_images.clone(),
                        augment: eval_aug,
                    }),
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
                    source(Split::Train, s.train_images, d.augment.clone()),
                    source(Split::Train, s.train_images, eval_aug.clone()),
                    source(Split::Val, s.val_images, eval_aug),
                    gt,
                )
            }
        };
        if val_gt.num_classes() != config.model.num_classes {
            return Err(Error::config(
                "model.num_classes",
                format!(
                    "is {} but the data has {} categories",
                    config.model.num_classes,
                    val_gt.num_classes()
                ),
            ));
        }
        let divisor = d.size_divisor;
        let loader = |source, shuffle, seed| {
            Loader::<DetSource, DetBatch>::new(
                source,
                move |samples| collate_detection(samples, divisor),
                LoaderConfig {
                    batch_size: config.optim.batch_size,
                    shuffle,
                    drop_last: shuffle,
                    workers: d.workers,
                    prefetch: 2,
                    seed,
                },
            )
        };
        let val_index = val_gt
            .images
            .iter()
            .enumerate()
            .map(|(i, e)| (e.id, i))
            .collect();
        Ok(DetrTask {
            train: loader(train_source, true, config.seed)?,
            val: loader(val_source, false, config.seed)?,
            stability: match config.eval.instability_images {
                0 => None,
                n => Some(Loader::new(
                    Subset {
                        inner: stability_source,
                        len: n,
                    },
                    move |samples| collate_detection(samples, divisor),
                    LoaderConfig {
                        batch_size: config.optim.batch_size,
                        shuffle: false,
                        drop_last: false,
                        workers: 0,
                        prefetch: 2,
                        seed: config.seed,
                    },
                )?),
            },
            val_gt,
            val_index,
            config: config.clone(),
        })
    }

    /// The categories of the data, in class order.
    pub fn categories(&self) -> &[Category] {
        &self.val_gt.categories
    }

    /// A freshly initialised model, with backbone weights if the config names them.
    pub fn init_model<B: Backend>(&self, device: &B::Device) -> Result<Detr<B>> {
        B::seed(device, self.config.seed);
        let mut model = self.config.model.init::<B>(device)?;
        if let Some(spec) = &self.config.backbone_weights {
            let path =
                &crate::model::pretrained::resolve(spec, &crate::model::pretrained::cache_dir())?;
            let options = crate::model::weights::LoadOptions {
                key_rules: model.backbone.torchvision_key_rules(),
                top_level_key: None,
                allow_partial: false,
            };
            let (backbone, report) = load_pytorch(model.backbone, path, &options)?;
            eprintln!(
                "{}: {} backbone tensors loaded, {} unused",
                path.display(),
                report.applied,
                report.unused.len()
            );
            model.backbone = backbone;
        }
        Ok(model)
    }

    /// The run's config.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// What an exported model records about itself.
    pub fn info(&self) -> DetectorInfo {
        DetectorInfo {
            model: self.config.model.clone(),
            categories: self.val_gt.categories.clone(),
            preprocess: self.config.data.augment.eval(),
            size_divisor: self.config.data.size_divisor,
        }
    }
}

impl<B: AutodiffBackend> Task<B> for DetrTask {
    type Model = Detr<B>;
    type Batch = DetBatch;

    fn batches_per_epoch(&self) -> usize {
        self.train.batches_per_epoch()
    }

    fn train_batches(&self, epoch: usize, skip: usize) -> EpochIter<DetBatch> {
        self.train.epoch_from(epoch, skip)
    }

    fn loss(&self, model: &Detr<B>, batch: &DetBatch) -> Result<Losses<B>> {
        let device = model.query_content.device();
        let images = batch.images_tensor::<B>(&device);
        let (w, targets) = (&self.config.loss, &batch.targets);
        let dn = denoising_groups(model, targets, batch.seed);
        let extra = dn.as_ref().map(|dn| (dn.queries.clone(), dn.group_sizes()));
        let (out, dn_layers) =
            model.forward_with_extra(images, &batch.padding, model.groups, extra);
        let dn_loss = dn.and_then(|dn| dn.loss(&dn_layers, targets, w));
        let l = detr_loss(&out, targets, w, &self.config.matcher)?;
        let mut losses = Losses {
            total: l.total,
            terms: vec![
                ("loss_class".into(), l.class),
                ("loss_bbox".into(), l.bbox),
                ("loss_giou".into(), l.giou),
            ],
        };
        if let Some(dn_loss) = dn_loss {
            losses.total = losses.total + dn_loss.clone().mul_scalar(model.denoising.weight);
            losses.terms.push(("loss_dn".into(), dn_loss));
        }
        Ok(losses)
    }

    fn split(&self, batch: DetBatch, parts: usize, seed: u64) -> Vec<(DetBatch, f64)> {
        batch.split(parts, seed)
    }

    fn backbone_grads(&self, model: &Detr<B>, grads: &mut B::Gradients) -> GradientsParams {
        GradientsParams::from_module(grads, &model.backbone)
    }

    fn evaluate(&self, model: &Detr<B::InnerBackend>) -> Result<Stats> {
        let stats = evaluate_detr(
            model,
            &self.val,
            &self.val_gt,
            &self.val_index,
            self.config.eval.max_dets,
        )?;
        Ok(STAT_KEYS
            .iter()
            .zip(stats.to_array())
            .map(|(k, v)| ((*k).to_string(), v))
            .collect())
    }

    fn export(&self, model: &Detr<B::InnerBackend>, path: &Path) -> Result<()> {
        export_detr(model, &self.info(), path)
    }

    fn match_keys(&self, model: &Detr<B::InnerBackend>) -> Result<Option<MatchKeys>> {
        let Some(loader) = &self.stability else {
            return Ok(None);
        };
        let device = model.query_content.device();
        let mut keys = MatchKeys::default();
        for batch in loader.epoch(0) {
            let batch = batch?;
            let out = model.forward(
                batch.images_tensor::<B::InnerBackend>(&device),
                &batch.padding,
                1,
            );
            let last = out.last();
            let matches = crate::loss::detr::match_batch(
                &last.logits,
                &last.boxes,
                &batch.targets,
                &self.config.matcher,
            )?;
            let q = model.num_queries;
            // Query identity: the encoder token for two-stage models, the slot otherwise.
            let tokens = out
                .proposals
                .as_ref()
                .and_then(|p| Some((p.selected.clone()?, p.prediction.logits.dims()[1])));
            for (i, (m, t)) in matches.iter().zip(&batch.targets).enumerate() {
                let (slots, of_query): (usize, Box<dyn Fn(usize) -> usize>) = match &tokens {
                    Some((selected, n)) => {
                        let sel = selected[i * q..(i + 1) * q].to_vec();
                        (*n, Box::new(move |query| sel[query]))
                    }
                    None => (q, Box::new(|query| query)),
                };
                let mut image = vec![-1i64; slots];
                for &(query, target) in &m.pairs {
                    image[of_query(query)] = target as i64;
                }
                keys.keys.extend(image);
                keys.targets += t.boxes.len();
            }
        }
        Ok(Some(keys))
    }
}

/// COCO statistics of `model` on the batches of `loader` against `gt`.
fn evaluate_detr<B: Backend>(
    model: &Detr<B>,
    loader: &Loader<DetSource, DetBatch>,
    gt: &CocoDataset,
    index: &HashMap<u64, usize>,
    max_dets: usize,
) -> Result<crate::eval::coco::CocoStats> {
    let device = model.query_content.device();
    let mut evaluator = CocoEvaluator::new(gt)?;
    for batch in loader.epoch(0) {
        let batch = batch?;
        let out = model.forward(batch.images_tensor::<B>(&device), &batch.padding, 1);
        let sizes: Vec<(u32, u32)> = batch.targets.iter().map(|t| t.orig_size).collect();
        let dets = postprocess(out.last(), model.num_queries, &sizes, max_dets);
        for (target, d) in batch.targets.iter().zip(&dets) {
            let entry = index
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
    }
    evaluator.finish()
}

/// Writes `model` with its description as `.safetensors`.
pub fn export_detr<B: Backend>(model: &Detr<B>, info: &DetectorInfo, path: &Path) -> Result<()> {
    let json = serde_json::to_string(info).map_err(|e| Error::config("export", e.to_string()))?;
    save_native(model, path, &[(META_KEY, json)])
}

/// Loads a model exported by training, with its description.
pub fn load_detector<B: Backend>(
    path: &Path,
    device: &B::Device,
) -> Result<(Detr<B>, DetectorInfo)> {
    let meta = safetensors_metadata(path)?;
    let json = meta.get(META_KEY).ok_or_else(|| {
        Error::invalid(
            path,
            META_KEY,
            "missing: not a densekd detector export (use the run's model.safetensors)",
        )
    })?;
    let info: DetectorInfo =
        serde_json::from_str(json).map_err(|e| Error::invalid(path, META_KEY, e.to_string()))?;
    let model = load_native(info.model.init::<B>(device)?, path)?;
    Ok((model, info))
}

/// A run folder's resolved config.
pub fn resolved_config_path(run_dir: &Path) -> PathBuf {
    run_dir.join("config.toml")
}
