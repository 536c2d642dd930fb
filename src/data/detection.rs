//! Detection samples and batches, from COCO files on disk or from the in-memory synthetic set.

use std::path::PathBuf;

use burn::tensor::{backend::Backend, Bool, Tensor, TensorData};
use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::data::coco::CocoDataset;
use crate::data::images::load_rgb;
use crate::data::loader::Source;
use crate::data::synth::{self, Split, SynthConfig};
use crate::data::transforms::{
    hflip_boxes, hflip_image, normalize, resize_keep_aspect, scale_boxes, IMAGENET_MEAN,
    IMAGENET_STD,
};
use crate::error::{Error, Result};

/// Detection augmentation: resize keeping aspect, then an optional horizontal flip.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetAugment {
    /// Target length of the shorter side.
    pub shorter: u32,
    /// Upper bound of the longer side.
    pub max_size: u32,
    /// Probability of a horizontal flip (0 at evaluation).
    pub hflip_prob: f64,
}

impl DetAugment {
    /// Checks the sizes and the flip probability, naming the key.
    pub fn validate(&self) -> Result<()> {
        if self.shorter == 0 || self.max_size == 0 {
            return Err(Error::config(
                "data.augment",
                format!(
                    "shorter ({}) and max_size ({}) must be positive",
                    self.shorter, self.max_size
                ),
            ));
        }
        if !(0.0..=1.0).contains(&self.hflip_prob) {
            return Err(Error::config(
                "data.augment.hflip_prob",
                format!("must be in [0, 1], got {}", self.hflip_prob),
            ));
        }
        Ok(())
    }

    /// Evaluation preprocessing: the same resize, no flip.
    pub fn eval(&self) -> Self {
        DetAugment {
            hflip_prob: 0.0,
            ..self.clone()
        }
    }
}

/// One image with its targets, after augmentation.
#[derive(Debug, Clone)]
pub struct DetSample {
    /// The image id (COCO id, or the synthetic index).
    pub image_id: u64,
    /// The transformed image.
    pub image: RgbImage,
    /// Boxes `[x0, y0, x1, y1]` in transformed-image pixels (crowd regions excluded).
    pub boxes: Vec<[f32; 4]>,
    /// Class index of each box.
    pub classes: Vec<usize>,
    /// Transformed size / original size.
    pub scale: f64,
    /// Original `(width, height)`.
    pub orig_size: (u32, u32),
}

/// Resizes and maybe flips an image with its boxes.
fn augment_sample<R: Rng>(
    image_id: u64,
    image: &RgbImage,
    mut boxes: Vec<[f32; 4]>,
    classes: Vec<usize>,
    aug: &DetAugment,
    rng: &mut R,
) -> DetSample {
    let orig_size = image.dimensions();
    let (mut image, scale) = resize_keep_aspect(image, aug.shorter, aug.max_size);
    let (sx, sy) = (
        image.width() as f64 / orig_size.0 as f64,
        image.height() as f64 / orig_size.1 as f64,
    );
    scale_boxes(&mut boxes, sx, sy);
    if aug.hflip_prob > 0.0 && rng.random_bool(aug.hflip_prob.min(1.0)) {
        image = hflip_image(&image);
        hflip_boxes(&mut boxes, image.width());
    }
    DetSample {
        image_id,
        image,
        boxes,
        classes,
        scale,
        orig_size,
    }
}

/// Reads the header of every image `dataset` lists under `root`: a missing or undecodable file,
/// or one whose size differs from its record, is an error naming it before training starts
/// instead of when the loader first reaches it.
pub fn check_image_headers(dataset: &CocoDataset, root: &std::path::Path) -> Result<()> {
    for entry in &dataset.images {
        let path = root.join(&entry.file_name);
        let (width, height) = crate::data::images::read_size(&path)?;
        if (width, height) != (entry.width, entry.height) {
            return Err(Error::invalid(
                &path,
                "size",
                format!(
                    "{width}x{height} but {} says {}x{} (image id {})",
                    dataset.path.display(),
                    entry.width,
                    entry.height,
                    entry.id
                ),
            ));
        }
    }
    Ok(())
}

/// Images and boxes from a validated COCO file and an image folder.
#[derive(Clone)]
pub struct CocoSource {
    /// The annotations.
    pub dataset: CocoDataset,
    /// Folder that `file_name`s are relative to.
    pub image_root: PathBuf,
    /// Augmentation.
    pub augment: DetAugment,
}

impl Source for CocoSource {
    type Item = DetSample;

    fn len(&self) -> usize {
        self.dataset.images.len()
    }

    fn get(&self, index: usize, rng: &mut ChaCha8Rng) -> Result<DetSample> {
        let entry = &self.dataset.images[index];
        let path = self.image_root.join(&entry.file_name);
        let image = load_rgb(&path)?;
        if image.dimensions() != (entry.width, entry.height) {
            return Err(Error::invalid(
                &path,
                "size",
                format!(
                    "image is {}x{} but {} says {}x{} (image id {})",
                    image.width(),
                    image.height(),
                    self.dataset.path.display(),
                    entry.width,
                    entry.height,
                    entry.id
                ),
            ));
        }
        let (boxes, classes) = entry
            .objects
            .iter()
            .filter(|o| !o.iscrowd)
            .map(|o| {
                let [x, y, w, h] = o.bbox;
                (
                    [x as f32, y as f32, (x + w) as f32, (y + h) as f32],
                    o.class,
                )
            })
            .unzip();
        Ok(augment_sample(
            entry.id,
            &image,
            boxes,
            classes,
            &self.augment,
            rng,
        ))
    }
}

/// The built-in synthetic dataset, generated in memory on demand.
#[derive(Clone)]
pub struct SynthDetSource {
    /// Generator settings.
    pub config: SynthConfig,
    /// Which split.
    pub split: Split,
    /// Number of images.
    pub len: usize,
    /// Augmentation.
    pub augment: DetAugment,
}

impl Source for SynthDetSource {
    type Item = DetSample;

    fn len(&self) -> usize {
        self.len
    }

    fn get(&self, index: usize, rng: &mut ChaCha8Rng) -> Result<DetSample> {
        let s = synth::generate(&self.config, self.split, index);
        let (boxes, classes) = s
            .objects
            .iter()
            .map(|o| {
                let [x, y, w, h] = o.bbox;
                (
                    [x as f32, y as f32, (x + w) as f32, (y + h) as f32],
                    o.class,
                )
            })
            .unzip();
        Ok(augment_sample(
            crate::data::export::synth_image_id(index),
            &s.image,
            boxes,
            classes,
            &self.augment,
            rng,
        ))
    }
}

/// Targets of one image in a batch, in DETR's normalised format.
#[derive(Debug, Clone)]
pub struct DetTarget {
    /// The image id.
    pub image_id: u64,
    /// Boxes `[cx, cy, w, h]` relative to the unpadded transformed image (0..1).
    pub boxes: Vec<[f32; 4]>,
    /// Class index of each box.
    pub classes: Vec<usize>,
    /// Transformed (unpadded) `(width, height)`.
    pub size: (u32, u32),
    /// Original `(width, height)`, to map predictions back for evaluation.
    pub orig_size: (u32, u32),
}

/// A padded batch of images with a padding mask and per-image targets, in host memory.
#[derive(Debug, Clone)]
pub struct DetBatch {
    /// Normalised pixels `[N, 3, H, W]`, zero in the padding.
    pub images: Vec<f32>,
    /// `[N, H, W]`: true where the pixel is padding.
    pub padding: Vec<bool>,
    /// `[N, 3, H, W]`.
    pub shape: [usize; 4],
    /// One per image.
    pub targets: Vec<DetTarget>,
    /// Seed of the batch's training randomness (denoising noise), set by the trainer per step
    /// and shard.
    pub seed: u64,
}

/// Rounds `v` up to a multiple of `divisor`.
fn round_up(v: u32, divisor: u32) -> u32 {
    v.div_ceil(divisor.max(1)) * divisor.max(1)
}

/// Pads images bottom-right to a common size (a multiple of `size_divisor`) and normalises them.
pub fn collate_detection(samples: Vec<DetSample>, size_divisor: u32) -> Result<DetBatch> {
    if samples.is_empty() {
        return Err(Error::config("batch", "cannot collate an empty batch"));
    }
    let h = round_up(
        samples.iter().map(|s| s.image.height()).max().unwrap_or(1),
        size_divisor,
    ) as usize;
    let w = round_up(
        samples.iter().map(|s| s.image.width()).max().unwrap_or(1),
        size_divisor,
    ) as usize;
    let n = samples.len();
    let mut images = vec![0f32; n * 3 * h * w];
    let mut padding = vec![true; n * h * w];
    let mut targets = Vec::with_capacity(n);
    for (i, s) in samples.into_iter().enumerate() {
        let (sw, sh) = (s.image.width() as usize, s.image.height() as usize);
        let planes = normalize(&s.image, IMAGENET_MEAN, IMAGENET_STD);
        for c in 0..3 {
            for y in 0..sh {
                let dst = ((i * 3 + c) * h + y) * w;
                let src = (c * sh + y) * sw;
                images[dst..dst + sw].copy_from_slice(&planes[src..src + sw]);
            }
        }
        for y in 0..sh {
            let row = (i * h + y) * w;
            padding[row..row + sw].fill(false);
        }
        let boxes = s
            .boxes
            .iter()
            .map(|b| {
                [
                    (b[0] + b[2]) * 0.5 / sw as f32,
                    (b[1] + b[3]) * 0.5 / sh as f32,
                    (b[2] - b[0]) / sw as f32,
                    (b[3] - b[1]) / sh as f32,
                ]
            })
            .collect();
        targets.push(DetTarget {
            image_id: s.image_id,
            boxes,
            classes: s.classes,
            size: (sw as u32, sh as u32),
            orig_size: s.orig_size,
        });
    }
    Ok(DetBatch {
        images,
        padding,
        shape: [n, 3, h, w],
        targets,
        seed: 0,
    })
}

impl DetBatch {
    /// Splits the batch into at most `parts` shards of consecutive images for data-parallel
    /// replicas, each with a seed derived from `seed`.
    pub fn split(self, parts: usize, seed: u64) -> Vec<DetBatch> {
        let [n, c, h, w] = self.shape;
        let per = n.div_ceil(parts.max(1)).max(1);
        if per >= n {
            // One shard: the batch itself, without copying its pixels.
            let seed = crate::data::derive_seed(&[seed, 0]);
            return vec![DetBatch { seed, ..self }];
        }
        self.targets
            .chunks(per)
            .enumerate()
            .map(|(k, targets)| {
                let (start, m) = (k * per, targets.len());
                DetBatch {
                    images: self.images[start * c * h * w..(start + m) * c * h * w].to_vec(),
                    padding: self.padding[start * h * w..(start + m) * h * w].to_vec(),
                    shape: [m, c, h, w],
                    targets: targets.to_vec(),
                    seed: crate::data::derive_seed(&[seed, k as u64]),
                }
            })
            .collect()
    }

    /// The images as a `[N, 3, H, W]` tensor.
    pub fn images_tensor<B: Backend>(&self, device: &B::Device) -> Tensor<B, 4> {
        Tensor::from_data(TensorData::new(self.images.clone(), self.shape), device)
    }

    /// The padding mask as a `[N, H, W]` bool tensor (true = padding).
    pub fn padding_tensor<B: Backend>(&self, device: &B::Device) -> Tensor<B, 3, Bool> {
        let [n, _, h, w] = self.shape;
        Tensor::from_data(TensorData::new(self.padding.clone(), [n, h, w]), device)
    }
}

/// Either detection source, so one loader type serves both.
#[derive(Clone)]
pub enum DetSource {
    /// A COCO dataset on disk.
    Coco(CocoSource),
    /// The built-in synthetic shapes.
    Synth(SynthDetSource),
}

impl Source for DetSource {
    type Item = DetSample;

    fn len(&self) -> usize {
        match self {
            DetSource::Coco(s) => s.len(),
            DetSource::Synth(s) => s.len(),
        }
    }

    fn get(&self, index: usize, rng: &mut ChaCha8Rng) -> Result<DetSample> {
        match self {
            DetSource::Coco(s) => s.get(index, rng),
            DetSource::Synth(s) => s.get(index, rng),
        }
    }
}

/// Evaluation preprocessing of a single image without annotations (prediction).
pub fn prepare_image(image_id: u64, image: &RgbImage, augment: &DetAugment) -> DetSample {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    augment_sample(
        image_id,
        image,
        Vec::new(),
        Vec::new(),
        &augment.eval(),
        &mut rng,
    )
}
