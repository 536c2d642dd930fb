//! COCO instances JSON: reading with validation, contiguous class indices, and writing.
//!
//! Category ids in COCO files are arbitrary (COCO itself uses 1..90 with gaps); models need
//! contiguous class indices `0..K`. [`CocoDataset`] maps ids to indices in ascending id order and
//! back, so predictions written with [`CocoDataset::category_id`] evaluate against the source file.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use hotcoco::{Annotation, Dataset, Segmentation};

use crate::error::{write_atomic, Error, Result};

mod json;

use json::{HasRecords, Records};

/// What to do with an annotation that cannot be used (degenerate or out-of-image box, unknown
/// image or category id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InvalidPolicy {
    /// Drop it and record a warning.
    #[default]
    Skip,
    /// Fail the load with an error naming the annotation and field.
    Reject,
}

/// A category with its original COCO id.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Category {
    /// The id used in the JSON file.
    pub id: u64,
    /// The human-readable name.
    pub name: String,
}

/// One usable annotation of an image.
#[derive(Debug, Clone)]
pub struct Object {
    /// The annotation id in the source file.
    pub ann_id: u64,
    /// Contiguous class index `0..K`.
    pub class: usize,
    /// Box `[x, y, w, h]` in pixels, clipped to the image.
    pub bbox: [f64; 4],
    /// The annotation's `area` (segment area), which COCO evaluation bins by.
    pub area: f64,
    /// Crowd region: ignored by matching, never a training target.
    pub iscrowd: bool,
    /// Polygon or RLE segmentation, when the file has one.
    pub segmentation: Option<Segmentation>,
}

/// One image record and its usable annotations.
#[derive(Debug, Clone)]
pub struct ImageEntry {
    /// The image id in the source file.
    pub id: u64,
    /// Path relative to the image root.
    pub file_name: String,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Valid annotations, in file order.
    pub objects: Vec<Object>,
}

/// A validated COCO instances file.
#[derive(Debug, Clone)]
pub struct CocoDataset {
    /// Where it was read from (or will be reported as).
    pub path: PathBuf,
    /// Categories sorted by id; the position is the class index.
    pub categories: Vec<Category>,
    /// Images in file order.
    pub images: Vec<ImageEntry>,
    /// What was skipped or repaired while loading, summarised: a count of skipped annotations
    /// with the first few named, and a count of clipped boxes.
    pub warnings: Vec<String>,
    /// Every unusable annotation (skipped, or kept by evaluation), one line each.
    pub skipped: Vec<String>,
}

/// How many of a skipped list are named in a warning.
const NAMED: usize = 5;

/// `items` for a one-line warning: all of them, or the first few.
pub(crate) fn first_few(items: &[String]) -> String {
    if items.len() <= NAMED {
        return items.join("; ");
    }
    format!("first {NAMED}: {}", items[..NAMED].join("; "))
}

impl CocoDataset {
    /// Reads and validates a COCO instances JSON file.
    pub fn load(path: &Path, policy: InvalidPolicy) -> Result<Self> {
        Self::from_dataset(path, read_dataset(path)?, policy)
    }

    /// Validates an already-parsed dataset; `path` is used in messages.
    pub fn from_dataset(path: &Path, dataset: Dataset, policy: InvalidPolicy) -> Result<Self> {
        // Nothing to train or evaluate on; pycocotools would report AP -1 without complaint.
        for (key, len) in [
            ("images", dataset.images.len()),
            ("categories", dataset.categories.len()),
        ] {
            if len == 0 {
                return Err(Error::invalid(
                    path,
                    key,
                    "empty; a COCO instances file needs at least one",
                ));
            }
        }
        let mut categories: Vec<Category> = Vec::with_capacity(dataset.categories.len());
        let mut seen = HashSet::new();
        for (i, c) in dataset.categories.iter().enumerate() {
            if !seen.insert(c.id) {
                return Err(Error::invalid(
                    path,
                    format!("categories[{i}].id"),
                    format!("duplicate category id {}", c.id),
                ));
            }
            categories.push(Category {
                id: c.id,
                name: c.name.clone(),
            });
        }
        categories.sort_by_key(|c| c.id);
        let class_of: HashMap<u64, usize> = categories
            .iter()
            .enumerate()
            .map(|(i, c)| (c.id, i))
            .collect();

        let mut images = Vec::with_capacity(dataset.images.len());
        let mut index_of = HashMap::with_capacity(dataset.images.len());
        for (i, img) in dataset.images.iter().enumerate() {
            if index_of.insert(img.id, i).is_some() {
                return Err(Error::invalid(
                    path,
                    format!("images[{i}].id"),
                    format!("duplicate image id {}", img.id),
                ));
            }
            if img.width == 0 || img.height == 0 {
                return Err(Error::invalid(
                    path,
                    format!("images[{i}]"),
                    format!(
                        "image id {} has width {} and height {}; both must be positive",
                        img.id, img.width, img.height
                    ),
                ));
            }
            images.push(ImageEntry {
                id: img.id,
                file_name: img.file_name.clone(),
                width: img.width,
                height: img.height,
                objects: Vec::new(),
            });
        }

        let mut skipped = Vec::new();
        let mut clipped = 0usize;
        for (i, ann) in dataset.annotations.iter().enumerate() {
            let field = |name: &str| format!("annotations[{i}].{name}");
            let problem = (|| {
                let Some(&img_idx) = index_of.get(&ann.image_id) else {
                    return Err((
                        field("image_id"),
                        format!("unknown image id {}", ann.image_id),
                    ));
                };
                let Some(&class) = class_of.get(&ann.category_id) else {
                    return Err((
                        field("category_id"),
                        format!("unknown category id {}", ann.category_id),
                    ));
                };
                let img = &images[img_idx];
                let Some(raw) = ann.bbox else {
                    return Err((field("bbox"), "missing".to_string()));
                };
                let bbox = clip_box(raw, img.width, img.height).map_err(|m| (field("bbox"), m))?;
                let area = ann.area.unwrap_or(raw[2] * raw[3]);
                if !area.is_finite() || area < 0.0 {
                    return Err((
                        field("area"),
                        format!("{area} is not a non-negative number"),
                    ));
                }
                Ok((img_idx, class, bbox, area, bbox != raw))
            })();
            match problem {
                Ok((img_idx, class, bbox, area, was_clipped)) => {
                    clipped += was_clipped as usize;
                    images[img_idx].objects.push(Object {
                        ann_id: ann.id,
                        class,
                        bbox,
                        area,
                        iscrowd: ann.iscrowd,
                        segmentation: ann.segmentation.clone(),
                    });
                }
                Err((field, message)) => {
                    let message = format!("{message} (annotation id {})", ann.id);
                    match policy {
                        InvalidPolicy::Reject => return Err(Error::invalid(path, field, message)),
                        InvalidPolicy::Skip => skipped.push(format!("{field}: {message}")),
                    }
                }
            }
        }
        let mut warnings = Vec::new();
        if !skipped.is_empty() {
            warnings.push(format!(
                "skipped {} of {} annotations: {}",
                skipped.len(),
                dataset.annotations.len(),
                first_few(&skipped)
            ));
        }
        if clipped > 0 {
            warnings.push(format!(
                "{clipped} box(es) extended past their image and were clipped to it"
            ));
        }
        Ok(CocoDataset {
            path: path.to_path_buf(),
            categories,
            images,
            warnings,
            skipped,
        })
    }

    /// Prints the load's warnings on stderr, each prefixed with the file.
    pub fn print_warnings(&self) {
        for w in &self.warnings {
            eprintln!("warning: {}: {w}", self.path.display());
        }
    }

    /// Number of classes `K`.
    pub fn num_classes(&self) -> usize {
        self.categories.len()
    }

    /// The class index of a COCO category id.
    pub fn class_of(&self, category_id: u64) -> Option<usize> {
        self.categories
            .binary_search_by_key(&category_id, |c| c.id)
            .ok()
    }

    /// The COCO category id of a class index.
    pub fn category_id(&self, class: usize) -> Option<u64> {
        self.categories.get(class).map(|c| c.id)
    }

    /// Class names in index order.
    pub fn class_names(&self) -> Vec<String> {
        self.categories.iter().map(|c| c.name.clone()).collect()
    }
}

/// Clips `[x, y, w, h]` to the image; errors if it is not finite, has no extent, or misses the
/// image entirely.
fn clip_box(b: [f64; 4], width: u32, height: u32) -> std::result::Result<[f64; 4], String> {
    if b.iter().any(|v| !v.is_finite()) {
        return Err(format!("{b:?} has a non-finite value"));
    }
    if b[2] <= 0.0 || b[3] <= 0.0 {
        return Err(format!("{b:?} has width or height <= 0"));
    }
    let x0 = b[0].max(0.0);
    let y0 = b[1].max(0.0);
    let x1 = (b[0] + b[2]).min(width as f64);
    let y1 = (b[1] + b[3]).min(height as f64);
    if x1 <= x0 || y1 <= y0 {
        return Err(format!("{b:?} lies outside the {width}x{height} image"));
    }
    if x0 == b[0] && y0 == b[1] && x1 == b[0] + b[2] && y1 == b[1] + b[3] {
        return Ok(b);
    }
    Ok([x0, y0, x1 - x0, y1 - y0])
}

/// A COCO instances file's top level. hotcoco's `Dataset` reads a missing list as an empty one,
/// which would make `{}` a valid file with no images; here a missing list is an error.
#[derive(serde::Deserialize)]
struct InstancesFile {
    info: Option<hotcoco::types::Info>,
    images: Option<Vec<hotcoco::Image>>,
    annotations: Option<Vec<Annotation>>,
    categories: Option<Vec<hotcoco::Category>>,
    #[serde(default)]
    licenses: Vec<hotcoco::types::License>,
}

impl HasRecords for InstancesFile {
    const RECORDS: Records = Records::Annotations;
    fn records(&mut self) -> &mut [Annotation] {
        self.annotations.as_deref_mut().unwrap_or_default()
    }
}

/// Parses a COCO instances file into hotcoco's types. Errors name the file and the field, e.g.
/// `annotations[17].bbox` and the annotation's id; a missing `images`, `annotations` or
/// `categories` list is an error; non-finite numbers in a record's bbox or area are read as such
/// (and skipped or rejected by [`CocoDataset::from_dataset`]), as Python's `json` reads them.
pub fn read_dataset(path: &Path) -> Result<Dataset> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let file: InstancesFile = json::parse(path, &bytes)?;
    let missing = |key: &str| {
        Error::invalid(
            path,
            key,
            "missing; a COCO instances file has images, annotations and categories lists",
        )
    };
    Ok(Dataset {
        info: file.info,
        images: file.images.ok_or_else(|| missing("images"))?,
        annotations: file.annotations.ok_or_else(|| missing("annotations"))?,
        categories: file.categories.ok_or_else(|| missing("categories"))?,
        licenses: file.licenses,
    })
}

/// Writes a COCO dataset (or results) as JSON, atomically.
pub fn write_json<T: serde::Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec(value).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    write_atomic(path, &bytes)
}

/// A results file written as an object: `{"annotations": [...]}`.
#[derive(serde::Deserialize)]
struct WrappedResults {
    annotations: Vec<Annotation>,
}

impl HasRecords for WrappedResults {
    const RECORDS: Records = Records::Annotations;
    fn records(&mut self) -> &mut [Annotation] {
        &mut self.annotations
    }
}

/// Reads a COCO results file: a JSON list of detections, or an object with `annotations`.
/// Errors name the record (`[17].score`); a missing or non-finite score or bbox is an error.
pub fn read_results(path: &Path) -> Result<Vec<Annotation>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    // Parse the shape the file starts with, so the error names the real field.
    let (anns, prefix) = match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => (
            json::parse::<WrappedResults>(path, &bytes)?.annotations,
            "annotations",
        ),
        _ => (json::parse::<Vec<Annotation>>(path, &bytes)?, ""),
    };
    for (i, a) in anns.iter().enumerate() {
        let field = |name: &str| format!("{prefix}[{i}].{name}");
        match a.score {
            Some(s) if s.is_finite() => {}
            Some(s) => {
                return Err(Error::invalid(
                    path,
                    field("score"),
                    format!("{s} is not finite"),
                ))
            }
            None => return Err(Error::invalid(path, field("score"), "missing")),
        }
        match a.bbox {
            Some(b) if b.iter().all(|v| v.is_finite()) => {}
            Some(b) => {
                return Err(Error::invalid(
                    path,
                    field("bbox"),
                    format!("{b:?} has a non-finite value"),
                ))
            }
            None => return Err(Error::invalid(path, field("bbox"), "missing")),
        }
    }
    Ok(anns)
}
