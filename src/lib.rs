//! densekd: knowledge distillation for object detection and semantic segmentation on burn.
//!
//! The modules follow the data flow: [`data`] (datasets, readers, transforms, loading) →
//! [`ops`] (boxes, matching, losses shared by detectors) → [`eval`] (COCO and mIoU evaluation,
//! exact to the reference tools) → [`model`] (backbones, detectors, weight import) →
//! [`distill`] (methods as plug-ins of the loop) → [`loss`] → [`train`] (the task-independent
//! loop, configs, checkpoints) → [`experiment`] (variant × seed grids and their reports) →
//! [`predict`] and [`viz`] (plots, drawn detections).

pub mod backend;
pub mod data;
pub mod distill;
pub mod error;
pub mod eval;
pub mod experiment;
pub mod loss;
pub mod model;
pub mod ops;
pub mod predict;
pub mod train;
pub mod viz;

pub use error::{Error, Result};
