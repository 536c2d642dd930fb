//! Layers shared by the model kinds: activation, convolution, normalisation, MLP, attention
//! (global and deformable), position encodings and resizing.

pub mod activation;
pub mod conv;
pub mod deformable;
pub mod fused_norm;
pub mod mlp;
pub mod norm;
pub mod position;
pub mod resize;
pub mod sampling;
pub mod transformer;

use crate::error::{Error, Result};
use norm::NormKind;

/// Refuses `replicas > 1` for a model with trainable batch norm or dropout, naming the key:
/// replicas would fold their batch statistics into the shared running averages, and draw
/// dropout masks from flex's global generator, in thread-timing order, so runs would stop being
/// reproducible.
pub fn check_replicas(
    replicas: usize,
    norms: &[(&str, NormKind)],
    dropouts: &[(&str, f64)],
) -> Result<()> {
    if replicas <= 1 {
        return Ok(());
    }
    if let Some((key, _)) = norms.iter().find(|(_, n)| *n == NormKind::Batch) {
        return Err(Error::config(
            "optim.replicas",
            format!(
                "{replicas} replicas need {key} = \"frozen\" or \"group\" (trainable batch \
                 norm's running statistics would depend on thread timing)"
            ),
        ));
    }
    if let Some((key, p)) = dropouts.iter().find(|(_, p)| *p > 0.0) {
        return Err(Error::config(
            "optim.replicas",
            format!(
                "{replicas} replicas need {key} = 0 (dropout masks drawn concurrently are not \
                 reproducible), got dropout {p}"
            ),
        ));
    }
    Ok(())
}
