//! End-to-end learning check of the DETR path (data → model → matching → losses → AdamW →
//! post-processing → COCO evaluation): a tiny seeded DETR (50 queries, spatial prior) fitting 8
//! synthetic images must memorise them: 600 steps at lr 1e-2 (~64 s) reach AP 0.98 / AP50 1.0,
//! above the project's target of AP ≥ 0.9 within two minutes (450 steps gave AP 0.95 / AP50
//! 0.97).

use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::Backend;
use densekd::backend::{Inference, Training};
use densekd::data::coco::{CocoDataset, InvalidPolicy};
use densekd::data::detection::{collate_detection, DetAugment, SynthDetSource};
use densekd::data::export::synth_coco;
use densekd::data::loader::Source;
use densekd::data::synth::{Split, SynthConfig, NUM_CLASSES};
use densekd::eval::coco::{CocoEvaluator, CocoStats};
use densekd::model::backbone::{Arch, BackboneConfig};
use densekd::model::detr::loss::{detr_loss, ClassTarget, SetLossWeights};
use densekd::model::detr::{postprocess, Detr, DetrConfig};
use densekd::model::layers::norm::NormKind;
use densekd::model::layers::transformer::LayerConfig;
use densekd::ops::matcher::MatchCosts;
use rand::SeedableRng;

#[test]
fn tiny_detr_learns_eight_images() {
    let synth = SynthConfig {
        size: 64,
        max_objects: 3,
        ..SynthConfig::default()
    };
    let source = SynthDetSource {
        config: synth.clone(),
        split: Split::Train,
        len: 8,
        augment: DetAugment {
            shorter: 64,
            max_size: 64,
            hflip_prob: 0.0,
        },
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let samples = (0..8)
        .map(|i| source.get(i, &mut rng))
        .collect::<Result<Vec<_>, _>>()
        .expect("samples");
    let batch = collate_detection(samples, 32).expect("batch");
    let gt = synth_coco(&synth, Split::Train, 8).expect("ground truth");
    let gt =
        CocoDataset::from_dataset(std::path::Path::new("synthetic"), gt, InvalidPolicy::Reject)
            .expect("valid");

    let cfg = DetrConfig {
        backbone: BackboneConfig {
            arch: Arch::Resnet18,
            width: 0.25,
            norm: NormKind::Batch,
            frozen_stages: 0,
            output_stride: 32,
            last_conv: true,
            blocks: Some([1, 1, 1, 1]),
            num_classes: None,
        },
        feature_strides: vec![8, 16, 32],
        num_classes: NUM_CLASSES,
        spatial_prior: 0.5,
        deformable_points: 0,
        two_stage: false,
        dense_head: false,
        denoising: Default::default(),
        encoder_strides: vec![16, 32],
        num_queries: 50,
        groups: 1,
        layer: LayerConfig {
            d_model: 64,
            heads: 4,
            ffn: 128,
            dropout: 0.0,
        },
        encoder_layers: 1,
        decoder_layers: 3,
    };
    let device = Default::default();
    Training::seed(&device, 0);
    let mut model = cfg.init::<Training>(&device).expect("model");
    let mut optim = AdamWConfig::new()
        .with_weight_decay(1e-4)
        .with_epsilon(1e-8)
        .with_grad_clipping(Some(burn::grad_clipping::GradientClippingConfig::Norm(0.1)))
        .init::<Training, Detr<Training>>();
    let images = batch.images_tensor::<Training>(&device);
    // IoU class targets, as the default config: scores that rank tight boxes first are what AP
    // at IoU 0.5–0.95 measures (one-hot targets reached AP 0.88–0.97 depending on the CPU's
    // floating-point kernels).
    let weights = SetLossWeights {
        class_target: ClassTarget::Iou,
        ..SetLossWeights::default()
    };
    let costs = MatchCosts::default();

    let evaluate = |model: &Detr<Inference>| -> CocoStats {
        let out = model.forward(batch.images_tensor::<Inference>(&device), &batch.padding, 1);
        let sizes: Vec<(u32, u32)> = batch.targets.iter().map(|t| t.orig_size).collect();
        let dets = postprocess(out.last(), cfg.num_queries, &sizes, 100);
        let mut ev = CocoEvaluator::new(&gt).expect("evaluator");
        ev.add_images(
            gt.images
                .iter()
                .zip(&dets)
                .map(|(img, d)| (img, d.as_slice())),
        )
        .expect("update");
        ev.finish().expect("stats")
    };
    let before = evaluate(&model.valid());
    let mut losses = Vec::new();
    let (steps, lr) = (600, 1e-2);
    let t0 = std::time::Instant::now();
    for step in 0..steps {
        // The last fifth at a tenth of the rate: at a constant 1e-2 the end point depends on
        // floating-point rounding (AVX2 and AVX-512 matrix kernels ended at AP 0.98 and 0.85).
        let lr = if step < steps * 4 / 5 { lr } else { lr / 10.0 };
        let out = model.forward(images.clone(), &batch.padding, cfg.groups);
        let loss = detr_loss(&out, &batch.targets, &weights, &costs)
            .expect("loss")
            .weighted(&weights);
        losses.push(loss.clone().into_scalar());
        assert!(
            losses.last().is_some_and(|l| l.is_finite()),
            "loss diverged: {losses:?}"
        );
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(lr, model, grads);
    }
    let after = evaluate(&model.valid());
    eprintln!("{steps} steps in {:.1}s", t0.elapsed().as_secs_f64());
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    eprintln!(
        "loss {first:.3} -> {last:.3}; AP50 {:.3} -> {:.3}, AP {:.3}",
        before.AP50, after.AP50, after.AP
    );
    assert!(last < 0.2 * first, "loss {first} -> {last}");
    assert!(
        after.AP >= 0.9 && after.AP50 >= 0.95,
        "AP {} / AP50 {} after {steps} steps (AP50 was {})",
        after.AP,
        after.AP50,
        before.AP50
    );
}

#[test]
fn postprocess_ranks_query_class_pairs_and_scales_boxes() {
    use burn::tensor::{Tensor, TensorData};
    use densekd::model::detr::LayerPrediction;
    let device = Default::default();
    // 2 queries × 3 classes; query 1 class 2 is the most confident.
    let logits = Tensor::<Inference, 3>::from_data(
        TensorData::new(vec![0.0f32, -5.0, -5.0, -5.0, -5.0, 3.0], [1, 2, 3]),
        &device,
    );
    let boxes = Tensor::<Inference, 3>::from_data(
        TensorData::new(vec![0.5f32, 0.5, 0.2, 0.4, 0.25, 0.75, 0.5, 0.5], [1, 2, 4]),
        &device,
    );
    let pred = LayerPrediction {
        logits,
        boxes: boxes.clone(),
        hidden: boxes.clone(),
        state: boxes,
    };
    let dets = postprocess(&pred, 2, &[(200, 100)], 2);
    assert_eq!(dets[0].len(), 2);
    assert_eq!(dets[0][0].class, 2);
    assert_eq!(dets[0][0].bbox, [0.0, 50.0, 100.0, 50.0]);
    assert!((dets[0][0].score - 1.0 / (1.0 + (-3.0f64).exp())).abs() < 1e-6);
    assert_eq!(dets[0][1].class, 0);
    let b = dets[0][1].bbox;
    assert!(
        (b[0] - 80.0).abs() < 1e-4
            && (b[1] - 30.0).abs() < 1e-4
            && (b[2] - 40.0).abs() < 1e-4
            && (b[3] - 40.0).abs() < 1e-4,
        "{b:?}"
    );
}
