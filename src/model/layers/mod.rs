//! Layers shared by the model kinds: convolution, normalisation, MLP, attention (global and
//! deformable) and position encodings.

pub mod conv;
pub mod deformable;
pub mod mlp;
pub mod norm;
pub mod position;
pub mod transformer;
