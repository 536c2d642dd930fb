//! Bench workloads that are not networks: COCO evaluation against pycocotools and Hungarian
//! matching against SciPy, on deterministic random data, with the two sides' results compared.

use std::path::Path;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use crate::bench::{Reference, Sampler};
use crate::data::coco::write_json;
use crate::error::Result;
use crate::eval::coco::evaluate_files;
use crate::ops::matcher::linear_sum_assignment;

/// Images of the `eval-coco` workload.
const COCO_IMAGES: usize = 5000;
/// Detections per image.
const COCO_DETECTIONS: usize = 100;
/// Categories.
const COCO_CATEGORIES: u64 = 80;
/// Rows and columns of the `lsap-300x50` cost matrices (DETR's queries × boxes).
const LSAP_SHAPE: (usize, usize) = (300, 50);
/// Solves per timed sample (one solve takes well under a millisecond).
const LSAP_REPEATS: usize = 200;

/// Writes a ground truth of [`COCO_IMAGES`] images (1–15 boxes each, COCO-like sizes, some
/// crowd) and [`COCO_DETECTIONS`] detections per image (jittered true boxes and random ones)
/// into `dir`; returns both paths.
pub fn coco_files(dir: &Path) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let (mut images, mut annotations, mut detections) = (Vec::new(), Vec::new(), Vec::new());
    let mut ann_id = 1u64;
    for image_id in 1..=COCO_IMAGES as u64 {
        let (w, h) = (640.0, 480.0);
        images.push(
            json!({"id": image_id, "file_name": format!("{image_id}.jpg"),
                           "width": 640, "height": 480}),
        );
        let n = rng.random_range(1..=15);
        let mut truths = Vec::new();
        for _ in 0..n {
            let bw: f64 = rng.random_range(4.0..300.0);
            let bh: f64 = rng.random_range(4.0..300.0);
            let x = rng.random_range(0.0..w - bw);
            let y = rng.random_range(0.0..h - bh);
            let category = rng.random_range(1..=COCO_CATEGORIES);
            annotations.push(
                json!({"id": ann_id, "image_id": image_id, "category_id": category,
                "bbox": [x, y, bw, bh], "area": bw * bh,
                "iscrowd": u8::from(rng.random_bool(0.02))}),
            );
            ann_id += 1;
            truths.push(([x, y, bw, bh], category));
        }
        for k in 0..COCO_DETECTIONS {
            let (bbox, category) = if k < 3 * truths.len() {
                let ([x, y, bw, bh], c) = truths[k % truths.len()];
                let mut j = |v: f64, s: f64| v + s * rng.random_range(-0.15..0.15);
                (
                    [j(x, bw), j(y, bh), j(bw, bw).max(1.0), j(bh, bh).max(1.0)],
                    c,
                )
            } else {
                let bw: f64 = rng.random_range(4.0..300.0);
                let bh: f64 = rng.random_range(4.0..300.0);
                let x = rng.random_range(0.0..w - bw);
                let y = rng.random_range(0.0..h - bh);
                ([x, y, bw, bh], rng.random_range(1..=COCO_CATEGORIES))
            };
            detections.push(json!({"image_id": image_id, "category_id": category,
                "bbox": bbox, "score": rng.random_range(0.0..1.0)}));
        }
    }
    let categories: Vec<Value> = (1..=COCO_CATEGORIES)
        .map(|id| json!({"id": id, "name": format!("c{id}")}))
        .collect();
    let gt = dir.join("bench_gt.json");
    let dt = dir.join("bench_dt.json");
    write_json(
        &gt,
        &json!({"images": images, "annotations": annotations, "categories": categories}),
    )?;
    write_json(&dt, &detections)?;
    Ok((gt, dt))
}

/// `eval-coco`: `densekd eval coco`'s work (read both files, check, evaluate) against
/// pycocotools' load, evaluate, accumulate and summarize. Returns both sides' seconds per
/// sample and whether every sample's 12 stats agree to 1e-12.
pub fn eval_coco(
    dir: &Path,
    steps: usize,
    reference: &mut Reference,
    sampler: &mut Sampler,
) -> Result<bool> {
    let (gt, dt) = coco_files(dir)?;
    let mut agree = true;
    for _ in 0..steps {
        sampler.begin(reference.pid());
        let start = Instant::now();
        let (ours, _) = evaluate_files(&gt, &dt, crate::data::coco::InvalidPolicy::Skip)?;
        let ours_s = start.elapsed().as_secs_f64();
        let (theirs_s, stats) = reference.cocoeval(&gt, &dt)?;
        agree &= ours
            .to_array()
            .iter()
            .zip(&stats)
            .all(|(a, b)| (a - b).abs() <= 1e-12);
        sampler.end(reference.pid(), ours_s, Some(theirs_s));
    }
    Ok(agree)
}

/// `lsap-300x50`: [`linear_sum_assignment`] against SciPy's on one random cost matrix, timed
/// per solve over [`LSAP_REPEATS`] solves. Returns whether the optimal costs agree to 1e-9.
pub fn lsap(steps: usize, reference: &mut Reference, sampler: &mut Sampler) -> Result<bool> {
    let (rows, cols) = LSAP_SHAPE;
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let cost: Vec<f64> = (0..rows * cols)
        .map(|_| rng.random_range(0.0..10.0))
        .collect();
    let matrix: Vec<&[f64]> = cost.chunks(cols).collect();
    let mut agree = true;
    for _ in 0..steps {
        sampler.begin(reference.pid());
        let start = Instant::now();
        let mut total = 0.0;
        for _ in 0..LSAP_REPEATS {
            total = linear_sum_assignment(&cost, rows, cols)?.total_cost;
        }
        let ours_s = start.elapsed().as_secs_f64() / LSAP_REPEATS as f64;
        let (theirs_s, theirs_total) = reference.lsap(&matrix, LSAP_REPEATS)?;
        agree &= (total - theirs_total).abs() <= 1e-9 * total.abs().max(1.0);
        sampler.end(reference.pid(), ours_s, Some(theirs_s));
    }
    Ok(agree)
}
