//! Networks: backbones with torchvision-compatible parameter names, and PyTorch weight import.

pub mod backbone;
pub mod classify;
pub mod conv;
pub mod deformable;
pub mod denoising;
pub mod detr;
pub mod norm;
pub mod position;
pub mod pretrained;
pub mod transformer;
pub mod weights;
