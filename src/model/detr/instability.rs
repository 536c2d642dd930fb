//! DETR's matching instability (DN-DETR): on a fixed subset of training images, which target
//! each query is matched to, compared between consecutive epochs.

use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::backend::map_ordered;
use crate::data::detection::{DetBatch, DetSource};
use crate::data::loader::{Loader, Subset};
use crate::error::{Error, Result};
use crate::model::detr::loss::match_batch;
use crate::model::detr::Detr;
use crate::ops::matcher::MatchCosts;
use crate::task::{number, Diagnostic};

/// A model's matching on the instability subset: per image and query identity, the matched
/// target index or −1 (DN-DETR's `V_n[i]`), and the number of targets.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MatchKeys {
    /// Matched target per (image, query), −1 for unmatched.
    pub keys: Vec<i64>,
    /// Targets in the subset.
    pub targets: usize,
}

/// The final layer's matching of `model` on every image of `loader`.
pub fn match_keys<B: Backend>(
    model: &Detr<B>,
    loader: &Loader<Subset<DetSource>, DetBatch>,
    costs: &MatchCosts,
) -> Result<MatchKeys> {
    let device = model.query_content.device();
    let batch_keys = |batch: &DetBatch| -> Result<MatchKeys> {
        let out = model.forward(batch.images_tensor::<B>(&device), &batch.padding, 1);
        let last = out.last();
        let matches = match_batch(&last.logits, &last.boxes, &batch.targets, costs)?;
        let q = model.num_queries;
        // Query identity: the encoder token for two-stage models, the slot otherwise.
        let tokens = out
            .proposals
            .as_ref()
            .and_then(|p| Some((p.selected.clone()?, p.prediction.logits.dims()[1])));
        let mut keys = MatchKeys::default();
        for (i, (m, t)) in matches.iter().zip(&batch.targets).enumerate() {
            let (slots, of_query): (usize, Box<dyn Fn(usize) -> usize>) = match &tokens {
                Some((selected, n)) => {
                    let sel = selected[i * q..(i + 1) * q].to_vec();
                    (*n, Box::new(move |query| sel[query]))
                }
                None => (q, Box::new(|query| query)),
            };
            let mut image = vec![-1i64; slots];
            for &(query, target) in &m.pairs {
                image[of_query(query)] = target as i64;
            }
            keys.keys.extend(image);
            keys.targets += t.boxes.len();
        }
        Ok(keys)
    };
    let mut keys = MatchKeys::default();
    map_ordered(loader.epoch(0), batch_keys, |_, batch| {
        let batch = batch?;
        keys.keys.extend(batch.keys);
        keys.targets += batch.targets;
        Ok(())
    })?;
    Ok(keys)
}

fn parse(v: &Value) -> Result<MatchKeys> {
    MatchKeys::deserialize(v)
        .map_err(|e| Error::config("checkpoint probes", format!("not DETR match keys: {e}")))
}

/// The `instability` line between two epochs' match keys: how many (image, query) matches
/// changed, and that count per target; `None` when the subsets differ.
pub fn instability(previous: &Value, current: &Value) -> Result<Option<Diagnostic>> {
    let (before, now) = (parse(previous)?, parse(current)?);
    if before.keys.len() != now.keys.len() {
        return Ok(None);
    }
    let changed = before
        .keys
        .iter()
        .zip(&now.keys)
        .filter(|(a, b)| a != b)
        .count();
    Ok(Some(Diagnostic {
        kind: "instability",
        fields: vec![
            ("changed".to_string(), Value::from(changed)),
            (
                "fraction".to_string(),
                number(changed as f64 / now.targets.max(1) as f64),
            ),
        ],
    }))
}
