//! `densekd launch`: multi-process data-parallel training, like `torchrun`. On node 0 it runs
//! burn-collective's orchestrator; on every node it starts one `densekd train` worker per
//! local rank with its place in the world in the environment ([`crate::train::collective`]),
//! and when a worker fails it stops the others at once, naming the rank.

use std::ffi::OsString;
use std::net::TcpListener;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use clap::Args;

use crate::error::{Error, Result};
use crate::train::collective::{
    port_of, start_orchestrator, ENV_COORDINATOR, ENV_LOCAL_RANK, ENV_NODE, ENV_RANK, ENV_TIMEOUT,
    ENV_WORLD,
};

/// `densekd launch` arguments.
#[derive(Args, Debug)]
pub struct LaunchArgs {
    /// Worker processes on this node.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub nproc: u16,
    /// Nodes (machines) in the run, each running `densekd launch` with its own --node-rank.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub nodes: u16,
    /// This node's rank, 0 to nodes − 1; node 0 runs the orchestrator.
    #[arg(long, default_value_t = 0)]
    pub node_rank: u16,
    /// The orchestrator's address, HOST:PORT, as every node reaches it.
    #[arg(long, default_value = "127.0.0.1:29500")]
    pub coordinator: String,
    /// This node's address as the other nodes reach it (required with --nodes > 1).
    #[arg(long)]
    pub host: Option<String>,
    /// First port of this node's workers' tensor transfers (one per worker; default: the
    /// coordinator's port + 1).
    #[arg(long)]
    pub port: Option<u16>,
    /// Seconds a worker waits for the others (joining, each step, rank 0's evaluations)
    /// before it stops with an error.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub timeout: u64,
    /// The command each worker runs: `train CONFIG [--set …] [--out DIR] [--resume]`.
    #[arg(last = true, required = true)]
    pub command: Vec<OsString>,
}

/// Refuses a port another process listens on, naming what it is for.
fn check_free(port: u16, what: &str) -> Result<()> {
    TcpListener::bind(("0.0.0.0", port)).map(drop).map_err(|e| {
        Error::config(
            "--port",
            format!("port {port} ({what}) cannot be used: {e}; choose another with --coordinator or --port"),
        )
    })
}

/// Describes how a worker ended.
fn describe(status: ExitStatus) -> String {
    match status.code() {
        Some(code) => format!("exited with status {code}"),
        None => format!("was killed ({status})"),
    }
}

/// Starts this node's workers and waits for them; the first failure stops the rest.
pub fn launch(args: LaunchArgs) -> Result<()> {
    let (nproc, nodes, node_rank) = (
        usize::from(args.nproc),
        usize::from(args.nodes),
        usize::from(args.node_rank),
    );
    if node_rank >= nodes {
        return Err(Error::config(
            "--node-rank",
            format!("{node_rank} is not below --nodes {nodes}"),
        ));
    }
    if args.command.first().and_then(|c| c.to_str()) != Some("train") {
        return Err(Error::config(
            "launch",
            "the workers' command must be `train CONFIG …` (after `--`)",
        ));
    }
    let host = match (&args.host, nodes) {
        (Some(host), _) => host.clone(),
        (None, 1) => "127.0.0.1".to_string(),
        (None, _) => {
            return Err(Error::config(
                "--host",
                "with --nodes > 1, give this node's address as the other nodes reach it",
            ))
        }
    };
    let coordinator_port = port_of(&args.coordinator)?;
    let first_port = match args.port {
        Some(port) => port,
        None => coordinator_port.checked_add(1).ok_or_else(|| {
            Error::config("--coordinator", "the port leaves no room for the workers'")
        })?,
    };
    if node_rank == 0 {
        check_free(coordinator_port, "the orchestrator")?;
    }
    let ports: Vec<u16> = (0..nproc)
        .map(|k| {
            u16::try_from(usize::from(first_port) + k)
                .map_err(|_| Error::config("--port", "the workers' ports run past 65535"))
        })
        .collect::<Result<_>>()?;
    for (k, port) in ports.iter().enumerate() {
        check_free(*port, &format!("worker {k}'s tensor transfers"))?;
    }
    if node_rank == 0 {
        start_orchestrator(coordinator_port)?;
    }
    let exe = std::env::current_exe().map_err(|e| Error::config("launch", e.to_string()))?;
    let world = nproc * nodes;
    let mut workers: Vec<(usize, Child)> = Vec::new();
    for (k, port) in ports.iter().enumerate() {
        let rank = node_rank * nproc + k;
        let child = Command::new(&exe)
            .args(&args.command)
            .env(ENV_RANK, rank.to_string())
            .env(ENV_LOCAL_RANK, k.to_string())
            .env(ENV_WORLD, world.to_string())
            .env(ENV_COORDINATOR, &args.coordinator)
            .env(ENV_NODE, format!("{host}:{port}"))
            .env(ENV_TIMEOUT, args.timeout.to_string())
            .stdin(Stdio::null())
            .spawn();
        match child {
            Ok(child) => workers.push((rank, child)),
            Err(e) => {
                stop(&mut workers);
                return Err(Error::config(
                    "launch",
                    format!("cannot start rank {rank}: {e}"),
                ));
            }
        }
    }
    eprintln!(
        "launched ranks {}..{} of {world} (orchestrator {})",
        node_rank * nproc,
        node_rank * nproc + nproc - 1,
        args.coordinator
    );
    wait_all(workers)
}

/// Kills and reaps the remaining workers.
fn stop(workers: &mut [(usize, Child)]) {
    for (_, child) in workers.iter_mut() {
        let _ = child.kill();
    }
    for (_, child) in workers.iter_mut() {
        let _ = child.wait();
    }
}

/// Waits until every worker succeeded, or one failed (the others are then stopped).
fn wait_all(mut workers: Vec<(usize, Child)>) -> Result<()> {
    loop {
        let mut k = 0;
        while k < workers.len() {
            let (rank, child) = &mut workers[k];
            let (rank, pid) = (*rank, child.id());
            match child.try_wait() {
                Ok(None) => k += 1,
                Ok(Some(status)) if status.success() => {
                    workers.remove(k);
                }
                outcome => {
                    let how = match outcome {
                        Ok(Some(status)) => describe(status),
                        Err(e) => format!("could not be waited for ({e})"),
                        Ok(None) => unreachable!("matched above"),
                    };
                    workers.remove(k);
                    let others = workers.len();
                    stop(&mut workers);
                    return Err(Error::config(
                        "launch",
                        format!(
                            "rank {rank} (pid {pid}) {how}; stopped the {others} other worker(s) \
                             of this node. The run folder keeps its last checkpoint: launch \
                             again with `train … --resume` to continue"
                        ),
                    ));
                }
            }
        }
        if workers.is_empty() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
