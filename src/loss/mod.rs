//! Training losses built on the shared ops.

pub mod detr;
