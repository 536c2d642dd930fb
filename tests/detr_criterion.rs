//! DETR matching and set losses against PyTorch (tests/fixtures/make_detr_fixtures.py, following
//! Deformable-DETR's matcher and SetCriterion): matches, loss values and gradients.

use burn::tensor::{Tensor, TensorData};
use densekd::backend::Training;
use densekd::data::detection::DetTarget;
use densekd::model::detr::loss::{centre_assignment, match_batch, set_losses, SetLossWeights};
use densekd::ops::matcher::MatchCosts;
use serde_json::Value;

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

fn close(got: f32, want: f32, tol: f32, what: &str) {
    assert!(
        (got - want).abs() <= tol * want.abs().max(1.0),
        "{what}: {got} vs {want}"
    );
}

#[test]
fn matcher_and_losses_match_pytorch() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/detr_criterion.json"
    );
    let fixture: Value = serde_json::from_slice(&std::fs::read(path).expect("read")).expect("json");
    let device = Default::default();
    for case in fixture["cases"].as_array().expect("cases") {
        let name = case["name"].as_str().expect("name");
        let shape: Vec<usize> = case["shape"]
            .as_array()
            .expect("shape")
            .iter()
            .map(|d| d.as_u64().expect("dim") as usize)
            .collect();
        let (b, q, k) = (shape[0], shape[1], shape[2]);
        let logits = Tensor::<Training, 3>::from_data(
            TensorData::new(floats(&case["logits"]), [b, q, k]),
            &device,
        )
        .require_grad();
        let boxes = Tensor::<Training, 3>::from_data(
            TensorData::new(floats(&case["boxes"]), [b, q, 4]),
            &device,
        )
        .require_grad();
        let targets: Vec<DetTarget> = case["targets"]
            .as_array()
            .expect("targets")
            .iter()
            .enumerate()
            .map(|(i, t)| DetTarget {
                image_id: i as u64,
                classes: t["labels"]
                    .as_array()
                    .expect("labels")
                    .iter()
                    .map(|c| c.as_u64().expect("label") as usize)
                    .collect(),
                boxes: t["boxes"]
                    .as_array()
                    .expect("boxes")
                    .iter()
                    .map(|bx| floats(bx).try_into().expect("4 values"))
                    .collect(),
                size: (64, 64),
                orig_size: (64, 64),
            })
            .collect();

        let matches =
            match_batch(&logits, &boxes, &targets, &MatchCosts::default()).expect("matches");
        for (i, (m, want)) in matches
            .iter()
            .zip(case["matches"].as_array().expect("matches"))
            .enumerate()
        {
            let rows: Vec<usize> = want["rows"]
                .as_array()
                .expect("rows")
                .iter()
                .map(|v| v.as_u64().expect("row") as usize)
                .collect();
            let cols: Vec<usize> = want["cols"]
                .as_array()
                .expect("cols")
                .iter()
                .map(|v| v.as_u64().expect("col") as usize)
                .collect();
            let expected: Vec<(usize, usize)> = rows.into_iter().zip(cols).collect();
            assert_eq!(m.pairs, expected, "{name}: image {i} matching");
            let want_cost = case["match_costs"][i].as_f64().expect("cost");
            assert!(
                (m.total_cost - want_cost).abs() <= 1e-4 * want_cost.abs().max(1.0),
                "{name}: cost {} vs {want_cost}",
                m.total_cost
            );
        }

        let num_boxes = targets.iter().map(|t| t.boxes.len()).sum::<usize>() as f64;
        let weights = SetLossWeights::default();
        let losses = set_losses(
            logits.clone(),
            boxes.clone(),
            &targets,
            &matches,
            num_boxes,
            &weights,
        );
        let scalar = |t: Tensor<Training, 1>| {
            t.into_data().convert::<f32>().to_vec::<f32>().expect("f32")[0]
        };
        close(
            scalar(losses.class.clone()),
            case["loss_class"].as_f64().expect("ce") as f32,
            1e-5,
            &format!("{name} class"),
        );
        close(
            scalar(losses.bbox.clone()),
            case["loss_bbox"].as_f64().expect("l1") as f32,
            1e-5,
            &format!("{name} bbox"),
        );
        close(
            scalar(losses.giou.clone()),
            case["loss_giou"].as_f64().expect("giou") as f32,
            1e-5,
            &format!("{name} giou"),
        );
        let total = losses.weighted(&weights);
        close(
            scalar(total.clone()),
            case["weighted_total"].as_f64().expect("total") as f32,
            1e-5,
            &format!("{name} total"),
        );

        let grads = total.backward();
        for (what, param, key) in [
            ("logits", &logits, "grad_logits"),
            ("boxes", &boxes, "grad_boxes"),
        ] {
            let got: Vec<f32> = param
                .grad(&grads)
                .expect("gradient")
                .into_data()
                .convert::<f32>()
                .to_vec()
                .expect("f32");
            let want = floats(&case[key]);
            assert_eq!(got.len(), want.len());
            for (j, (g, w)) in got.iter().zip(&want).enumerate() {
                close(*g, *w, 1e-4, &format!("{name} d{what}[{j}]"));
            }
        }
    }
}

#[test]
fn centre_assignment_picks_the_level_and_the_tokens_near_each_centre() {
    // Two levels: 4×4 cells (anchors 0.5 wide, tokens 0..16) and 2×2 cells (1.0, tokens 16..20).
    let mut anchors = Vec::new();
    for (cells, side) in [(4, 0.5f32), (2, 1.0)] {
        for y in 0..cells {
            for x in 0..cells {
                let c = |i: usize| (i as f32 + 0.5) / cells as f32;
                anchors.extend_from_slice(&[c(x), c(y), side, side]);
            }
        }
    }
    let mut padding = vec![false; 20];
    padding[19] = true;
    let target = DetTarget {
        image_id: 1,
        // Small (fine level, one token), large (coarse level, all unpadded tokens), and medium
        // (fine level) on the small one's token, which the smaller box keeps.
        boxes: vec![
            [0.3, 0.3, 0.1, 0.1],
            [0.5, 0.5, 0.8, 0.8],
            [0.375, 0.375, 0.3, 0.3],
        ],
        classes: vec![0, 1, 2],
        size: (64, 64),
        orig_size: (64, 64),
    };
    let weights = SetLossWeights::default();
    let got = centre_assignment(&anchors, &padding, &[target], &weights);
    assert_eq!(got[0].pairs, vec![(5, 0), (16, 1), (17, 1), (18, 1)]);
    // A wider radius reaches the medium box's neighbouring tokens inside it.
    let wide = SetLossWeights {
        centre_radius: 3.0,
        ..weights
    };
    let target = DetTarget {
        image_id: 1,
        boxes: vec![[0.375, 0.375, 0.6, 0.3]],
        classes: vec![2],
        size: (64, 64),
        orig_size: (64, 64),
    };
    let got = centre_assignment(&anchors, &padding, &[target], &wide);
    assert_eq!(got[0].pairs, vec![(4, 0), (5, 0), (6, 0)]);
}

#[test]
fn iou_class_target_trains_toward_the_matched_box_iou() {
    use densekd::model::detr::loss::ClassTarget;
    use densekd::ops::matcher::Assignment;
    let device = Default::default();
    let logits = [0.3f32, -1.2, 0.8, -0.4, -2.0, 1.5];
    let target = DetTarget {
        image_id: 0,
        boxes: vec![[0.5, 0.5, 0.4, 0.4]],
        classes: vec![1],
        size: (64, 64),
        orig_size: (64, 64),
    };
    let matches = [Assignment {
        pairs: vec![(0, 0)],
        total_cost: 0.0,
    }];
    let class_loss = |class_target, first_box: [f32; 4]| {
        let boxes: Vec<f32> = [first_box, [0.2, 0.2, 0.1, 0.1], [0.8, 0.7, 0.2, 0.3]].concat();
        let weights = SetLossWeights {
            class_target,
            ..SetLossWeights::default()
        };
        set_losses(
            Tensor::<Training, 3>::from_data(TensorData::new(logits.to_vec(), [1, 3, 2]), &device),
            Tensor::<Training, 3>::from_data(TensorData::new(boxes, [1, 3, 4]), &device),
            std::slice::from_ref(&target),
            &matches,
            1.0,
            &weights,
        )
        .class
        .into_scalar()
    };
    // Quality focal loss written out: the matched cell (query 0, class 1) against quality y,
    // every other cell against 0.
    let expected = |y: f64| -> f64 {
        let (alpha, gamma) = (0.25, 2.0);
        logits
            .iter()
            .enumerate()
            .map(|(cell, &x)| {
                let p = 1.0 / (1.0 + (-x as f64).exp());
                let y = if cell == 1 { y } else { 0.0 };
                let bce = -(y * p.ln() + (1.0 - y) * (1.0 - p).ln());
                let w = if cell == 1 {
                    alpha * (y - p).abs().powf(gamma)
                } else {
                    (1.0 - alpha) * p.powf(gamma)
                };
                w * bce
            })
            .sum()
    };
    // Shifted by 0.05 in x: intersection 0.35 × 0.4, union 2 · 0.16 − 0.14, IoU 7/9.
    let shifted = class_loss(ClassTarget::Iou, [0.55, 0.5, 0.4, 0.4]);
    close(shifted, expected(7.0 / 9.0) as f32, 1e-5, "IoU target");
    // A perfectly placed box has quality 1: the one-hot focal loss.
    let exact = class_loss(ClassTarget::Iou, [0.5, 0.5, 0.4, 0.4]);
    close(exact, expected(1.0) as f32, 1e-5, "IoU 1");
    let onehot = class_loss(ClassTarget::Onehot, [0.55, 0.5, 0.4, 0.4]);
    close(onehot, exact, 1e-5, "one-hot");
}
