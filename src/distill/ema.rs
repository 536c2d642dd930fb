//! An exponential moving average of a model, kept outside the optimised module: its own
//! parameter ids, no gradients, updated after every optimiser step with
//! `θ' ← m·θ' + (1 − m)·θ`.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::{backend::Backend, Tensor};
use serde::{Deserialize, Serialize};

/// EMA settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmaConfig {
    /// Decay m (DINO uses 0.9997, detrex 0.999).
    pub decay: f64,
    /// Ramp the decay as `min(m, (1 + n) / (10 + n))` over the first updates (timm/YOLO
    /// style), so the average follows the student closely while it changes fast; short runs
    /// need it, as a 0.9997 average would still be mostly the initial weights.
    pub warmup: bool,
    /// Average BatchNorm running statistics too (DINO's `ModelEma` averages the whole
    /// state dict); otherwise they are copied from the student.
    pub average_buffers: bool,
}

impl Default for EmaConfig {
    fn default() -> Self {
        EmaConfig {
            decay: 0.999,
            warmup: true,
            average_buffers: true,
        }
    }
}

impl EmaConfig {
    /// The decay of update number `n` (0-based).
    pub fn decay_at(&self, n: usize) -> f64 {
        if self.warmup {
            self.decay.min((1.0 + n as f64) / (10.0 + n as f64))
        } else {
            self.decay
        }
    }
}

/// Whether a tensor at this module path is a running statistic rather than a parameter.
fn is_buffer(path: &[String]) -> bool {
    path.last()
        .is_some_and(|n| n == "running_mean" || n == "running_var")
}

/// Collects a module's float tensors (flattened) in visiting order.
struct Collect<B: Backend> {
    path: Vec<String>,
    tensors: Vec<Tensor<B, 1>>,
}

impl<B: Backend> ModuleVisitor<B> for Collect<B> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let t = param.val();
        let n = t.shape().num_elements();
        self.tensors.push(t.reshape([n]));
    }
}

/// Blends each float tensor with the next collected one.
struct Blend<B: Backend> {
    path: Vec<String>,
    source: std::vec::IntoIter<Tensor<B, 1>>,
    decay: f64,
    average_buffers: bool,
}

impl<B: Backend> ModuleMapper<B> for Blend<B> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, old, mapper) = param.consume();
        let Some(new) = self.source.next() else {
            return Param::from_mapped_value(id, old, mapper);
        };
        let new = new.reshape(old.dims());
        let value = if is_buffer(&self.path) && !self.average_buffers {
            new
        } else {
            old.mul_scalar(self.decay) + new.mul_scalar(1.0 - self.decay)
        };
        Param::from_mapped_value(id, value, mapper)
    }
}

/// Gives every parameter a fresh id, so the average shares none with the student.
struct Reid;

impl<B: Backend> ModuleMapper<B> for Reid {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (_, value, mapper) = param.consume();
        Param::from_mapped_value(ParamId::new(), value, mapper)
    }
}

/// The moving average of a model `M` (an inference module).
#[derive(Debug, Clone)]
pub struct Ema<M> {
    /// The averaged model.
    pub model: M,
    /// Settings.
    pub config: EmaConfig,
    /// Updates applied so far.
    pub updates: usize,
}

impl<M> Ema<M> {
    /// Starts the average at a copy of `model`.
    pub fn new<B: Backend>(model: M, config: EmaConfig) -> Self
    where
        M: Module<B>,
    {
        Ema {
            model: model.map(&mut Reid),
            config,
            updates: 0,
        }
    }

    /// One update towards `student` (same architecture).
    pub fn update<B: Backend>(&mut self, student: &M)
    where
        M: Module<B> + Clone,
    {
        let mut collect = Collect {
            path: Vec::new(),
            tensors: Vec::new(),
        };
        student.visit(&mut collect);
        let mut blend = Blend {
            path: Vec::new(),
            source: collect.tensors.into_iter(),
            decay: self.config.decay_at(self.updates),
            average_buffers: self.config.average_buffers,
        };
        self.model = self.model.clone().map(&mut blend);
        self.updates += 1;
    }
}
