//! densekd: knowledge distillation for object detection and semantic segmentation on burn.
//!
//! The modules follow the data flow: [`data`] (datasets, readers, transforms, loading) →
//! [`ops`] (boxes, matching, losses shared by detectors) → [`eval`] (COCO and mIoU evaluation,
//! exact to the reference tools). Model, distiller and trainer modules build on these.

pub mod backend;
pub mod data;
pub mod error;
pub mod eval;
pub mod loss;
pub mod model;
pub mod ops;

pub use error::{Error, Result};
