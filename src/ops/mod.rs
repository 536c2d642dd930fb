//! Operations shared by detectors: box formats and overlaps, Hungarian matching, losses.

pub mod boxes;
pub mod losses;
pub mod matcher;
pub mod nms;
pub mod pixel;
