//! DeepLabV3 end to end through `densekd train` machinery: label-map folders in, mIoU out.

mod common;

use std::path::Path;

use common::{lines, options, serial};
use densekd::backend::Inference;
use densekd::data::export::write_split;
use densekd::data::labelmap::LabelMap;
use densekd::data::segmentation::{collate_segmentation, SegSample};
use densekd::data::synth::{Split, SynthConfig};
use densekd::model::backbone::{Arch, BackboneConfig};
use densekd::model::deeplabv3::config::{DecoderConfig, TestFlips};
use densekd::model::deeplabv3::task::predict_labels;
use densekd::model::deeplabv3::{DeepLabV3, DeepLabV3Config};
use densekd::model::layers::norm::NormKind;
use densekd::model::weights::{load_pytorch, LoadOptions};
use densekd::train::config::TrainConfig;
use densekd::train::run::train_with_options;

/// `configs/deeplabv3_shapes.toml` made tiny: a 1/4-width ResNet-18 with one block per stage
/// at output stride 8 on the images as they are, from scratch, a 32-wide head, label maps read
/// from `data`.
fn tiny_config(data: &Path, extra: &[&str]) -> TrainConfig {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/deeplabv3_shapes.toml");
    let (images, labels) = (data.join("images/train"), data.join("labels/train"));
    let folders = [
        format!("data.segmentation.train_images={:?}", images.display().to_string()),
        format!("data.segmentation.train_labels={:?}", labels.display().to_string()),
        format!("data.segmentation.val_images={:?}", images.display().to_string()),
        format!("data.segmentation.val_labels={:?}", labels.display().to_string()),
        "data.segmentation.class_names=[\"background\",\"circle\",\"square\",\"triangle\",\"ellipse\",\"cross\",\"star\",\"ring\",\"frame\"]".to_string(),
    ];
    let sets: Vec<String> = folders
        .into_iter()
        .chain(
            [
                "backbone_weights=",
                "data.workers=1",
                "data.seg_augment.scale_range=[1.0,1.0]",
                "data.seg_augment.crop=[64,64]",
                "data.seg_augment.hflip_prob=0.0",
                "data.seg_augment.vflip_prob=0.0",
                "data.seg_augment.transpose_prob=0.0",
                "deeplabv3.model.backbone.arch=\"resnet18\"",
                "deeplabv3.model.backbone.width=0.25",
                "deeplabv3.model.backbone.blocks=[1,1,1,1]",
                "deeplabv3.model.backbone.norm=\"group\"",
                "deeplabv3.model.backbone.frozen_stages=0",
                "deeplabv3.model.backbone.output_stride=8",
                "deeplabv3.model.input_scale=1.0",
                "deeplabv3.model.channels=32",
                "deeplabv3.model.aspp_rates=[1,2,3]",
                "deeplabv3.loss={ aux_weight = 0.4 }",
                "optim.replicas=1",
                "optim.batch_size=4",
                "optim.optimizer=\"adamw\"",
                "optim.schedule=\"cosine\"",
                "optim.lr=1e-3",
                "optim.weight_decay=1e-4",
                "optim.backbone_lr_mult=0.1",
                "optim.warmup_steps=50",
                "checkpoint.every_steps=0",
            ]
            .iter()
            .chain(extra)
            .map(|s| s.to_string()),
        )
        .collect();
    TrainConfig::load(&path, &sets).expect("config")
}

#[test]
fn tiny_deeplabv3_memorises_four_images() {
    let _serial = serial();
    let tmp = tempfile::tempdir().expect("tmp");
    let synth = SynthConfig {
        size: 64,
        ..SynthConfig::default()
    };
    write_split(tmp.path(), &synth, Split::Train, 4).expect("data");
    let config = tiny_config(
        tmp.path(),
        &[
            "optim.epochs=100",
            "deeplabv3.model.input_scale=2.0",
            "optim.lr=5e-3",
            "optim.warmup_steps=10",
            "eval.every_epochs=100",
            "checkpoint.log_every_steps=20",
        ],
    );
    let run = tmp.path().join("run");
    let summary = train_with_options(&config, &options(&run, false, None)).expect("train");
    let miou = summary.final_eval[0]
        .1
        .iter()
        .find(|(k, _)| k == "mIoU")
        .map(|(_, v)| *v)
        .expect("mIoU");
    assert!(miou >= 0.95, "mIoU {miou} after 100 steps on 4 images");

    // The exported model re-scored from files: `predict` writes label maps in the dataset's
    // format and `eval seg` scores them against the dataset's own, giving the run's mIoU.
    let out = tmp.path().join("pred");
    let (weights, images) = (
        run.join("model.safetensors"),
        tmp.path().join("images/train"),
    );
    let (ok, _, err) = common::densekd(&[
        "predict",
        "--weights",
        &weights.display().to_string(),
        "--images",
        &images.display().to_string(),
        "--out",
        &out.display().to_string(),
    ]);
    assert!(ok, "{err}");
    assert!(out.join("vis/000000.png").is_file());
    let gt = tmp.path().join("labels/train");
    let (ok, json, err) = common::densekd(&[
        "eval",
        "seg",
        "--gt",
        &gt.display().to_string(),
        "--pred",
        &out.join("labels").display().to_string(),
        "--num-classes",
        "9",
        "--json",
    ]);
    assert!(ok, "{err}");
    let scored: serde_json::Value = serde_json::from_str(&json).expect("json");
    let rescored = scored["mIoU"].as_f64().expect("mIoU");
    assert!((rescored - miou).abs() < 1e-6, "{rescored} vs {miou}");
}

/// The `[distill]` overrides of a seg-kd student of `teacher` with KD, CWD on features (a
/// 32 → 16 connector: the student's head is narrower) and RDD switching stage at step 4 of 8.
fn seg_kd(teacher: &Path) -> Vec<String> {
    vec![
        "distill.method=\"seg-kd\"".to_string(),
        format!("distill.teacher={:?}", teacher.display().to_string()),
        "distill.kd.weight=1.0".to_string(),
        "distill.cwd_features.weight=5.0".to_string(),
        "distill.rdd.tfe_fraction=0.5".to_string(),
        "deeplabv3.model.channels=16".to_string(),
        "optim.epochs=8".to_string(),
        "checkpoint.log_every_steps=1".to_string(),
        "checkpoint.every_steps=3".to_string(),
        "eval.every_epochs=8".to_string(),
    ]
}

#[test]
fn seg_kd_with_rdd_distils_from_a_frozen_teacher_and_resumes_exactly() {
    let _serial = serial();
    let tmp = tempfile::tempdir().expect("tmp");
    let synth = SynthConfig {
        size: 64,
        ..SynthConfig::default()
    };
    write_split(tmp.path(), &synth, Split::Train, 4).expect("data");
    let teacher = tmp.path().join("teacher");
    let teacher_config = tiny_config(
        tmp.path(),
        &[
            "optim.epochs=60",
            "optim.lr=5e-3",
            "eval.every_epochs=60",
            "checkpoint.log_every_steps=20",
        ],
    );
    train_with_options(&teacher_config, &options(&teacher, false, None)).expect("teacher");

    let sets = seg_kd(&teacher);
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let config = tiny_config(tmp.path(), &sets);
    let (full, part) = (tmp.path().join("full"), tmp.path().join("part"));
    train_with_options(&config, &options(&full, false, None)).expect("student");
    let log = lines(&full);
    let first = &log[0];
    assert_eq!(
        (
            first["kind"].as_str(),
            first["model"].as_str(),
            first["step"].as_u64()
        ),
        (Some("eval"), Some("teacher"), Some(0)),
        "{first}"
    );
    assert!(first["mIoU"].as_f64().expect("mIoU") > 0.3, "{first}");
    let train: Vec<&serde_json::Value> = log.iter().filter(|l| l["kind"] == "train").collect();
    assert_eq!(train.len(), 8);
    // TFE for steps 0..4 (its weight map logged), then TSE (its kept share).
    for (i, l) in train.iter().enumerate() {
        let (tfe, tse) = (l.get("rdd_weight").is_some(), l.get("rdd_kept").is_some());
        assert_eq!((tfe, tse), (i < 4, i >= 4), "step {i}: {l}");
        for key in ["loss_ce", "loss_aux", "loss_kd", "loss_cwd_features"] {
            assert!(l[key].as_f64().is_some_and(f64::is_finite), "{key}: {l}");
        }
    }

    // Killed after step 3 (in TFE) and resumed: the stage and everything else continue exactly.
    train_with_options(&config, &options(&part, false, Some(3))).expect("part");
    train_with_options(&config, &options(&part, true, None)).expect("resume");
    assert_eq!(lines(&part), log, "a resumed run differs");

    // With a teacher cache: the first run fills it (its first batch is new; later epochs may
    // repeat a batch), the second reads every batch from it, and both train exactly as the
    // uncached run.
    let cache = tmp.path().join("teacher-cache");
    let mut cached_sets = sets.clone();
    let cache_set = format!("distill.teacher_cache={:?}", cache.display().to_string());
    cached_sets.push(&cache_set);
    let cached_config = tiny_config(tmp.path(), &cached_sets);
    for run in ["fill", "hit"] {
        let dir = tmp.path().join(run);
        train_with_options(&cached_config, &options(&dir, false, None)).expect(run);
        let mut cached = lines(&dir);
        let flags: Vec<Option<f64>> = cached
            .iter_mut()
            .filter(|l| l["kind"] == "train")
            .map(|l| {
                l.as_object_mut()
                    .and_then(|o| o.remove("teacher_cached"))
                    .and_then(|f| f.as_f64())
            })
            .collect();
        assert_eq!(flags.len(), 8, "{run}");
        let first = if run == "fill" { 0.0 } else { 1.0 };
        assert_eq!(flags[0], Some(first), "{run}: {flags:?}");
        if run == "hit" {
            assert!(flags.iter().all(|&f| f == Some(1.0)), "{flags:?}");
        }
        assert_eq!(cached, log, "{run}: a cached run differs");
    }

    // KD at the labels' resolution: the same first step, another KD term (upsampled maps).
    let mut at_labels = sets.clone();
    at_labels.extend(["distill.kd.resolution=\"labels\"", "optim.epochs=1"]);
    let labels_dir = tmp.path().join("kd-labels");
    let labels_config = tiny_config(tmp.path(), &at_labels);
    train_with_options(&labels_config, &options(&labels_dir, false, None)).expect("kd-labels");
    let first_train = |log: &[serde_json::Value]| {
        let l = log.iter().find(|l| l["kind"] == "train").cloned();
        l.expect("a train line")
    };
    let (a, b) = (first_train(&log), first_train(&lines(&labels_dir)));
    assert_eq!(a["loss_ce"], b["loss_ce"]);
    let (ka, kb) = (a["loss_kd"].as_f64(), b["loss_kd"].as_f64());
    assert!(
        kb.is_some_and(|k| k.is_finite() && k > 0.0) && ka != kb,
        "{ka:?} vs {kb:?}"
    );

    // The connector stays out of the export: it holds what a plain run's does.
    let plain = tmp.path().join("plain");
    let plain_config = tiny_config(
        tmp.path(),
        &["deeplabv3.model.channels=16", "optim.epochs=1"],
    );
    train_with_options(&plain_config, &options(&plain, false, None)).expect("plain");
    let size = |dir: &Path| {
        std::fs::metadata(dir.join("model.safetensors"))
            .expect("export")
            .len()
    };
    assert_eq!(size(&full), size(&plain));

    // A teacher without the auxiliary head cannot drive RDD: refused before step 0.
    let no_aux = tmp.path().join("no-aux");
    let no_aux_config = tiny_config(
        tmp.path(),
        &["deeplabv3.model.aux_head=false", "optim.epochs=1"],
    );
    train_with_options(&no_aux_config, &options(&no_aux, false, None)).expect("no-aux teacher");
    let sets = seg_kd(&no_aux);
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let refused = tmp.path().join("refused");
    let e = train_with_options(
        &tiny_config(tmp.path(), &sets),
        &options(&refused, false, None),
    )
    .expect_err("no aux head");
    assert!(
        e.to_string().contains("no-aux") && e.to_string().contains("auxiliary head"),
        "{e}"
    );
}

/// The fixture models' architecture: an eighth-width ResNet-50 with one block per stage at
/// output stride 8, 32-channel heads with ASPP rates 1/2/3, batch norm, 5 classes.
fn fixture_model(decoder: bool) -> DeepLabV3<Inference> {
    let config = DeepLabV3Config {
        backbone: BackboneConfig {
            arch: Arch::Resnet50,
            width: 0.125,
            norm: NormKind::Frozen,
            blocks: Some([1, 1, 1, 1]),
            output_stride: 8,
            last_conv: true,
            frozen_stages: 0,
            num_classes: None,
        },
        num_classes: 5,
        aspp_rates: vec![1, 2, 3],
        separable_aspp: false,
        channels: 32,
        norm: NormKind::Batch,
        aspp_dropout: 0.5,
        aux_head: true,
        aux_dropout: 0.1,
        input_scale: 1.0,
        decoder: decoder.then_some(DecoderConfig {
            low_level_channels: 12,
        }),
    };
    config.init(&Default::default()).expect("model")
}

/// A torchvision DeepLabV3 checkpoint loads by `torchvision_key_rules` and gives torchvision's
/// logits; the same model with DeepLabV3+'s decoder gives PyTorch's (fixtures made by
/// `tests/fixtures/make_deeplabv3_import_fixture.py`).
#[test]
fn torchvision_deeplabv3_and_the_decoder_match_pytorch() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/deeplabv3_import");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).expect("fixture"))
            .expect("json");
    let names = |key: &str| -> Vec<String> {
        let keys = expected[key].as_array().expect("keys").iter();
        keys.map(|k| k.as_str().expect("key").to_string()).collect()
    };
    let (keys, decoder_keys) = (names("keys"), names("decoder_keys"));
    for (decoder, logits) in [(false, "logits"), (true, "plus_logits")] {
        let model = fixture_model(decoder);
        let options = LoadOptions {
            key_rules: model.torchvision_key_rules(),
            top_level_key: None,
            allow_partial: false,
        };
        let (model, report) =
            load_pytorch(model, &dir.join("deeplabv3_tiny.pth"), &options).expect("import");
        // Without the decoder, exactly its tensors are left over.
        let mut unused = if decoder {
            vec![]
        } else {
            decoder_keys.clone()
        };
        unused.sort();
        let mut left = report.unused.clone();
        left.sort();
        assert_eq!(left, unused, "{logits}");
        let used = keys.len() + if decoder { decoder_keys.len() } else { 0 };
        assert_eq!(report.applied, used, "{logits}");
        let out = model.forward(common::fixture_tensor::<4>(&expected["image"]));
        common::assert_fixture_close(out.logits, &expected[logits], logits);
        let aux = out.aux_logits.expect("aux head");
        common::assert_fixture_close(aux, &expected["aux_logits"], "aux_logits");
    }
}

#[test]
fn decoder_and_flip_settings_are_validated() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/deeplabv3_shapes.toml");
    for (set, key) in [
        (
            "deeplabv3.model.decoder.low_level_channels=0",
            "deeplabv3.model.decoder.low_level_channels",
        ),
        ("deeplabv3.model.decoder.low_level=48", "low_level"),
    ] {
        let err = TrainConfig::load(&path, &[set.to_string()])
            .err()
            .unwrap_or_else(|| panic!("{set} was accepted"))
            .to_string();
        assert!(err.contains(key), "{set}: {err}");
    }
}

/// Test-time flips make the prediction follow the image: the prediction of a flipped (or
/// transposed) image is the flipped prediction, which the model alone does not give.
#[test]
fn test_flips_make_predictions_follow_the_image() {
    const W: usize = 40;
    const H: usize = 24;
    // The import fixture's random weights: a fresh model predicts one class everywhere.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/deeplabv3_import");
    let options = LoadOptions {
        key_rules: fixture_model(false).torchvision_key_rules(),
        top_level_key: None,
        allow_partial: false,
    };
    let (model, _) = load_pytorch(
        fixture_model(false),
        &dir.join("deeplabv3_tiny.pth"),
        &options,
    )
    .expect("import");
    let image = image::RgbImage::from_fn(W as u32, H as u32, |x, y| {
        let v = |k: u32| ((x * 37 + y * 91 + k * 53).wrapping_mul(2654435761) >> 24) as u8;
        image::Rgb([v(1), v(2), v(3)])
    });
    let predict = |image: &image::RgbImage, flips: TestFlips| -> Vec<u8> {
        let sample = SegSample {
            name: "random".into(),
            label: LabelMap::filled(image.width(), image.height(), 255),
            image: image.clone(),
        };
        let batch = collate_segmentation(vec![sample], 255).expect("batch");
        predict_labels(&model, &batch, flips)
    };
    // Each transform of the image, and where pixel (x, y) lands in the transformed label map.
    type Transform = (
        fn(&image::RgbImage) -> image::RgbImage,
        fn(usize, usize) -> usize,
    );
    let mirror: Transform = (
        |i| image::imageops::flip_horizontal(i),
        |x, y| y * W + (W - 1 - x),
    );
    let upside_down: Transform = (
        |i| image::imageops::flip_vertical(i),
        |x, y| (H - 1 - y) * W + x,
    );
    let transpose: Transform = (
        |i| image::RgbImage::from_fn(i.height(), i.width(), |x, y| *i.get_pixel(y, x)),
        |x, y| x * H + y,
    );
    let mismatches = |flips: TestFlips, (image_op, landing): Transform| -> usize {
        let base = predict(&image, flips);
        let moved = predict(&image_op(&image), flips);
        (0..H)
            .flat_map(|y| (0..W).map(move |x| (x, y)))
            .filter(|&(x, y)| moved[landing(x, y)] != base[y * W + x])
            .count()
    };
    // Summation order differs between the two predictions: a near-tie may flip a pixel.
    let pixels = W * H;
    for (flips, transforms) in [
        (TestFlips::Horizontal, vec![mirror]),
        (TestFlips::Dihedral, vec![mirror, upside_down, transpose]),
    ] {
        for (i, &t) in transforms.iter().enumerate() {
            let wrong = mismatches(flips, t);
            assert!(
                wrong * 500 <= pixels,
                "{flips:?} transform {i}: {wrong} pixels differ"
            );
        }
    }
    for t in [mirror, upside_down, transpose] {
        let wrong = mismatches(TestFlips::None, t);
        assert!(
            wrong >= 20,
            "the model alone follows it: {wrong} pixels differ"
        );
    }
}
