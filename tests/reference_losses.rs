//! Same results across refactors: the per-step losses, loss terms and gradient norms of short
//! tiny DETR and OD-DETR runs (all three mechanisms on, denoising on) and of a data-parallel
//! DETR run must equal the values in `fixtures/reference_losses.json`, recorded by this test
//! (`DENSEKD_RECORD_REFERENCE=1 cargo test --test reference_losses`) at commit d5c92aa, before
//! the trainer redesign, with the same settings in that commit's config layout (`model.*` keys
//! for `detr.model.*`, `distill.od_detr.*` for `distill.*`; `pd_weight = 0.25` and
//! `ramp_steps = 300` came from that commit's default config).

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use densekd::train::run::train_with_options;
use densekd::train::RunOptions;
use serde_json::Value;

/// The pinned runs: name and overrides on top of `common::TINY_RUN`.
const RUNS: &[(&str, &[&str])] = &[
    ("detr", &["detr.model.denoising.groups=2"]),
    (
        "od-detr",
        &[
            "distill.method=\"od-detr\"",
            "distill.pd_weight=0.25",
            "distill.ramp_steps=300",
            "distill.guided_matching=true",
            "distill.pd=true",
            "distill.aux=true",
            "detr.model.denoising.groups=2",
        ],
    ),
    (
        "detr-replicas",
        &["detr.model.backbone.norm=\"frozen\"", "optim.replicas=2"],
    ),
];

fn fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference_losses.json")
}

/// The train lines of one run: per step, every logged number but `lr`, `epoch` and `step`.
fn train_lines(extra: &[&str]) -> Vec<BTreeMap<String, f64>> {
    let config = common::tiny_config(extra);
    let tmp = tempfile::tempdir().expect("tmp");
    let options = RunOptions {
        run_dir: tmp.path().join("run"),
        resume: false,
        stop_after: None,
        progress: false,
        world: None,
    };
    train_with_options(&config, &options).expect("train");
    let text = std::fs::read_to_string(options.run_dir.join("metrics.jsonl")).expect("metrics");
    text.lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("json"))
        .filter(|v| v["kind"] == "train")
        .map(|v| {
            v.as_object()
                .expect("object")
                .iter()
                .filter(|(k, _)| !["kind", "epoch", "lr"].contains(&k.as_str()))
                .map(|(k, x)| (k.clone(), x.as_f64().expect("number")))
                .collect()
        })
        .collect()
}

#[test]
fn losses_and_gradient_norms_equal_the_recorded_ones() {
    let runs: BTreeMap<String, Vec<BTreeMap<String, f64>>> = RUNS
        .iter()
        .map(|(name, extra)| (name.to_string(), train_lines(extra)))
        .collect();
    if std::env::var_os("DENSEKD_RECORD_REFERENCE").is_some() {
        let text = serde_json::to_string_pretty(&runs).expect("json");
        std::fs::write(fixture(), text + "\n").expect("write fixture");
        return;
    }
    let text = std::fs::read_to_string(fixture()).expect("fixture");
    let expected: BTreeMap<String, Vec<BTreeMap<String, f64>>> =
        serde_json::from_str(&text).expect("fixture json");
    for (name, lines) in &expected {
        let got = &runs[name];
        assert_eq!(got.len(), lines.len(), "{name}: number of logged steps");
        for (want, have) in lines.iter().zip(got) {
            assert_eq!(
                want.keys().collect::<Vec<_>>(),
                have.keys().collect::<Vec<_>>(),
                "{name}: logged terms"
            );
            for (k, w) in want {
                let h = have[k];
                assert!(
                    (h - w).abs() <= 1e-6 * w.abs().max(1e-3),
                    "{name} step {}: {k} = {h}, recorded {w}",
                    want["step"]
                );
            }
        }
    }
}
