//! Multi-process data parallelism on burn-collective, the only module that calls it (burn's
//! `main` branch rewrites that crate; densekd stays on 0.21): a worker joins the collective
//! that `densekd launch` set up, and every optimiser step exchanges, in two all-reduces, the
//! step's status and loss-term names, then the loss values, the gradients of every parameter
//! group and rank 0's buffers. Each call runs under a watchdog, so a dead peer or an
//! unreachable coordinator becomes an error naming the rank and the address, never a hang.

use std::collections::BTreeSet;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor, TensorData, TensorPrimitive};
use burn_collective::{AllReduceStrategy, CollectiveConfig, PeerId, ReduceOperation};
use burn_communication::Address;

use crate::error::{Error, Result};
use crate::task::{ParamGroup, Stats};
use crate::train::step::{StepError, StepGrads};

/// The worker's rank (0-based, over all nodes).
pub const ENV_RANK: &str = "DENSEKD_RANK";
/// The worker's rank among the workers of its machine (its GPU with CUDA).
pub const ENV_LOCAL_RANK: &str = "DENSEKD_LOCAL_RANK";
/// The number of workers over all nodes.
pub const ENV_WORLD: &str = "DENSEKD_WORLD_SIZE";
/// The orchestrator's `host:port`.
pub const ENV_COORDINATOR: &str = "DENSEKD_COORDINATOR";
/// This worker's `host:port` for tensor transfers, reachable by the other nodes.
pub const ENV_NODE: &str = "DENSEKD_NODE_ADDRESS";
/// Seconds a collective call may wait for the other workers.
pub const ENV_TIMEOUT: &str = "DENSEKD_TIMEOUT_S";

/// Bytes of text each rank may put in the status exchange (its loss-term names, or why its
/// step failed).
const TEXT_BYTES: usize = 1024;
/// Marks a rank's status text as the reason its step failed.
const FAILED: char = '\u{1}';

/// This process's place in a multi-process run, as `densekd launch` describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct World {
    /// Rank of this worker.
    pub rank: usize,
    /// Rank among the workers of its machine.
    pub local_rank: usize,
    /// Number of workers.
    pub size: usize,
    /// The orchestrator's `host:port`.
    pub coordinator: String,
    /// This worker's `host:port` for tensor transfers.
    pub node: String,
    /// How long a collective call may wait for the others.
    pub timeout: Duration,
}

impl World {
    /// The world `densekd launch` set in the environment, or `None` for a single process.
    pub fn from_env() -> Result<Option<World>> {
        let Ok(rank) = std::env::var(ENV_RANK) else {
            return Ok(None);
        };
        let var = |name: &str| {
            std::env::var(name)
                .map_err(|_| Error::config(name, format!("{ENV_RANK} is set but {name} is not")))
        };
        let number = |name: &str, text: &str| {
            text.parse::<usize>()
                .map_err(|_| Error::config(name, format!("`{text}` is not a whole number")))
        };
        let world = World {
            rank: number(ENV_RANK, &rank)?,
            local_rank: match std::env::var(ENV_LOCAL_RANK) {
                Ok(text) => number(ENV_LOCAL_RANK, &text)?,
                Err(_) => 0,
            },
            size: number(ENV_WORLD, &var(ENV_WORLD)?)?,
            coordinator: var(ENV_COORDINATOR)?,
            node: var(ENV_NODE)?,
            timeout: Duration::from_secs(number(ENV_TIMEOUT, &var(ENV_TIMEOUT)?)? as u64),
        };
        if world.rank >= world.size {
            return Err(Error::config(
                ENV_RANK,
                format!("rank {} of a world of {}", world.rank, world.size),
            ));
        }
        Ok(Some(world))
    }

    /// Whether this worker writes the run folder (rank 0).
    pub fn is_leader(&self) -> bool {
        self.rank == 0
    }
}

/// The port of a `host:port` address.
pub fn port_of(address: &str) -> Result<u16> {
    address
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .ok_or_else(|| Error::config("address", format!("`{address}` is not HOST:PORT")))
}

/// Runs burn-collective's orchestrator on `port` for the rest of this process.
pub fn start_orchestrator(port: u16) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| Error::config("launch", format!("cannot start the orchestrator: {e}")))?;
    std::thread::spawn(move || {
        runtime.block_on(burn_collective::start_global_orchestrator(port));
    });
    Ok(())
}

/// A joined collective of [`World::size`] workers, one per process, on backend `B` (the inner,
/// non-autodiff backend).
#[derive(Debug)]
pub struct Collective<B: Backend> {
    world: World,
    device: B::Device,
    /// Whether rank 0 has printed the size of a step's exchange.
    announced: AtomicBool,
}

impl<B: Backend> Collective<B> {
    /// Registers this worker with the orchestrator and waits for every other one.
    pub fn join(world: &World, device: &B::Device) -> Result<Self> {
        let address = |a: &str| {
            Address::from_str(&format!("ws://{a}"))
                .map_err(|e| Error::config("address", format!("{a}: {e}")))
        };
        let config = CollectiveConfig::default()
            .with_num_devices(1)
            .with_num_nodes(world.size as u32)
            .with_global_address(address(&world.coordinator)?)
            .with_node_address(address(&world.node)?)
            .with_data_service_port(port_of(&world.node)?)
            .with_global_all_reduce_strategy(AllReduceStrategy::Ring);
        let collective = Collective {
            world: world.clone(),
            device: device.clone(),
            announced: AtomicBool::new(false),
        };
        let (peer, device) = (PeerId(world.rank as u32), device.clone());
        collective.watched("joining", move || {
            burn_collective::register::<B>(peer, device, config)
        })?;
        Ok(collective)
    }

    /// Runs a collective call on a helper thread, giving up after the world's timeout.
    fn watched<T: Send + 'static>(
        &self,
        what: &str,
        call: impl FnOnce() -> std::result::Result<T, burn_collective::CollectiveError> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // The receiver is gone only when this call already gave up.
            let _ = tx.send(call());
        });
        let w = &self.world;
        let context = format!(
            "rank {} of {}, {what} (coordinator {}, this worker {})",
            w.rank, w.size, w.coordinator, w.node
        );
        match rx.recv_timeout(w.timeout) {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(Error::config("collective", format!("{context}: {e:?}"))),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(Error::config(
                "collective",
                format!(
                    "{context}: no answer from the other workers within {} s; one of them \
                     stopped or the coordinator is unreachable",
                    w.timeout.as_secs()
                ),
            )),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(Error::config(
                "collective",
                format!("{context}: the collective call failed"),
            )),
        }
    }

    /// The element-wise sum of `values` over all workers, read back to the host.
    pub fn sum(&self, values: Vec<f32>, what: &str) -> Result<Vec<f32>> {
        let n = values.len();
        let tensor = Tensor::<B, 1>::from_data(TensorData::new(values, [n]), &self.device);
        self.sum_tensor(tensor, what)
    }

    /// The element-wise sum of `tensor` over all workers, read back to the host.
    fn sum_tensor(&self, tensor: Tensor<B, 1>, what: &str) -> Result<Vec<f32>> {
        let primitive = tensor.into_primitive().tensor();
        let peer = PeerId(self.world.rank as u32);
        let summed = self.watched(what, move || {
            burn_collective::all_reduce::<B>(peer, primitive, ReduceOperation::Sum)
        })?;
        Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(summed))
            .into_data()
            .to_vec::<f32>()
            .map_err(|e| Error::config("collective", format!("{e:?}")))
    }

    /// Waits until every worker gets here.
    pub fn barrier(&self, what: &str) -> Result<()> {
        self.sum(vec![0.0; self.world.size], what).map(|_| ())
    }

    /// Refuses to train when a worker starts from another step or other weights than rank 0
    /// (another seed, weights file or checkpoint, or another build).
    pub fn check_same_start<A, M>(&self, model: &M, step: usize) -> Result<()>
    where
        A: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<A>,
    {
        let mut print = Fingerprint::<A> {
            sum: 0.0,
            abs: 0.0,
            _backend: std::marker::PhantomData,
        };
        model.visit(&mut print);
        let (rank, size) = (self.world.rank, self.world.size);
        let mut slots = vec![0.0f32; 3 * size];
        slots[3 * rank..3 * rank + 3].copy_from_slice(&[
            step as f32,
            print.sum as f32,
            print.abs as f32,
        ]);
        let all = self.sum(slots, "comparing the workers' starting points")?;
        for r in 1..size {
            if all[3 * r..3 * r + 3] != all[..3] {
                return Err(Error::config(
                    "collective",
                    format!(
                        "rank {r} starts at step {} with weights whose sum is {}, rank 0 at step                          {} with {}: every worker must run the same build on the same config,                          weights and run folder",
                        all[3 * r], all[3 * r + 1], all[0], all[1]
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Leaves the collective.
    pub fn finish(self) -> Result<()> {
        let peer = PeerId(self.world.rank as u32);
        self.watched("leaving", move || {
            burn_collective::finish_collective::<B>(peer)
        })
    }
}

/// Sums of the values and of their magnitudes over every float tensor of a module.
struct Fingerprint<B> {
    sum: f64,
    abs: f64,
    _backend: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Fingerprint<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let value = param.val().inner();
        self.sum += value.clone().sum().into_scalar().elem::<f64>();
        self.abs += value.abs().sum().into_scalar().elem::<f64>();
    }
}

/// One float slot per byte of `text` (at most [`TEXT_BYTES`]; longer text is cut).
fn text_slots(text: &str) -> Vec<f32> {
    let mut slots = vec![0.0; TEXT_BYTES];
    for (slot, byte) in slots.iter_mut().zip(text.bytes()) {
        *slot = f32::from(byte);
    }
    slots
}

fn slots_text(slots: &[f32]) -> String {
    let bytes: Vec<u8> = slots
        .iter()
        .map(|&v| v as u8)
        .take_while(|&b| b != 0)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Packs every trainable parameter's gradient (zeros where this rank has none) after one
/// presence flag per group, and every other float tensor (buffers, frozen weights) as rank 0
/// holds it (zeros elsewhere, so the sum is rank 0's value exactly).
struct Pack<'a, B: AutodiffBackend> {
    groups: &'a [ParamGroup],
    leader: bool,
    parts: Vec<Tensor<B::InnerBackend, 1>>,
    /// Values of trainable parameters' gradients, and of everything else.
    counts: (usize, usize),
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Pack<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let value = param.val();
        let numel = value.shape().num_elements();
        let device = value.device();
        let zeros = || Tensor::<B::InnerBackend, 1>::zeros([numel], &device);
        if value.is_require_grad() {
            let mut presence = vec![0.0f32; self.groups.len()];
            let mut grad = None;
            for (g, group) in self.groups.iter().enumerate() {
                if let Some(t) = group.grads.get::<B::InnerBackend, D>(param.id) {
                    presence[g] = 1.0;
                    grad = Some(t.reshape([numel]));
                }
            }
            let n = presence.len();
            self.parts
                .push(Tensor::from_data(TensorData::new(presence, [n]), &device));
            self.parts.push(grad.unwrap_or_else(zeros));
            self.counts.0 += numel;
        } else {
            self.parts.push(match self.leader {
                true => value.inner().reshape([numel]),
                false => zeros(),
            });
            self.counts.1 += numel;
        }
    }
}

/// Reads the summed vector back in [`Pack`]'s order: gradients into their groups, buffers
/// into the model.
struct Unpack<'a> {
    summed: &'a [f32],
    groups: &'a mut [ParamGroup],
    offset: usize,
    error: Option<String>,
}

impl Unpack<'_> {
    fn take(&mut self, len: usize) -> &[f32] {
        let part = &self.summed[self.offset..self.offset + len];
        self.offset += len;
        part
    }
}

impl<B: AutodiffBackend> ModuleMapper<B> for Unpack<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, value, mapper) = param.consume();
        let (dims, device) = (value.dims(), value.device());
        let numel = dims.iter().product();
        let read = |values: &[f32]| {
            Tensor::<B::InnerBackend, D>::from_data(TensorData::new(values.to_vec(), dims), &device)
        };
        let value = if value.is_require_grad() {
            let n = self.groups.len();
            let flags = self.take(n).to_vec();
            let present: Vec<usize> = (0..n).filter(|&g| flags[g] > 0.0).collect();
            let grad = read(self.take(numel));
            match present[..] {
                [] => {}
                [g] => self.groups[g].grads.register(id, grad),
                _ => {
                    self.error = Some(format!(
                        "a parameter has gradients in groups {present:?} on different workers"
                    ))
                }
            }
            value
        } else {
            Tensor::from_inner(read(self.take(numel)))
        };
        Param::from_mapped_value(id, value, mapper)
    }
}

impl<B: Backend> Collective<B> {
    /// Sums one step's local result over all workers: the gradients of every group and the
    /// logged values (each worker's shards are already weighted by their share of the global
    /// batch), and sets every buffer to rank 0's. A step that failed on any worker fails on
    /// all of them, with the failing workers' reasons; returns the model with rank 0's buffers
    /// and the seconds spent exchanging.
    pub(super) fn reduce_step<A, M>(
        &self,
        model: M,
        local: std::result::Result<StepGrads, StepError>,
        log: bool,
    ) -> (M, std::result::Result<StepGrads, StepError>, f64)
    where
        A: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<A>,
    {
        let start = Instant::now();
        let result = self.exchange(model, local, log);
        let seconds = start.elapsed().as_secs_f64();
        match result {
            Ok((model, step)) => (model, step, seconds),
            Err((model, e)) => (model, Err(e), seconds),
        }
    }

    #[allow(clippy::type_complexity)]
    fn exchange<A, M>(
        &self,
        model: M,
        local: std::result::Result<StepGrads, StepError>,
        log: bool,
    ) -> std::result::Result<(M, std::result::Result<StepGrads, StepError>), (M, StepError)>
    where
        A: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<A>,
    {
        let (rank, size) = (self.world.rank, self.world.size);
        let local = match local {
            Err(StepError::Failed(e)) => return Err((model, StepError::Failed(e))),
            other => other,
        };
        // Status: [failed, total], then every rank's text (its term names or its failure).
        let (failed, total, text) = match &local {
            Ok(step) => {
                let names = step.values.as_ref().map(|values| {
                    values
                        .iter()
                        .map(|(k, _)| k.as_str())
                        .collect::<Vec<_>>()
                        .join("\n")
                });
                (0.0, step.total as f32, names.unwrap_or_default())
            }
            Err(StepError::NotFinite(what)) => (1.0, 0.0, format!("{FAILED}{what}")),
            Err(StepError::Failed(_)) => unreachable!("returned above"),
        };
        if failed == 0.0 && text.len() > TEXT_BYTES {
            return Err((
                model,
                StepError::Failed(Error::config(
                    "collective",
                    format!("the loss-term names exceed {TEXT_BYTES} bytes"),
                )),
            ));
        }
        let mut status = vec![failed, total];
        status.extend((0..size).flat_map(|r| match r == rank {
            true => text_slots(&text),
            false => vec![0.0; TEXT_BYTES],
        }));
        let status = match self.sum(status, "exchanging the step status") {
            Ok(s) => s,
            Err(e) => return Err((model, StepError::Failed(e))),
        };
        let texts: Vec<String> = (0..size)
            .map(|r| slots_text(&status[2 + r * TEXT_BYTES..2 + (r + 1) * TEXT_BYTES]))
            .collect();
        if status[0] > 0.0 {
            let reasons = texts
                .iter()
                .enumerate()
                .filter_map(|(r, t)| Some(format!("rank {r}: {}", t.strip_prefix(FAILED)?)))
                .collect::<Vec<_>>()
                .join("; ");
            return Ok((model, Err(StepError::NotFinite(reasons))));
        }
        let Ok(mut step) = local else {
            unreachable!("a failed step is reported above")
        };
        // The union of the ranks' term names, in rank order (a shard may lack a term).
        let mut names: Vec<String> = Vec::new();
        let mut seen = BTreeSet::new();
        if log {
            for name in texts.iter().flat_map(|t| t.split('\n')) {
                if !name.is_empty() && seen.insert(name.to_string()) {
                    names.push(name.to_string());
                }
            }
        }
        let own: Stats = step.values.take().unwrap_or_default();
        let values: Vec<f32> = names
            .iter()
            .map(|k| {
                own.iter()
                    .find(|(name, _)| name == k)
                    .map_or(0.0, |(_, v)| *v as f32)
            })
            .collect();
        let mut pack = Pack::<A> {
            groups: &step.groups,
            leader: rank == 0,
            parts: Vec::new(),
            counts: (0, 0),
        };
        model.visit(&mut pack);
        let n_values = names.len();
        let packed: usize = pack.parts.iter().map(|p| p.dims()[0]).sum();
        if rank == 0 && !self.announced.swap(true, Ordering::Relaxed) {
            let (grads, buffers) = pack.counts;
            eprintln!(
                "{size} workers; each step sums {:.2} MB: {grads} gradient values, {buffers} \
                 buffer and frozen values from rank 0, {} group flags",
                (packed + n_values) as f64 * 4e-6,
                packed - grads - buffers
            );
        }
        // One tensor on the device: the logged values, then the packed parameters.
        let mut parts = vec![Tensor::<B, 1>::from_data(
            TensorData::new(values, [n_values]),
            &self.device,
        )];
        parts.extend(pack.parts);
        let summed = match self.sum_tensor(Tensor::cat(parts, 0), "summing the gradients") {
            Ok(s) => s,
            Err(e) => return Err((model, StepError::Failed(e))),
        };
        let logged: Stats = names
            .into_iter()
            .zip(&summed)
            .map(|(k, v)| (k, f64::from(*v)))
            .collect();
        let mut groups: Vec<ParamGroup> = step
            .groups
            .iter()
            .map(|g| ParamGroup {
                lr_mult: g.lr_mult,
                grads: GradientsParams::new(),
            })
            .collect();
        let mut unpack = Unpack {
            summed: &summed[n_values..],
            groups: &mut groups,
            offset: 0,
            error: None,
        };
        let model = model.map(&mut unpack);
        if let Some(e) = unpack.error {
            return Err((model, StepError::Failed(Error::config("collective", e))));
        }
        step.groups = groups;
        step.total = f64::from(status[1]);
        step.values = log.then_some(logged);
        Ok((model, Ok(step)))
    }
}
