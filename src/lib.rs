//! densekd: knowledge distillation for object detection and semantic segmentation on burn.
//!
//! Dependencies run one way, leaves first:
//! [`data`] (datasets, readers, transforms, the loader) and [`ops`] (boxes, matching, shared
//! losses) → [`eval`] (COCO and mIoU, exact to the reference tools) → [`task`] (what a model
//! kind provides to training, and the types the loop and the distillers share) → [`model`]
//! (shared layers, backbones, weight import, and each model kind in its own folder with its
//! outputs, loss and `Task`, e.g. [`model::detr`]) → [`distill`] (the `Distiller` trait, EMA
//! and frozen teachers, OD-DETR) → [`train`] (config, the loop, checkpoints; only `train::config` and
//! `train::run` name the model kinds, to read and build a config's task) → [`experiment`] (variant × seed grids and
//! reports); [`launch`] starts `train` as several processes; [`predict`] and [`viz`] use the
//! exported models and the logs.

pub mod backend;
pub mod bench;
pub mod data;
pub mod digest;
pub mod distill;
pub mod error;
pub mod eval;
pub mod experiment;
pub mod launch;
pub mod model;
pub mod ops;
pub mod predict;
pub mod task;
pub mod train;
pub mod viz;

pub use error::{Error, Result};
