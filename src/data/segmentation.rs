//! Segmentation samples and batches, from image + label-map folders or the synthetic set.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use image::RgbImage;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::data::images::{list_images, load_rgb, read_size};
use crate::data::labelmap::{read_label_map, LabelMap};
use crate::data::loader::Source;
use crate::data::synth::{self, Split, SynthConfig};
use crate::data::transforms::{
    hflip_image, hflip_label, normalize, random_scale_crop, rotate, transpose_image,
    transpose_label, vflip_image, vflip_label, Photometric, IMAGENET_MEAN, IMAGENET_STD,
};
use crate::error::{Error, Result};

/// Segmentation augmentation (training); `None` in a source means evaluate at full size.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegAugment {
    /// Random scale factor range.
    pub scale_range: (f64, f64),
    /// Crop `(width, height)`.
    pub crop: (u32, u32),
    /// Probability of a horizontal flip.
    pub hflip_prob: f64,
    /// Probability of a vertical flip (for data without an up direction, e.g. top-down views).
    #[serde(default)]
    pub vflip_prob: f64,
    /// Probability of swapping rows and columns before scaling and cropping; with both flips at
    /// 0.5 every rotation by a multiple of 90° and every mirror is equally likely.
    #[serde(default)]
    pub transpose_prob: f64,
    /// Probability of a rotation by a uniform angle in ±`rotate_degrees`, after cropping and
    /// flipping; the uncovered corners are ignored by the loss.
    #[serde(default)]
    pub rotate_prob: f64,
    /// Largest rotation angle in degrees.
    #[serde(default)]
    pub rotate_degrees: f64,
    /// Random brightness, contrast, saturation and hue, applied last; absent: none.
    #[serde(default)]
    pub photometric: Option<Photometric>,
}

impl SegAugment {
    /// Checks the scale range, the crop and the flip probability, naming the key.
    pub fn validate(&self) -> Result<()> {
        let (lo, hi) = self.scale_range;
        if !(lo.is_finite() && hi.is_finite() && lo > 0.0 && lo <= hi) {
            return Err(Error::config(
                "data.seg_augment.scale_range",
                format!("[{lo}, {hi}] is not a range of positive scales"),
            ));
        }
        if self.crop.0 == 0 || self.crop.1 == 0 {
            return Err(Error::config(
                "data.seg_augment.crop",
                "width and height must be positive",
            ));
        }
        for (key, p) in [
            ("hflip_prob", self.hflip_prob),
            ("vflip_prob", self.vflip_prob),
            ("transpose_prob", self.transpose_prob),
            ("rotate_prob", self.rotate_prob),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(Error::config(
                    format!("data.seg_augment.{key}"),
                    format!("must be in [0, 1], got {p}"),
                ));
            }
        }
        if !(0.0..=180.0).contains(&self.rotate_degrees) {
            return Err(Error::config(
                "data.seg_augment.rotate_degrees",
                format!("must be in [0, 180], got {}", self.rotate_degrees),
            ));
        }
        if let Some(p) = &self.photometric {
            p.validate("data.seg_augment.photometric")?;
        }
        Ok(())
    }
}

/// One image and its label map.
#[derive(Debug, Clone)]
pub struct SegSample {
    /// The image's name (file stem, or the synthetic index), for messages and outputs.
    pub name: String,
    /// The image.
    pub image: RgbImage,
    /// Its class map, the same size.
    pub label: LabelMap,
}

/// Applies `aug` (if any) to an image/label pair.
fn augment<R: Rng>(
    name: String,
    image: RgbImage,
    label: LabelMap,
    aug: Option<&SegAugment>,
    ignore_index: u8,
    rng: &mut R,
) -> SegSample {
    let Some(aug) = aug else {
        return SegSample { name, image, label };
    };
    // Each option draws only when enabled, so configs without it keep their random stream.
    let draw = |p: f64, rng: &mut R| p > 0.0 && rng.random_bool(p.min(1.0));
    let (image, label) = if draw(aug.transpose_prob, rng) {
        (transpose_image(&image), transpose_label(&label))
    } else {
        (image, label)
    };
    let (mut image, mut label) =
        random_scale_crop(&image, &label, aug.scale_range, aug.crop, ignore_index, rng);
    if draw(aug.hflip_prob, rng) {
        image = hflip_image(&image);
        hflip_label(&mut label);
    }
    if draw(aug.vflip_prob, rng) {
        image = vflip_image(&image);
        vflip_label(&mut label);
    }
    if draw(aug.rotate_prob, rng) {
        let degrees = if aug.rotate_degrees > 0.0 {
            rng.random_range(-aug.rotate_degrees..=aug.rotate_degrees)
        } else {
            0.0
        };
        (image, label) = rotate(&image, &label, degrees, ignore_index);
    }
    if let Some(p) = &aug.photometric {
        image = p.draw(rng).apply(&image);
    }
    SegSample { name, image, label }
}

/// Images and label maps from two folders, paired by file stem.
pub struct LabelMapFolder {
    /// `(image, label map)` paths.
    pub pairs: Vec<(PathBuf, PathBuf)>,
    /// Number of classes; ground-truth labels ≥ this (other than the ignore index) are an error.
    pub num_classes: usize,
    /// The ignore label.
    pub ignore_index: u8,
    /// Training augmentation, or `None` for evaluation.
    pub augment: Option<SegAugment>,
}

impl LabelMapFolder {
    /// Pairs every image in `images` with the label map of the same stem in `labels` (after
    /// stripping `suffixes.0` from image stems and `suffixes.1` from label stems); an image
    /// without a label map is an error naming it.
    pub fn new(
        images: &Path,
        labels: &Path,
        suffixes: (&str, &str),
        num_classes: usize,
        ignore_index: u8,
        augment: Option<SegAugment>,
    ) -> Result<Self> {
        let key = |p: &Path, suffix: &str| {
            let stem = p.file_stem().unwrap_or_default().to_string_lossy();
            stem.strip_suffix(suffix).unwrap_or(&stem).to_string()
        };
        let mut by_stem = BTreeMap::new();
        for p in list_images(labels)? {
            by_stem.insert(key(&p, suffixes.1), p);
        }
        let mut pairs = Vec::new();
        for img in list_images(images)? {
            let stem = key(&img, suffixes.0);
            let label = by_stem.remove(&stem).ok_or_else(|| {
                Error::invalid(
                    &img,
                    "label map",
                    format!("no label map with this stem in {}", labels.display()),
                )
            })?;
            // Headers only: a missing, undecodable or mismatched file fails now, not mid-epoch.
            let size = read_size(&img)?;
            let label_size = read_size(&label)?;
            if size != label_size {
                return Err(Error::invalid(
                    &label,
                    "size",
                    format!(
                        "{}x{} but its image {} is {}x{}",
                        label_size.0,
                        label_size.1,
                        img.display(),
                        size.0,
                        size.1
                    ),
                ));
            }
            pairs.push((img, label));
        }
        if pairs.is_empty() {
            return Err(Error::invalid(images, "files", "no images found"));
        }
        Ok(LabelMapFolder {
            pairs,
            num_classes,
            ignore_index,
            augment,
        })
    }
}

impl Source for LabelMapFolder {
    type Item = SegSample;

    fn len(&self) -> usize {
        self.pairs.len()
    }

    fn get(&self, index: usize, rng: &mut ChaCha8Rng) -> Result<SegSample> {
        let (img_path, label_path) = &self.pairs[index];
        let image = load_rgb(img_path)?;
        let label = read_label_map(label_path)?;
        if (label.width, label.height) != image.dimensions() {
            return Err(Error::invalid(
                label_path,
                "size",
                format!(
                    "{}x{} but the image {} is {}x{}",
                    label.width,
                    label.height,
                    img_path.display(),
                    image.width(),
                    image.height()
                ),
            ));
        }
        if let Some(i) = label
            .data
            .iter()
            .position(|&l| l != self.ignore_index && l as usize >= self.num_classes)
        {
            return Err(Error::invalid(
                label_path,
                format!(
                    "pixel ({}, {})",
                    i % label.width as usize,
                    i / label.width as usize
                ),
                format!(
                    "label {} is out of range for {} classes (ignore index {})",
                    label.data[i], self.num_classes, self.ignore_index
                ),
            ));
        }
        let name = img_path
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        Ok(augment(
            name,
            image,
            label,
            self.augment.as_ref(),
            self.ignore_index,
            rng,
        ))
    }
}

/// The built-in synthetic dataset's semantic maps, generated in memory.
pub struct SynthSegSource {
    /// Generator settings.
    pub config: SynthConfig,
    /// Which split.
    pub split: Split,
    /// Number of images.
    pub len: usize,
    /// Training augmentation, or `None` for evaluation.
    pub augment: Option<SegAugment>,
}

impl Source for SynthSegSource {
    type Item = SegSample;

    fn len(&self) -> usize {
        self.len
    }

    fn get(&self, index: usize, rng: &mut ChaCha8Rng) -> Result<SegSample> {
        let s = synth::generate(&self.config, self.split, index);
        let label = LabelMap {
            width: s.label.width(),
            height: s.label.height(),
            data: s.label.into_raw(),
        };
        Ok(augment(
            format!("{index:06}"),
            s.image,
            label,
            self.augment.as_ref(),
            synth::IGNORE_INDEX,
            rng,
        ))
    }
}

/// Either segmentation source, so one loader type serves both.
pub enum SegSource {
    /// Image and label-map folders.
    Folder(LabelMapFolder),
    /// The built-in synthetic label maps.
    Synth(SynthSegSource),
}

impl Source for SegSource {
    type Item = SegSample;

    fn len(&self) -> usize {
        match self {
            SegSource::Folder(s) => s.len(),
            SegSource::Synth(s) => s.len(),
        }
    }

    fn get(&self, index: usize, rng: &mut ChaCha8Rng) -> Result<SegSample> {
        match self {
            SegSource::Folder(s) => s.get(index, rng),
            SegSource::Synth(s) => s.get(index, rng),
        }
    }
}

/// A padded segmentation batch in host memory.
#[derive(Debug, Clone)]
pub struct SegBatch {
    /// Image names, in batch order.
    pub names: Vec<String>,
    /// Each image's `(width, height)` before padding.
    pub sizes: Vec<(u32, u32)>,
    /// Normalised pixels `[N, 3, H, W]`, zero in the padding.
    pub images: Vec<f32>,
    /// Labels `[N, H, W]`, the ignore index in the padding.
    pub labels: Vec<u8>,
    /// `[N, 3, H, W]`.
    pub shape: [usize; 4],
}

/// Pads samples bottom-right to a common size (images with 0, labels with `ignore_index`).
pub fn collate_segmentation(samples: Vec<SegSample>, ignore_index: u8) -> Result<SegBatch> {
    if samples.is_empty() {
        return Err(Error::config("batch", "cannot collate an empty batch"));
    }
    let h = samples.iter().map(|s| s.image.height()).max().unwrap_or(1) as usize;
    let w = samples.iter().map(|s| s.image.width()).max().unwrap_or(1) as usize;
    let n = samples.len();
    let mut images = vec![0f32; n * 3 * h * w];
    let mut labels = vec![ignore_index; n * h * w];
    for (i, s) in samples.iter().enumerate() {
        let (sw, sh) = (s.image.width() as usize, s.image.height() as usize);
        let planes = normalize(&s.image, IMAGENET_MEAN, IMAGENET_STD);
        for y in 0..sh {
            for c in 0..3 {
                let dst = ((i * 3 + c) * h + y) * w;
                images[dst..dst + sw].copy_from_slice(&planes[(c * sh + y) * sw..][..sw]);
            }
            let dst = (i * h + y) * w;
            labels[dst..dst + sw].copy_from_slice(&s.label.data[y * sw..][..sw]);
        }
    }
    Ok(SegBatch {
        names: samples.iter().map(|s| s.name.clone()).collect(),
        sizes: samples.iter().map(|s| s.image.dimensions()).collect(),
        images,
        labels,
        shape: [n, 3, h, w],
    })
}

impl SegBatch {
    /// Splits the batch into at most `parts` shards of consecutive images.
    pub fn split(self, parts: usize) -> Vec<SegBatch> {
        let [n, c, h, w] = self.shape;
        let per = n.div_ceil(parts.max(1)).max(1);
        if per >= n {
            return vec![self];
        }
        (0..n)
            .step_by(per)
            .map(|start| {
                let end = (start + per).min(n);
                SegBatch {
                    names: self.names[start..end].to_vec(),
                    sizes: self.sizes[start..end].to_vec(),
                    images: self.images[start * c * h * w..end * c * h * w].to_vec(),
                    labels: self.labels[start * h * w..end * h * w].to_vec(),
                    shape: [end - start, c, h, w],
                }
            })
            .collect()
    }

    /// Labelled (not ignored) pixels.
    pub fn labelled_pixels(&self, ignore_index: u8) -> usize {
        self.labels.iter().filter(|&&l| l != ignore_index).count()
    }

    /// The images as a `[N, 3, H, W]` tensor.
    pub fn images_tensor<B: Backend>(&self, device: &B::Device) -> Tensor<B, 4> {
        Tensor::from_data(TensorData::new(self.images.clone(), self.shape), device)
    }

    /// The labels as a `[N, H, W]` integer tensor.
    pub fn labels_tensor<B: Backend>(&self, device: &B::Device) -> Tensor<B, 3, Int> {
        let [n, _, h, w] = self.shape;
        let labels: Vec<i64> = self.labels.iter().map(|&l| l as i64).collect();
        Tensor::from_data(TensorData::new(labels, [n, h, w]), device)
    }
}
