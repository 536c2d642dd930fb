//! Optimiser plumbing shared by every task: global gradient-norm clipping across parameter
//! groups (torch's `clip_grad_norm_`; burn's own clipping is per tensor) and one AdamW step
//! per group at its own learning rate.

use burn::module::{AutodiffModule, ModuleVisitor, Param, ParamId};
use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor};

/// Gradients of one parameter group and its learning-rate multiplier.
pub struct ParamGroup {
    /// Fraction of the base learning rate.
    pub lr_mult: f64,
    /// The group's gradients.
    pub grads: GradientsParams,
}

/// Sums the squared gradients, storing each gradient back contiguous: conv weight gradients
/// come out of the backward pass transposed, and every later element-wise pass over them
/// (this norm, the clipping scale, AdamW's moments) is several times slower on a strided layout.
struct SquaredNorm<'a, B: AutodiffBackend> {
    groups: &'a mut [ParamGroup],
    total: Option<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for SquaredNorm<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        for g in self.groups.iter_mut() {
            if let Some(grad) = g.grads.remove::<B::InnerBackend, D>(param.id) {
                let dims = grad.dims();
                let flat = grad.reshape([dims.iter().product::<usize>()]);
                let sq = (flat.clone() * flat.clone()).sum();
                g.grads.register(param.id, flat.reshape(dims));
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
}
