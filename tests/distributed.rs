//! `densekd launch`: multi-process data parallelism on loopback. A 2-process run equals the
//! 1-process run with the same global batch, repeats exactly, and a killed worker stops the
//! whole run, which then resumes with another process count.

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::lines;

/// `configs/detr_smoke.toml` (GroupNorm, no pretrained weights): 4 steps per epoch.
fn smoke_args(out: &Path, extra: &[&str]) -> Vec<String> {
    config_args("detr_smoke.toml", out, extra)
}

/// `train configs/NAME --out OUT --set …`.
fn config_args(name: &str, out: &Path, extra: &[&str]) -> Vec<String> {
    let config = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("configs")
        .join(name);
    let mut args = vec![
        "train".to_string(),
        config.display().to_string(),
        "--out".to_string(),
        out.display().to_string(),
    ];
    for set in extra {
        args.push("--set".to_string());
        args.push(set.to_string());
    }
    args
}

/// A port with the next `n` ports free too, for one launch's orchestrator and workers.
fn free_ports(n: u16) -> u16 {
    let seed = std::process::id() as u64 * 7919
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() as u64);
    for attempt in 0..200u64 {
        let base = 20_000 + ((seed + attempt * 104_729) % 30_000) as u16;
        if (0..=n).all(|k| TcpListener::bind(("0.0.0.0", base + k)).is_ok()) {
            return base;
        }
    }
    panic!("no free ports");
}

fn launch_command(nproc: u16, train: &[String]) -> Command {
    let base = free_ports(nproc);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_densekd"));
    cmd.args([
        "launch",
        "--nproc",
        &nproc.to_string(),
        "--coordinator",
        &format!("127.0.0.1:{base}"),
        "--timeout",
        "60",
        "--",
    ])
    .args(train)
    .env_remove("DENSEKD_RANK");
    cmd
}

/// Runs `densekd launch --nproc N -- train …` to the end: (success, stderr).
fn launch(nproc: u16, train: &[String]) -> (bool, String) {
    let out = launch_command(nproc, train).output().expect("launch runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `densekd train …` in one process (not a worker) and asserts that it succeeded.
fn train_alone(train: &[String]) {
    let out = Command::new(env!("CARGO_BIN_EXE_densekd"))
        .args(train)
        .env_remove("DENSEKD_RANK")
        .output()
        .expect("train runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `train` lines' losses by step.
fn losses(dir: &Path) -> Vec<(u64, f64)> {
    lines(dir)
        .iter()
        .filter(|l| l["kind"] == "train")
        .map(|l| {
            (
                l["step"].as_u64().expect("step"),
                l["loss"].as_f64().expect("loss"),
            )
        })
        .collect()
}

fn final_ap(dir: &Path) -> f64 {
    lines(dir)
        .iter()
        .rfind(|l| l["kind"] == "eval" && l["model"] == "student")
        .and_then(|l| l["AP"].as_f64())
        .expect("a final evaluation")
}

/// An exported model's header (as JSON: its metadata's key order varies) and tensor bytes.
fn safetensors(dir: &Path) -> (serde_json::Value, Vec<u8>) {
    let bytes = std::fs::read(dir.join("model.safetensors")).expect("weights");
    let len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + len]).expect("header");
    (header, bytes[8 + len..].to_vec())
}

#[test]
fn two_processes_equal_one_process_with_the_same_global_batch_and_repeat_exactly() {
    let tmp = tempfile::tempdir().expect("tmp");
    let one = tmp.path().join("one");
    train_alone(&smoke_args(&one, &["optim.replicas=2"]));
    let runs: Vec<_> = ["two-a", "two-b"]
        .iter()
        .map(|name| {
            let dir = tmp.path().join(name);
            let (ok, stderr) = launch(2, &smoke_args(&dir, &[]));
            assert!(ok, "{stderr}");
            dir
        })
        .collect();

    let reference = losses(&one);
    let distributed = losses(&runs[0]);
    assert_eq!(reference.len(), 8, "{reference:?}");
    assert_eq!(
        reference.iter().map(|l| l.0).collect::<Vec<_>>(),
        distributed.iter().map(|l| l.0).collect::<Vec<_>>()
    );
    for ((step, a), (_, b)) in reference.iter().zip(&distributed) {
        assert!(
            (a - b).abs() <= 1e-5 * a.abs(),
            "step {step}: 1 process {a}, 2 processes {b}"
        );
    }
    assert!((final_ap(&one) - final_ap(&runs[0])).abs() < 1e-3);

    // Two 2-process runs: the same losses, metrics and exported weights, bit for bit.
    assert_eq!(losses(&runs[0]), losses(&runs[1]));
    assert_eq!(final_ap(&runs[0]), final_ap(&runs[1]));
    assert_eq!(safetensors(&runs[0]), safetensors(&runs[1]));
    // Only rank 0 wrote the run folder, once per step.
    let steps: Vec<u64> = lines(&runs[0])
        .iter()
        .filter(|l| l["kind"] == "train")
        .map(|l| l["step"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(steps, (1..=8).collect::<Vec<_>>());
}

/// Trains `train` (a `train …` command line) in one process with 2 thread replicas and with
/// `launch --nproc 2` on one replica each; every step's loss agrees to 1e-5 relative.
fn assert_two_processes_match_two_replicas(train: impl Fn(&Path, &str) -> Vec<String>) {
    let tmp = tempfile::tempdir().expect("tmp");
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    train_alone(&train(&one, "optim.replicas=2"));
    let (ok, stderr) = launch(2, &train(&two, "optim.replicas=1"));
    assert!(ok, "{stderr}");
    let (a, b) = (losses(&one), losses(&two));
    assert!(!a.is_empty() && a.len() == b.len(), "{a:?} vs {b:?}");
    for ((step, x), (_, y)) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-5 * x.abs(), "step {step}: {x} vs {y}");
    }
}

#[test]
fn every_distiller_kind_trains_on_two_processes_as_on_two_replicas() {
    // An EMA teacher (OD-DETR, all three mechanisms).
    assert_two_processes_match_two_replicas(|out, replicas| {
        smoke_args(out, &[replicas, "distill.method=\"od-detr\""])
    });
    // Trainable distiller modules in their own parameter group (LGD's implicit teacher).
    assert_two_processes_match_two_replicas(|out, replicas| {
        config_args(
            "fcos_smoke.toml",
            out,
            &[
                replicas,
                "distill.method=\"lgd\"",
                "distill.distill_warmup_steps=2",
            ],
        )
    });
    // A frozen teacher from a finished run (DeepLabV3 KD with RDD), memorising 4 images that
    // are also its validation split.
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let synth = Command::new(env!("CARGO_BIN_EXE_densekd"))
        .args([
            "data", "synth", "--train", "4", "--val", "1", "--size", "64", "--out",
        ])
        .arg(&data)
        .output()
        .expect("synth runs");
    assert!(
        synth.status.success(),
        "{}",
        String::from_utf8_lossy(&synth.stderr)
    );
    let folder = |key: &str, sub: &str| format!("data.segmentation.{key}={:?}", data.join(sub));
    let mut sets = vec![
        folder("train_images", "images/train"),
        folder("train_labels", "labels/train"),
        folder("val_images", "images/train"),
        folder("val_labels", "labels/train"),
        "data.seg_augment.hflip_prob=0.0".to_string(),
        "data.seg_augment.vflip_prob=0.0".to_string(),
        "data.seg_augment.transpose_prob=0.0".to_string(),
        "data.segmentation.class_names=[\"background\",\"circle\",\"square\",\"triangle\",\
         \"ellipse\",\"cross\",\"star\",\"ring\",\"frame\"]"
            .to_string(),
    ];
    let teacher = tmp.path().join("teacher");
    let teacher_sets: Vec<&str> = sets
        .iter()
        .map(String::as_str)
        .chain(["optim.epochs=60", "optim.lr=5e-3", "eval.every_epochs=60"])
        .collect();
    train_alone(&config_args(
        "deeplabv3_smoke.toml",
        &teacher,
        &teacher_sets,
    ));
    sets.push(format!(
        "distill.teacher={:?}",
        teacher.display().to_string()
    ));
    assert_two_processes_match_two_replicas(|out, replicas| {
        let student: Vec<&str> = sets
            .iter()
            .map(String::as_str)
            .chain([
                replicas,
                "optim.epochs=6",
                "distill.method=\"seg-kd\"",
                "distill.kd.weight=1.0",
                "distill.rdd.tfe_fraction=0.5",
                // Thread replicas refuse dropout (their masks are drawn concurrently).
                "deeplabv3.model.aspp_dropout=0",
                "deeplabv3.model.aux_dropout=0",
            ])
            .collect();
        config_args("deeplabv3_smoke.toml", out, &student)
    });
}

/// The worker processes `densekd launch` (pid `launcher`) started, by rank.
fn workers(launcher: u32) -> Vec<(usize, u32)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The parent pid is the second field after the parenthesised command name.
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let ppid = after.split_whitespace().nth(1).and_then(|p| p.parse().ok());
        if ppid != Some(launcher) {
            continue;
        }
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let rank = environ
            .split(|&b| b == 0)
            .filter_map(|kv| std::str::from_utf8(kv).ok())
            .find_map(|kv| kv.strip_prefix("DENSEKD_RANK="))
            .and_then(|r| r.parse().ok());
        if let Some(rank) = rank {
            out.push((rank, pid));
        }
    }
    out.sort();
    out
}

fn wait_for(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(status) = child.try_wait().expect("wait") {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn a_killed_worker_stops_every_worker_and_the_run_resumes_with_another_process_count() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("run");
    // 3 ranks on batches of 4 images split in 2-image shards: rank 2 has no shard of its own
    // and takes part with zero-weight gradients.
    let args = smoke_args(&dir, &["optim.epochs=40"]);
    let stderr_path = tmp.path().join("stderr.txt");
    let mut launcher = launch_command(3, &args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
        .spawn()
        .expect("launch starts");
    let start = Instant::now();
    while !dir.join("checkpoints/latest.json").exists() {
        assert!(start.elapsed() < Duration::from_secs(120), "no checkpoint");
        assert!(
            launcher.try_wait().expect("wait").is_none(),
            "launch ended early"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let ranks = workers(launcher.id());
    assert_eq!(ranks.iter().map(|r| r.0).collect::<Vec<_>>(), vec![0, 1, 2]);
    let victim = ranks[1].1;
    let killed = Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());

    let status = wait_for(&mut launcher, Duration::from_secs(30)).expect("launch stops");
    assert!(!status.success());
    let stderr = std::fs::read_to_string(&stderr_path).expect("stderr");
    assert!(
        stderr.contains(&format!("rank 1 (pid {victim}) was killed")),
        "{stderr}"
    );
    for (rank, pid) in &ranks {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "rank {rank} (pid {pid}) still runs"
        );
    }

    // The last checkpoint is intact: two processes continue it to the end.
    let stopped_at = losses(&dir).last().map_or(0, |l| l.0);
    let mut resume = args.clone();
    resume.push("--resume".to_string());
    let (ok, stderr) = launch(2, &resume);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("resuming"), "{stderr}");
    let steps: Vec<u64> = losses(&dir).iter().map(|l| l.0).collect();
    assert_eq!(
        steps,
        (1..=160).collect::<Vec<_>>(),
        "stopped at {stopped_at}"
    );
    assert!(dir.join("summary.json").exists());
}

#[test]
fn launch_refuses_a_bad_command_and_a_busy_port() {
    let (ok, stderr) = {
        let out = Command::new(env!("CARGO_BIN_EXE_densekd"))
            .args(["launch", "--nproc", "2", "--", "eval", "coco"])
            .output()
            .expect("runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert!(!ok && stderr.contains("must be `train CONFIG"), "{stderr}");

    let busy = TcpListener::bind(("0.0.0.0", 0)).expect("bind");
    let port = busy.local_addr().expect("addr").port();
    let out = Command::new(env!("CARGO_BIN_EXE_densekd"))
        .args([
            "launch",
            "--coordinator",
            &format!("127.0.0.1:{port}"),
            "--",
            "train",
            "x.toml",
        ])
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("port {port} (the orchestrator)")),
        "{stderr}"
    );
}

#[test]
fn a_worker_stops_naming_the_coordinator_it_cannot_reach() {
    let tmp = tempfile::tempdir().expect("tmp");
    let base = free_ports(1);
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_densekd"))
        .args(smoke_args(&tmp.path().join("run"), &[]))
        .env("DENSEKD_RANK", "1")
        .env("DENSEKD_WORLD_SIZE", "2")
        .env("DENSEKD_COORDINATOR", format!("127.0.0.1:{base}"))
        .env("DENSEKD_NODE_ADDRESS", format!("127.0.0.1:{}", base + 1))
        .env("DENSEKD_TIMEOUT_S", "3")
        .output()
        .expect("train runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(start.elapsed() < Duration::from_secs(60));
    assert!(
        stderr.contains(&format!(
            "rank 1 of 2, joining (coordinator 127.0.0.1:{base}"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("within 3 s"), "{stderr}");
}

#[test]
fn a_step_that_is_not_finite_is_skipped_or_stops_on_every_worker_alike() {
    let tmp = tempfile::tempdir().expect("tmp");
    let sets = [
        "optim.lr=1e30",
        "optim.warmup_steps=1000000",
        "optim.skip_nonfinite=1",
    ];
    let (ok, stderr) = launch(2, &smoke_args(&tmp.path().join("run"), &sets));
    assert!(!ok, "{stderr}");
    // Rank 0 alone warns about the skipped batch; both workers then stop at the next one.
    assert_eq!(common::skip_warnings(&stderr), 1, "{stderr}");
    // Every worker's reason, on every worker.
    assert!(
        stderr.contains("not finite (rank 0: ") && stderr.contains("; rank 1: "),
        "{stderr}"
    );
    assert!(stderr.contains("exited with status 1"), "{stderr}");
}
