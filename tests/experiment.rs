//! The experiment runner without training: the named grids, the override order and seeds of a
//! plan, run-folder reuse / resume / refusal, and the report aggregated from hand-written run
//! folders (means, sample stds, nulls, variant order, files written).

mod common;

use std::path::{Path, PathBuf};

use densekd::distill::DistillConfig;
use densekd::experiment::{
    aggregate, named_grid, plan, plan_teacher, read_run, run_dir, run_state, shadowed_overrides,
    write_report, ExperimentOptions, Grid, ReportSpec, RunState, Variant, VariantRuns,
};
use densekd::model::detr::task::DETR_METRICS;
use densekd::train::config::TrainConfig;
use serde_json::{json, Value};

fn config_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/detr_shapes.toml")
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, text).expect("write");
}

/// A fake finished run: `summary.json` with the given final stats, `metrics.jsonl` with train,
/// eval and instability lines, and the resolved `config.toml`.
fn fake_run(dir: &Path, wall_s: f64, finals: Value, metrics: &[Value]) {
    let summary = json!({"steps": 30, "epochs": 3, "wall_s": wall_s, "final": finals});
    write(&dir.join("summary.json"), &summary.to_string());
    let lines: String = metrics.iter().map(|l| format!("{l}\n")).collect();
    write(&dir.join("metrics.jsonl"), &lines);
    let config = TrainConfig::load(&config_path(), &[]).expect("config");
    write(
        &dir.join("config.toml"),
        &config.to_toml().expect("toml text"),
    );
}

fn coco(ap: f64, ap50: f64, ap75: Value) -> Value {
    json!({"AP": ap, "AP50": ap50, "AP75": ap75, "APs": 0.0, "APm": 0.0, "APl": 0.0,
           "AR1": 0.0, "AR10": 0.0, "AR100": 0.0, "ARs": 0.0, "ARm": 0.0, "ARl": 0.0})
}

fn eval(epoch: u64, model: &str, ap: f64) -> Value {
    json!({"kind": "eval", "epoch": epoch, "step": 10 * epoch, "model": model, "AP": ap})
}

fn instability(epoch: u64, model: &str, fraction: f64) -> Value {
    json!({"kind": "instability", "epoch": epoch, "step": 10 * epoch, "model": model,
           "changed": (fraction * 100.0).round(), "fraction": fraction})
}

fn train_line(step: u64) -> Value {
    json!({"kind": "train", "epoch": 0, "step": step, "lr": 1e-4, "loss": 3.0})
}

fn close(value: &Value, expected: f64) -> bool {
    value.as_f64().is_some_and(|v| (v - expected).abs() < 1e-9)
}

#[test]
fn named_grids() {
    let e = named_grid("nope").expect_err("unknown grid");
    assert!(e.to_string().contains("nope"), "{e}");
    assert!(e.to_string().contains("od-detr"), "{e}");

    let grid = named_grid("od-detr").expect("od-detr");
    let names = variant_names(&grid);
    assert_eq!(
        names,
        ["baseline", "ema", "ema+a", "ema+a+b", "ema+a+b+c"],
        "variant order"
    );
    assert_eq!(
        grid.config,
        Path::new("configs/experiments/../detr_shapes.toml")
    );
    assert!(grid.variants[0].overrides.is_empty());
    assert_eq!(grid.variants[0].student_of.as_deref(), Some("ema"));
    assert_eq!(
        grid.variants[3].overrides,
        [
            r#"distill.method="od-detr""#,
            "distill.pd_weight=0.25",
            "distill.ramp_steps=300",
            "distill.guided_matching=true",
            "distill.pd=true",
            "distill.aux=false",
        ]
    );
    assert!(grid.base_overrides.contains(&"optim.epochs=3".to_string()));
}

#[test]
fn the_long_od_detr_grid_runs_the_default_schedule_with_od_detr_shapes_settings() {
    let grid = named_grid("od-detr-long").expect("od-detr-long");
    let names = variant_names(&grid);
    assert_eq!(names, ["baseline", "ema", "full"], "variant order");
    assert!(grid.base_overrides.is_empty(), "the default schedule");
    let options = options(3, Path::new("out-long"));
    let runs = plan(&grid, &options).expect("plan");
    let trained: Vec<(&str, usize)> = runs
        .iter()
        .map(|r| (r.variant.as_str(), r.seed_index))
        .collect();
    // The baseline is the EMA-only runs' student (tests/train.rs: identical bit for bit).
    assert_eq!(grid.variants[0].student_of.as_deref(), Some("ema"));
    assert_eq!(
        trained,
        [
            ("ema", 0),
            ("full", 0),
            ("ema", 1),
            ("full", 1),
            ("ema", 2),
            ("full", 2)
        ]
    );
    let default = TrainConfig::load(&config_path(), &[]).expect("default");
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/od_detr_shapes.toml");
    let shipped = TrainConfig::load(&shipped, &[]).expect("od_detr_shapes");
    for run in &runs {
        assert_eq!(run.config.optim, default.optim, "{}", run.variant);
        let DistillConfig::OdDetr(c) = &run.config.distill else {
            panic!("{} does not run OD-DETR", run.variant);
        };
        match run.variant.as_str() {
            // The full method is exactly the shipped OD-DETR config.
            "full" => assert_eq!(run.config.distill, shipped.distill),
            "ema" => assert!(!(c.guided_matching || c.pd || c.aux)),
            other => panic!("unexpected variant {other}"),
        }
    }
}

#[test]
fn the_rdd_grid_trains_its_teacher_first_and_names_it_in_the_variants() {
    let grid = named_grid("rdd").expect("rdd");
    let names = variant_names(&grid);
    assert_eq!(
        names,
        ["baseline", "kd", "cwd", "kd+rdd", "cwd+rdd", "kd+tfe", "kd+tse"],
        "variant order"
    );
    let out = PathBuf::from("out-rdd");
    let options = ExperimentOptions {
        seeds: 1,
        out: out.clone(),
        overrides: vec!["optim.epochs=1".into()],
        progress: false,
    };
    let teacher = plan_teacher(&grid, &options)
        .expect("plan")
        .expect("a teacher");
    assert_eq!(teacher.dir, out.join("teacher"));
    // The teacher is the shipped recipe with the backbone schedule the grid was measured with,
    // resized by --set only; the students are narrower.
    let width = |c: &TrainConfig| c.deeplabv3.as_ref().expect("deeplabv3").model.channels;
    assert_eq!(width(&teacher.config), 128);
    assert_eq!(teacher.config.optim.epochs, 1);
    let optim = &teacher.config.optim;
    assert_eq!(
        (optim.backbone_lr_mult, optim.warmup_steps, optim.batch_size),
        (0.3, 50, 8)
    );
    let ohem = |c: &TrainConfig| c.deeplabv3.as_ref().expect("deeplabv3").loss.ohem;
    assert_eq!(ohem(&teacher.config), None);
    let scale = |c: &TrainConfig| c.deeplabv3.as_ref().expect("deeplabv3").model.input_scale;
    assert_eq!(scale(&teacher.config), 2.0);
    let rates = |c: &TrainConfig| {
        c.deeplabv3
            .as_ref()
            .expect("deeplabv3")
            .model
            .aspp_rates
            .clone()
    };
    assert_eq!(rates(&teacher.config), [2, 4, 6]);
    let runs = plan(&grid, &options).expect("plan");
    assert!(runs.iter().all(|r| width(&r.config) == 64
        && (r.config.optim.warmup_steps, r.config.optim.batch_size) == (50, 8)
        && ohem(&r.config).is_none()
        && rates(&r.config) == [2, 4, 6]));
    // The students read the images at the teacher's scale, backbone frozen up to stride 16;
    // students and teacher see every flip and quarter turn.
    let frozen = |c: &TrainConfig| {
        c.deeplabv3
            .as_ref()
            .expect("deeplabv3")
            .model
            .backbone
            .frozen_stages
    };
    assert!(runs
        .iter()
        .all(|r| scale(&r.config) == 2.0 && frozen(&r.config) == 5));
    let dihedral = |c: &TrainConfig| {
        c.data
            .seg_augment
            .as_ref()
            .map(|a| (a.vflip_prob, a.transpose_prob))
            == Some((0.5, 0.5))
    };
    assert!(dihedral(&teacher.config) && runs.iter().all(|r| dihedral(&r.config)));
    for run in &runs {
        match (&run.config.distill, run.variant.as_str()) {
            (DistillConfig::None(_), "baseline") => {}
            (DistillConfig::SegKd(c), name) => {
                assert_eq!(c.teacher, out.join("teacher"), "{name}");
                assert_eq!(c.kd.is_some(), name.starts_with("kd"), "{name}");
                assert_eq!(c.cwd_logits.is_some(), name.starts_with("cwd"), "{name}");
                assert_eq!(c.rdd.is_some(), name.contains('+'), "{name}");
            }
            (other, name) => panic!("{name}: {other:?}"),
        }
    }

    // `{teacher}` in a grid without a teacher is an error naming the variant.
    let mut orphan = grid.clone();
    orphan.teacher = None;
    let e = plan(&orphan, &options).expect_err("no teacher");
    assert!(
        e.to_string().contains("kd") && e.to_string().contains("{teacher}"),
        "{e}"
    );
}

/// A grid over keys the current config has, so plans resolve.
#[test]
fn the_lgd_grid_compares_teacher_free_lgd_with_teacher_based_baselines() {
    let grid = named_grid("lgd").expect("lgd");
    let names = variant_names(&grid);
    assert_eq!(
        names,
        ["baseline", "lgd", "cwd", "pkd", "fitnet"],
        "variant order"
    );
    let out = PathBuf::from("out-lgd");
    let options = options(1, &out);
    let teacher = plan_teacher(&grid, &options)
        .expect("plan")
        .expect("a teacher");
    // The teacher is the FCOS recipe as shipped; the students are narrower and shorter.
    let fcos = |c: &TrainConfig| c.fcos.clone().expect("fcos").model;
    assert_eq!(
        (fcos(&teacher.config).channels, teacher.config.optim.epochs),
        (64, 10)
    );
    let runs = plan(&grid, &options).expect("plan");
    for run in &runs {
        assert_eq!(
            (fcos(&run.config).channels, run.config.optim.epochs),
            (32, 3)
        );
        match (&run.config.distill, run.variant.as_str()) {
            (DistillConfig::None(_), "baseline") | (DistillConfig::Lgd(_), "lgd") => {}
            (DistillConfig::FcosKd(c), name) => {
                assert_eq!(c.teacher, out.join("teacher"), "{name}");
                let terms = [c.cwd.is_some(), c.pkd.is_some(), c.fitnet.is_some()];
                let expected = [name == "cwd", name == "pkd", name == "fitnet"];
                assert_eq!(terms, expected, "{name}");
            }
            (other, name) => panic!("{name}: {other:?}"),
        }
    }
}

#[test]
fn the_long_lgd_grid_runs_the_fcos_recipe_and_the_three_seed_lgd_setting_at_2000_steps() {
    let grid = named_grid("lgd-long").expect("lgd-long");
    let names = variant_names(&grid);
    assert_eq!(
        names,
        ["baseline", "lgd", "cwd", "pkd", "fitnet"],
        "variant order"
    );
    let out = PathBuf::from("out-lgd-long");
    let options = options(1, &out);
    let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let long = ["optim.epochs=20".to_string()];
    let recipe = TrainConfig::load(&configs.join("fcos_shapes.toml"), &long).expect("fcos");
    // The students are the FCOS recipe at 2,000 steps; LGD is the setting measured on three
    // seeds in docs/results/lgd.md.
    let lgd_overrides = [
        long[0].clone(),
        "distill.heads=2".to_string(),
        "distill.distill_warmup_steps=340".to_string(),
    ];
    let lgd =
        TrainConfig::load(&configs.join("fcos_lgd_shapes.toml"), &lgd_overrides).expect("fcos_lgd");
    let runs = plan(&grid, &options).expect("plan");
    for run in &runs {
        assert_eq!(run.config.fcos, recipe.fcos, "{}", run.variant);
        assert_eq!(run.config.optim, recipe.optim, "{}", run.variant);
        match (&run.config.distill, run.variant.as_str()) {
            (DistillConfig::None(_), "baseline") => {}
            (DistillConfig::Lgd(_), "lgd") => assert_eq!(run.config.distill, lgd.distill),
            (DistillConfig::FcosKd(c), _) => assert_eq!(c.teacher, out.join("teacher")),
            (other, name) => panic!("{name}: {other:?}"),
        }
    }
    // The teacher: wider, with more of the backbone trained, for the same 2,000 steps.
    let teacher = plan_teacher(&grid, &options)
        .expect("plan")
        .expect("a teacher");
    let model = teacher.config.fcos.clone().expect("fcos").model;
    assert_eq!(
        (model.channels, model.backbone.frozen_stages),
        (96, 2),
        "teacher"
    );
    assert_eq!(teacher.config.optim, recipe.optim, "teacher schedule");
}

fn lr_grid() -> Grid {
    Grid {
        name: "lr".into(),
        config: config_path(),
        variants: vec![
            Variant {
                name: "low".into(),
                overrides: vec!["optim.lr=1e-5".into()],
                student_of: None,
            },
            Variant {
                name: "high".into(),
                overrides: vec!["optim.lr=1e-3".into()],
                student_of: None,
            },
        ],
        base_overrides: vec!["optim.epochs=2".into(), "optim.lr=5e-4".into()],
        teacher: None,
    }
}

#[test]
fn plan_orders_overrides_and_seeds() {
    let out = PathBuf::from("out");
    let options = ExperimentOptions {
        seeds: 2,
        out: out.clone(),
        overrides: vec![
            "seed=10".into(),
            "optim.epochs=1".into(),
            "optim.lr=0.1".into(),
        ],
        progress: false,
    };
    let runs = plan(&lr_grid(), &options).expect("plan");
    let order: Vec<(&str, usize)> = runs
        .iter()
        .map(|r| (r.variant.as_str(), r.seed_index))
        .collect();
    // Seed by seed, so a stopped experiment already has every variant once.
    assert_eq!(order, [("low", 0), ("high", 0), ("low", 1), ("high", 1)]);
    for r in &runs {
        assert_eq!(r.dir, run_dir(&out, &r.variant, r.seed_index));
        // --set beats the grid's base, the variant beats --set, the seed counts from --set's.
        assert_eq!(r.config.optim.epochs, 1);
        let lr = if r.variant == "low" { 1e-5 } else { 1e-3 };
        assert_eq!(r.config.optim.lr, lr);
        assert_eq!(r.config.seed, 10 + r.seed_index as u64);
    }
    assert_eq!(run_dir(&out, "high", 1), Path::new("out/high/seed-1"));
    assert_eq!(
        shadowed_overrides(&lr_grid(), &options.overrides),
        [
            ("optim.lr=0.1".to_string(), "low".to_string()),
            ("optim.lr=0.1".to_string(), "high".to_string())
        ]
    );

    let zero = ExperimentOptions {
        seeds: 0,
        ..options.clone()
    };
    let e = plan(&lr_grid(), &zero).expect_err("no seeds");
    assert!(e.to_string().contains("--seeds"), "{e}");
    let bad = ExperimentOptions {
        overrides: vec!["optim.lrr=1".into()],
        ..options
    };
    let e = plan(&lr_grid(), &bad).expect_err("unknown key");
    assert!(e.to_string().contains("lrr"), "{e}");

    // A variant reporting another's student trains nothing itself, and must name a variant that
    // trains, without overrides of its own.
    let borrowing = |student_of: &str, overrides: Vec<String>| {
        let mut grid = lr_grid();
        grid.variants.push(Variant {
            name: "same".into(),
            overrides,
            student_of: Some(student_of.into()),
        });
        grid
    };
    let runs = plan(&borrowing("low", Vec::new()), &options_one()).expect("plan");
    let trained: Vec<&str> = runs.iter().map(|r| r.variant.as_str()).collect();
    assert_eq!(trained, ["low", "high"]);
    let mut chained = borrowing("low", Vec::new());
    chained.variants.push(Variant {
        name: "chained".into(),
        overrides: Vec::new(),
        student_of: Some("same".into()),
    });
    for (grid, message) in [
        (borrowing("nope", Vec::new()), "names no variant"),
        (
            borrowing("low", vec!["optim.lr=1".into()]),
            "sets overrides",
        ),
        (chained, "trains no runs of its own"),
    ] {
        let e = plan(&grid, &options_one()).expect_err(message);
        assert!(e.to_string().contains(message), "{e}");
    }
}

/// `seeds` seeds into `out`, no overrides, no progress bars.
fn options(seeds: usize, out: &Path) -> ExperimentOptions {
    ExperimentOptions {
        seeds,
        out: out.to_path_buf(),
        overrides: Vec::new(),
        progress: false,
    }
}

/// The grid's variant names in order.
fn variant_names(grid: &Grid) -> Vec<&str> {
    grid.variants.iter().map(|v| v.name.as_str()).collect()
}

fn options_one() -> ExperimentOptions {
    options(1, Path::new("out"))
}

#[test]
fn run_folders_are_reused_resumed_or_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = TrainConfig::load(&config_path(), &[]).expect("config");
    let fresh = tmp.path().join("fresh");
    assert_eq!(run_state(&fresh, &config).expect("fresh"), RunState::Fresh);

    let done = tmp.path().join("done");
    fake_run(
        &done,
        1.0,
        json!({"student": coco(0.1, 0.2, json!(0.05))}),
        &[],
    );
    assert_eq!(run_state(&done, &config).expect("done"), RunState::Finished);

    let other = TrainConfig::load(&config_path(), &["optim.lr=3e-3".into()]).expect("config");
    let e = run_state(&done, &other).expect_err("different config");
    let msg = e.to_string();
    assert!(msg.contains("optim.lr") && msg.contains("done"), "{msg}");

    let partial = tmp.path().join("partial");
    write(&partial.join("checkpoints/latest.json"), "{}");
    let e = run_state(&partial, &config).expect_err("no config.toml");
    assert!(e.to_string().contains("config.toml"), "{e}");
    write(
        &partial.join("config.toml"),
        &config.to_toml().expect("toml"),
    );
    assert_eq!(
        run_state(&partial, &config).expect("partial"),
        RunState::Resume
    );
    assert!(
        read_run(&partial, "AP").expect("read").is_none(),
        "not finished"
    );
}

#[test]
fn report_aggregates_finished_runs() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path();
    // baseline: two seeds, no EMA, no instability lines.
    fake_run(
        &run_dir(out, "baseline", 0),
        100.0,
        json!({"student": coco(0.1, 0.3, json!(0.05))}),
        &[
            train_line(1),
            eval(1, "student", 0.05),
            eval(2, "student", 0.1),
        ],
    );
    fake_run(
        &run_dir(out, "baseline", 1),
        200.0,
        // AP75 null, as the loop writes a non-finite value: it counts as missing.
        json!({"student": coco(0.3, 0.5, Value::Null)}),
        &[eval(1, "student", 0.15), eval(2, "student", 0.3)],
    );
    // ema: one seed, with EMA stats and instability lines; the last student line counts.
    fake_run(
        &run_dir(out, "ema", 0),
        50.0,
        json!({"student": coco(0.5, 0.7, json!(0.4)), "ema": coco(0.6, 0.8, json!(0.45))}),
        &[
            eval(1, "student", 0.4),
            eval(1, "ema", 0.45),
            instability(1, "student", 0.4),
            instability(1, "ema", 0.1),
            instability(2, "student", 0.2),
        ],
    );
    // ema+a: killed before finishing (no summary.json): not counted.
    write(
        &run_dir(out, "ema+a", 0).join("metrics.jsonl"),
        &format!("{}\n", eval(1, "student", 0.9)),
    );

    let mut variants = Vec::new();
    for name in ["baseline", "ema", "ema+a"] {
        let runs = (0..2)
            .filter_map(|k| read_run(&run_dir(out, name, k), "AP").expect("read run"))
            .collect();
        variants.push(VariantRuns {
            name: name.to_string(),
            overrides: vec![format!("x.name=\"{name}\"")],
            student_of: None,
            runs,
        });
    }
    // ema-student: no runs of its own, the student of ema's.
    variants.push(VariantRuns {
        name: "ema-student".to_string(),
        overrides: Vec::new(),
        student_of: Some("ema".to_string()),
        runs: variants[1]
            .runs
            .iter()
            .map(|r| r.clone().student_only())
            .collect(),
    });
    let overrides = vec!["optim.epochs=3".to_string()];
    let report = aggregate(
        "toy",
        Path::new("configs/detr_shapes.toml"),
        &overrides,
        2,
        &variants,
        &ReportSpec {
            metrics: DETR_METRICS,
            labels: vec!["student".into(), "ema".into()],
        },
    );
    assert_eq!(
        report.total_wall_s, 350.0,
        "a borrowed student's run counts once"
    );
    let baseline = &report.variants[0];
    assert_eq!(
        baseline.student().curve,
        [(1.0, 0.1), (2.0, 0.2)],
        "mean curve"
    );

    let json = report.to_json();
    assert_eq!(json["experiment"], "toy");
    assert_eq!(json["config"], "configs/detr_shapes.toml");
    assert_eq!(json["seeds"], 2);
    let v = json["variants"].as_array().expect("variants");
    let names: Vec<&str> = v.iter().filter_map(|x| x["name"].as_str()).collect();
    assert_eq!(names, ["baseline", "ema", "ema+a", "ema-student"]);

    let b = &v[0];
    assert_eq!(b["seeds"], 2);
    assert!(close(&b["AP_mean"], 0.2), "{b}");
    assert!(close(&b["AP_std"], 0.02f64.sqrt()), "sample std: {b}");
    assert!(close(&b["AP50_mean"], 0.4), "{b}");
    assert!(
        close(&b["AP75_mean"], 0.05) && close(&b["AP75_std"], 0.0),
        "{b}"
    );
    for key in [
        "ema_AP_mean",
        "ema_AP_std",
        "ema_AP50_mean",
        "ema_AP75_mean",
    ] {
        assert!(b[key].is_null(), "{key}: {b}");
    }
    assert!(b["instability_mean"].is_null(), "{b}");
    assert!(close(&b["wall_s_mean"], 150.0), "{b}");

    let e = &v[1];
    assert_eq!(e["seeds"], 1);
    assert!(close(&e["AP_mean"], 0.5) && close(&e["AP_std"], 0.0), "{e}");
    assert!(
        close(&e["ema_AP_mean"], 0.6) && close(&e["ema_AP_std"], 0.0),
        "{e}"
    );
    assert!(close(&e["ema_AP50_mean"], 0.8), "{e}");
    assert!(close(&e["ema_AP75_mean"], 0.45), "{e}");
    assert!(close(&e["instability_mean"], 0.2), "last student line: {e}");
    assert!(close(&e["ema_instability_mean"], 0.1), "{e}");

    let a = &v[2];
    assert_eq!(a["seeds"], 0);
    for key in ["AP_mean", "AP_std", "instability_mean", "wall_s_mean"] {
        assert!(a[key].is_null(), "{key}: {a}");
    }
    assert!(a["student_of"].is_null(), "{a}");

    let s = &v[3];
    assert_eq!(s["student_of"], "ema");
    assert_eq!(s["seeds"], 1);
    assert!(close(&s["AP_mean"], 0.5), "ema's student: {s}");
    assert!(close(&s["instability_mean"], 0.2), "{s}");
    assert!(close(&s["wall_s_mean"], 50.0), "{s}");
    for key in ["ema_AP_mean", "ema_AP50_mean", "ema_instability_mean"] {
        assert!(s[key].is_null(), "not the student: {key}: {s}");
    }

    let md = report.to_markdown();
    let at = |name: &str| md.find(&format!("| {name} |")).expect(name);
    assert!(
        at("baseline") < at("ema") && at("ema") < at("ema+a"),
        "{md}"
    );
    assert!(md.contains("0.2000 ± 0.1414"), "{md}");
    assert!(md.contains("0.6000 ± 0.0000"), "{md}");
    assert!(
        md.contains(&format!("Backend `{}`", densekd::backend::name())),
        "{md}"
    );
    assert!(md.contains("`optim.epochs=3`"), "{md}");
    assert!(md.contains("350 s"), "{md}");
    assert!(
        md.contains("- `ema-student`: none; no runs of its own: the student of `ema`'s runs"),
        "{md}"
    );

    write_report(&report, out).expect("write report");
    for file in ["report.json", "report.md", "ap.png", "instability.png"] {
        assert!(out.join(file).is_file(), "{file}");
    }
    let text = std::fs::read_to_string(out.join("report.json")).expect("read report");
    let again: Value = serde_json::from_str(&text).expect("report.json is JSON");
    assert_eq!(again, json);
    assert!(
        b.get("extra_wall_s").is_none(),
        "no teacher, no extra cost: {b}"
    );

    // With a frozen teacher, each variant's cost beyond the baseline, plus the teacher's
    // training for a variant that distils from it (LGD's Table 7).
    fake_run(
        &out.join("teacher"),
        1000.0,
        json!({"student": coco(0.7, 0.9, json!(0.6))}),
        &[eval(1, "student", 0.7)],
    );
    variants[1].overrides = vec!["distill.teacher=\"{teacher}\"".to_string()];
    let mut report = aggregate(
        "toy",
        Path::new("configs/detr_shapes.toml"),
        &overrides,
        2,
        &variants,
        &ReportSpec {
            metrics: DETR_METRICS,
            labels: vec!["student".into(), "ema".into()],
        },
    );
    report.teacher = read_run(&out.join("teacher"), "AP").expect("teacher");
    let json = report.to_json();
    let extra: Vec<Value> = json["variants"]
        .as_array()
        .expect("variants")
        .iter()
        .map(|v| v["extra_wall_s"].clone())
        .collect();
    assert!(
        close(&extra[0], 0.0) && close(&extra[1], 50.0 - 150.0 + 1000.0),
        "{extra:?}"
    );
    assert!(extra[2].is_null(), "no finished run: {extra:?}");
    assert!(
        report.to_markdown().contains("| 900.0 |"),
        "{}",
        report.to_markdown()
    );
}

#[test]
fn malformed_run_files_are_named() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("run");
    write(&dir.join("summary.json"), r#"{"final": {}}"#);
    let e = read_run(&dir, "AP").expect_err("no wall_s");
    assert!(e.to_string().contains("summary.json") && e.to_string().contains("wall_s"));

    fake_run(
        &dir,
        1.0,
        json!({"student": coco(0.1, 0.2, json!(0.0))}),
        &[],
    );
    write(
        &dir.join("metrics.jsonl"),
        "{\"kind\":\"instability\",\"epoch\":1,\"model\":\"student\"}\n",
    );
    let e = read_run(&dir, "AP").expect_err("no fraction");
    let msg = e.to_string();
    assert!(
        msg.contains("metrics.jsonl") && msg.contains("line 1") && msg.contains("fraction"),
        "{msg}"
    );
}

/// A tiny run (`common::TINY_RUN`) of 1 epoch = 4 steps.
fn tiny() -> impl Iterator<Item = &'static str> {
    common::TINY_RUN.iter().copied().chain(["optim.epochs=1"])
}

/// The driver end to end on a 2-variant grid of 4-step runs (about 1 s each): train, add a
/// seed (only the new runs train), resume a run that lost its summary, refuse a changed config.
#[test]
fn tiny_grid_trains_reuses_resumes_and_refuses() {
    use densekd::experiment::run_experiment;
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("exp");
    let mut grid = lr_grid();
    grid.base_overrides = tiny().map(String::from).collect();
    let one = options(1, &out);
    let report = run_experiment(&grid, &one).expect("experiment");
    assert!(report.variants.iter().all(|v| v.seeds == 1), "{report:?}");
    for file in ["report.json", "report.md", "ap.png", "instability.png"] {
        assert!(out.join(file).is_file(), "{file}");
    }

    let two = ExperimentOptions { seeds: 2, ..one };
    let report = run_experiment(&grid, &two).expect("second seed");
    assert!(report.variants.iter().all(|v| v.seeds == 2), "{report:?}");
    let low1 = read_run(&run_dir(&out, "low", 1), "AP")
        .expect("read")
        .expect("finished");
    let low1_config =
        std::fs::read_to_string(run_dir(&out, "low", 1).join("config.toml")).expect("config");
    assert!(low1_config.contains("seed = 1"), "{low1_config}");
    assert!(!low1.curve.is_empty());

    // A run killed after its last checkpoint but before summary.json is resumed, not retrained,
    // and ends with the same numbers (CPU training is deterministic).
    let low0 = run_dir(&out, "low", 0);
    let before = read_run(&low0, "AP").expect("read").expect("finished");
    std::fs::remove_file(low0.join("summary.json")).expect("remove summary");
    let resumed = run_experiment(&grid, &two).expect("resume");
    let after = read_run(&low0, "AP")
        .expect("read")
        .expect("finished again");
    assert_eq!(after.final_stats, before.final_stats);
    assert_eq!(
        resumed.variants[0].student().stat("AP"),
        report.variants[0].student().stat("AP")
    );

    let changed = ExperimentOptions {
        overrides: vec!["optim.warmup_steps=1".into()],
        ..two
    };
    let e = run_experiment(&grid, &changed).expect_err("changed config");
    let msg = e.to_string();
    assert!(
        msg.contains("seed-0") && msg.contains("optim.warmup_steps"),
        "{msg}"
    );
}

/// `densekd experiment od-detr` through the CLI on 4-step runs: the five variants train in
/// order, the EMA variants report the teacher and the instability of both models, and the
/// report lists every variant.
#[test]
fn cli_runs_the_od_detr_grid() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("od");
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/detr_shapes.toml");
    let mut args = vec![
        "experiment".to_string(),
        "od-detr".to_string(),
        "--seeds".to_string(),
        "1".to_string(),
        "--config".to_string(),
        config.display().to_string(),
        "--out".to_string(),
        out.display().to_string(),
    ];
    for s in tiny().chain(["detr.eval.instability_images=4"]) {
        args.push("--set".to_string());
        args.push(s.to_string());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, _, stderr) = common::densekd(&refs);
    assert!(ok, "{stderr}");
    let report: Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).expect("report.json"))
            .expect("json");
    let variants = report["variants"].as_array().expect("variants");
    let names: Vec<&str> = variants.iter().filter_map(|v| v["name"].as_str()).collect();
    assert_eq!(names, ["baseline", "ema", "ema+a", "ema+a+b", "ema+a+b+c"]);
    assert!(
        variants[0]["ema_AP_mean"].is_null(),
        "the baseline has no teacher"
    );
    // The baseline is the EMA-only run's student, trained once.
    assert_eq!(variants[0]["student_of"], "ema");
    assert_eq!(variants[0]["AP_mean"], variants[1]["AP_mean"]);
    assert!(!out.join("baseline").exists(), "the baseline trains no run");
    for v in variants {
        assert_eq!(v["seeds"], 1);
        assert!(v["AP_mean"].is_number());
        assert!(v["instability_mean"].is_number(), "{v}");
    }
    for v in &variants[1..] {
        assert!(v["ema_AP_mean"].is_number(), "{v}");
    }
    let full =
        std::fs::read_to_string(out.join("ema+a+b+c/seed-0/metrics.jsonl")).expect("metrics");
    assert!(full.contains("loss_aux") && full.contains("loss_pd"));
    let md = std::fs::read_to_string(out.join("report.md")).expect("report.md");
    assert!(md.contains("ema+a+b+c"));
    assert!(out.join("ap.png").exists() && out.join("instability.png").exists());
}
