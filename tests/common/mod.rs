//! Helpers shared by the integration tests.

use std::process::Command;

/// Runs the `densekd` binary: (success, stdout, stderr).
#[allow(dead_code)] // not every test binary uses it
pub fn densekd(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_densekd"))
        .args(args)
        .output()
        .expect("binary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Overrides of a tiny run: 16 synthetic 64 px images, batches of 4, a 1/4-width backbone and a
/// 32-wide transformer with 10 queries (4 steps per epoch).
#[allow(dead_code)] // not every test binary uses it
pub const TINY_RUN: &[&str] = &[
    "data.synthetic.train_images=16",
    "data.synthetic.val_images=8",
    "data.synthetic.generator.size=64",
    "data.augment.shorter=64",
    "data.augment.max_size=64",
    "data.workers=1",
    "optim.batch_size=4",
    "optim.warmup_steps=2",
    "backbone_weights=",
    "detr.model.backbone.arch=resnet18",
    "detr.model.backbone.width=0.25",
    "detr.model.backbone.blocks=[1,1,1,1]",
    "detr.model.backbone.norm=batch",
    // Trainable batch norm rules out data-parallel replicas (the default config has 2).
    "optim.replicas=1",
    "detr.model.backbone.frozen_stages=0",
    "detr.model.layer.d_model=32",
    "detr.model.layer.ffn=64",
    "detr.model.num_queries=10",
];

/// `configs/detr_shapes.toml` with [`TINY_RUN`], 2 epochs logged every step, and `extra`.
#[allow(dead_code)] // not every test binary uses it
pub fn tiny_config(extra: &[&str]) -> densekd::train::config::TrainConfig {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/detr_shapes.toml");
    let sets: Vec<String> = TINY_RUN
        .iter()
        .chain(&["optim.epochs=2", "checkpoint.log_every_steps=1"])
        .chain(extra)
        .map(|s| s.to_string())
        .collect();
    densekd::train::config::TrainConfig::load(&path, &sets).expect("config")
}

/// The JSON lines of a run folder's `metrics.jsonl`.
#[allow(dead_code)] // not every test binary uses it
pub fn lines(dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .expect("metrics")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

/// How many "batch skipped" warnings (`optim.skip_nonfinite`) a run printed.
#[allow(dead_code)] // not every test binary uses it
pub fn skip_warnings(stderr: &str) -> usize {
    stderr
        .lines()
        .filter(|l| l.starts_with("warning: step") && l.contains("batch skipped"))
        .count()
}

/// Options of a quiet run into `dir`.
#[allow(dead_code)] // not every test binary uses it
pub fn options(
    dir: &std::path::Path,
    resume: bool,
    stop_after: Option<usize>,
) -> densekd::train::RunOptions {
    densekd::train::RunOptions {
        run_dir: dir.to_path_buf(),
        resume,
        stop_after,
        progress: false,
        world: None,
    }
}

/// The backend's generator is process-global, so concurrent tests' initialisations would draw
/// from each other's seeded streams: tests that need exact values hold this lock throughout.
#[allow(dead_code)] // not every test binary uses it
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs the calling test alone among those of its binary that also call it.
#[allow(dead_code)] // not every test binary uses it
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A fixture's `{"shape": [...], "data": [...]}` as a tensor.
#[allow(dead_code)] // not every test binary uses it
pub fn fixture_tensor<const D: usize>(
    v: &serde_json::Value,
) -> burn::tensor::Tensor<densekd::backend::Inference, D> {
    let shape: Vec<usize> = v["shape"]
        .as_array()
        .expect("shape")
        .iter()
        .map(|d| d.as_u64().expect("dimension") as usize)
        .collect();
    let shape: [usize; D] = shape.try_into().expect("rank");
    let data: Vec<f32> = v["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|x| x.as_f64().unwrap_or(f64::NAN) as f32)
        .collect();
    burn::tensor::Tensor::from_data(
        burn::tensor::TensorData::new(data, shape),
        &Default::default(),
    )
}

/// Asserts a tensor has a fixture tensor's shape and values, within `1e-4` of its largest
/// magnitude.
#[allow(dead_code)] // not every test binary uses it
pub fn assert_fixture_close<const D: usize>(
    got: burn::tensor::Tensor<densekd::backend::Inference, D>,
    expected: &serde_json::Value,
    what: &str,
) {
    let want = fixture_tensor::<D>(expected);
    assert_eq!(got.dims(), want.dims(), "{what} shape");
    let (got, want): (Vec<f32>, Vec<f32>) = (
        got.into_data().to_vec().expect("f32"),
        want.into_data().to_vec().expect("f32"),
    );
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    for (i, (g, e)) in got.iter().zip(&want).enumerate() {
        assert!((g - e).abs() <= 1e-4 * scale, "{what}[{i}]: {g} vs {e}");
    }
}
