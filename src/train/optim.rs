//! Optimiser plumbing shared by every task: the AdamW and SGD settings, global gradient-norm
//! clipping across parameter groups (torch's `clip_grad_norm_`; burn's own clipping is per
//! tensor) and one optimiser step per group at its own learning rate.

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, Optimizer, SgdConfig};

use crate::task::ParamGroup;
use crate::train::adamw::FusedAdamW;
use crate::train::config::OptimConfig;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor};

/// AdamW as `optim` sets it: decoupled weight decay and `eps`.
pub fn adamw(optim: &OptimConfig) -> FusedAdamW {
    FusedAdamW::new(optim.eps as f32, optim.weight_decay as f32)
}

/// SGD as `optim` sets it, with `torch.optim.SGD`'s semantics: momentum without dampening
/// (burn's default dampening is 0.1), optionally Nesterov, weight decay added to the gradient.
pub fn sgd_config(optim: &OptimConfig) -> SgdConfig {
    let momentum = (optim.momentum > 0.0).then_some(MomentumConfig {
        momentum: optim.momentum,
        dampening: 0.0,
        nesterov: optim.nesterov,
    });
    let decay = (optim.weight_decay > 0.0).then_some(WeightDecayConfig {
        penalty: optim.weight_decay as f32,
    });
    SgdConfig::new()
        .with_momentum(momentum)
        .with_weight_decay(decay)
}

/// Stores every gradient back contiguous: conv weight gradients come out of the backward pass
/// transposed, and every later element-wise pass over them (summing replicas, the norm, the
/// clipping scale, AdamW's moments) is several times slower on a strided layout.
struct Contiguous<'a> {
    grads: &'a mut GradientsParams,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Contiguous<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(grad) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            let dims = grad.dims();
            let flat = grad.reshape([dims.iter().product::<usize>()]);
            self.grads.register(param.id, flat.reshape(dims));
        }
    }
}

/// Makes `model`'s gradients in `grads` contiguous (see [`Contiguous`]).
pub fn make_contiguous<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &mut GradientsParams,
) {
    model.visit(&mut Contiguous { grads });
}

/// Sums the squared gradients of all groups.
struct SquaredNorm<'a, B: AutodiffBackend> {
    groups: &'a [ParamGroup],
    total: Option<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for SquaredNorm<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        for g in self.groups {
            if let Some(grad) = g.grads.get::<B::InnerBackend, D>(param.id) {
                let sq = (grad.clone() * grad).sum();
                self.total = Some(match self.total.take() {
                    Some(t) => t + sq,
                    None => sq,
                });
            }
        }
    }
}

struct Scale<'a> {
    groups: &'a mut [ParamGroup],
    factor: f64,
}

impl Scale<'_> {
    fn scale<B: AutodiffBackend, const D: usize>(&mut self, id: ParamId) {
        for g in self.groups.iter_mut() {
            if let Some(grad) = g.grads.remove::<B::InnerBackend, D>(id) {
                g.grads.register(id, grad.mul_scalar(self.factor));
            }
        }
    }
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Scale<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.scale::<B, D>(param.id);
    }
}

/// Moves every gradient of `from` into `into`, adding where both have one.
struct Accumulate<'a> {
    into: &'a mut GradientsParams,
    from: GradientsParams,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Accumulate<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.from.remove::<B::InnerBackend, D>(param.id) {
            let sum = match self.into.remove::<B::InnerBackend, D>(param.id) {
                Some(acc) => acc + g,
                None => g,
            };
            self.into.register(param.id, sum);
        }
    }
}

/// Adds `from`'s gradients of `model`'s parameters into `into` (data-parallel shards).
pub fn add_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    into: &mut GradientsParams,
    from: GradientsParams,
) {
    model.visit(&mut Accumulate { into, from });
}

/// Gives every trainable parameter a fresh autodiff leaf with the same id and data.
struct FreshLeaves;

impl<B: AutodiffBackend> ModuleMapper<B> for FreshLeaves {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, value, mapper) = param.consume();
        let value = if value.is_require_grad() {
            value.detach().require_grad()
        } else {
            value
        };
        Param::from_mapped_value(id, value, mapper)
    }
}

/// A replica of `model` for another thread: same parameter ids and data, but its own autodiff
/// leaves. burn's graph locator merges the graphs of losses that share a node (here, the
/// parameters), and two threads back-propagating through a merged graph deadlock on its locks.
pub fn replica<B: AutodiffBackend, M: AutodiffModule<B>>(model: &M) -> M {
    model.clone().map(&mut FreshLeaves)
}

/// Clamps every gradient element of the groups to `[-limit, limit]`.
struct ClampValues<'a> {
    groups: &'a mut [ParamGroup],
    limit: f64,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for ClampValues<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        for g in self.groups.iter_mut() {
            if let Some(grad) = g.grads.remove::<B::InnerBackend, D>(param.id) {
                g.grads
                    .register(param.id, grad.clamp(-self.limit, self.limit));
            }
        }
    }
}

/// Clamps every gradient element of `model`'s parameters in `groups` to ±`limit` (0 = none).
pub fn clip_values<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    groups: &mut [ParamGroup],
    limit: f64,
) {
    if limit > 0.0 {
        model.visit(&mut ClampValues { groups, limit });
    }
}

/// Scales all groups' gradients so their joint L2 norm is at most `max_norm` (0 = no clipping);
/// returns the norm before clipping.
pub fn clip_global_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    groups: &mut [ParamGroup],
    max_norm: f64,
) -> f64 {
    let mut visitor = SquaredNorm::<B> {
        groups,
        total: None,
    };
    model.visit(&mut visitor);
    let norm = visitor
        .total
        .map(|t| t.into_scalar().elem::<f64>().sqrt())
        .unwrap_or(0.0);
    if max_norm > 0.0 && norm > max_norm {
        // torch adds 1e-6 to the norm; keeping it makes clipped steps match it exactly.
        model.visit(&mut Scale {
            groups,
            factor: max_norm / (norm + 1e-6),
        });
    }
    norm
}

/// Draws the initial values of every lazily initialised float parameter it visits.
pub struct Materialise;

impl<B: Backend> ModuleVisitor<B> for Materialise {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        param.val();
    }
}

/// One optimiser step per group, each at `lr × lr_mult`.
pub fn step_groups<B: AutodiffBackend, M: AutodiffModule<B>, O: Optimizer<M, B>>(
    optim: &mut O,
    mut model: M,
    groups: Vec<ParamGroup>,
    lr: f64,
) -> M {
    for g in groups {
        if !g.grads.is_empty() {
            model = optim.step(lr * g.lr_mult, model, g.grads);
        }
    }
    model
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Training;
    use burn::module::Module;
    use burn::nn::{Linear, LinearConfig};
    use burn::tensor::TensorData;

    #[test]
    fn clipping_uses_the_norm_over_all_groups() {
        let device = Default::default();
        let a: Linear<Training> = Linear {
            weight: Param::from_tensor(Tensor::from_data(
                TensorData::new(vec![1.0f32, 1.0], [2, 1]),
                &device,
            )),
            bias: None,
        };
        // A second, frozen module: it has no gradient and must not count.
        let frozen: Linear<Training> = LinearConfig::new(2, 1).init(&device).no_grad();
        let model = (a.clone(), frozen);
        let x =
            Tensor::<Training, 2>::from_data(TensorData::new(vec![3.0f32, 4.0], [1, 2]), &device);
        // d(sum(W·x))/dW = x = (3, 4): norm 5.
        let mut grads = a.forward(x).sum().backward();
        let g = GradientsParams::from_module(&mut grads, &model.0);
        let mut groups = vec![
            ParamGroup {
                lr_mult: 1.0,
                grads: g,
            },
            ParamGroup {
                lr_mult: 0.1,
                grads: GradientsParams::new(),
            },
        ];
        let norm = clip_global_norm(&model, &mut groups, 1.0);
        assert!((norm - 5.0).abs() < 1e-5, "{norm}");
        let clipped = groups[0]
            .grads
            .get::<<Training as AutodiffBackend>::InnerBackend, 2>(a.weight.id)
            .expect("grad")
            .into_data()
            .to_vec::<f32>()
            .expect("f32");
        assert!((clipped[0] - 0.6).abs() < 1e-5 && (clipped[1] - 0.8).abs() < 1e-5);
    }

    /// `sgd_config` against `torch.optim.SGD` (tests/fixtures/make_sgd_fixtures.py): a [2, 3]
    /// parameter with a fixed gradient and learning rate per step, four steps.
    #[test]
    fn sgd_follows_torch() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/sgd.json");
        let text = std::fs::read_to_string(path).expect("tests/fixtures/sgd.json");
        let fixture: serde_json::Value = serde_json::from_str(&text).expect("json");
        let floats = |v: &serde_json::Value| -> Vec<f32> {
            let values = v.as_array().expect("array").iter();
            values.map(|x| x.as_f64().expect("number") as f32).collect()
        };
        let device = Default::default();
        let cases = fixture["cases"].as_array().expect("cases");
        assert_eq!(cases.len(), 4);
        for case in cases {
            let what = case["description"].as_str().expect("description");
            let mut config: OptimConfig =
                toml::from_str("batch_size = 1\nepochs = 1\nlr = 1.0").expect("optim section");
            config.momentum = case["momentum"].as_f64().expect("momentum");
            config.nesterov = case["nesterov"].as_bool().expect("nesterov");
            config.weight_decay = case["weight_decay"].as_f64().expect("weight decay");
            let mut optim = sgd_config(&config).init::<Training, Linear<Training>>();
            let tensor = |values: Vec<f32>| {
                Tensor::<Training, 2>::from_data(TensorData::new(values, [2, 3]), &device)
            };
            let mut model: Linear<Training> = Linear {
                weight: Param::from_tensor(tensor(floats(&case["w0"])).require_grad()),
                bias: None,
            };
            let steps = case["grads"].as_array().expect("grads");
            let lrs = floats(&case["lrs"]);
            let expected = case["after_each_step"].as_array().expect("trajectory");
            for (k, ((g, lr), want)) in steps.iter().zip(lrs).zip(expected).enumerate() {
                let mut grads = (model.weight.val() * tensor(floats(g))).sum().backward();
                let grads = GradientsParams::from_module(&mut grads, &model);
                model = optim.step(lr as f64, model, grads);
                let got = model.weight.val().into_data().to_vec::<f32>().expect("f32");
                for (a, b) in got.iter().zip(floats(want)) {
                    assert!((a - b).abs() < 1e-6, "{what}, step {k}: {got:?} vs {want}");
                }
            }
        }
    }
}
