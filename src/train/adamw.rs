//! AdamW with its update as one pass over each parameter on flex. burn's `AdamW` runs about a
//! dozen element-wise tensor ops per parameter and step (moments, bias corrections, square
//! root, decay, update), each a pass and an allocation of its own, on one core while the
//! replicas' other cores wait. The pass here computes every element with the same f32
//! operations in the same order, so the results are bit for bit burn's; the state is burn's
//! `AdamWState`, so checkpoints are the same records. Other backends and element types run
//! burn's `AdamW`.

use std::any::Any;

use burn::backend::Flex;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{
    AdamW, AdamWConfig, AdamWState, AdaptiveMomentumState, LearningRate, SimpleOptimizer,
};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorPrimitive};
use burn_flex::FlexTensor;

use crate::model::layers::fused_norm::{f32_values, flex_tensor, values};

/// Elements from which a parameter's pass is split over the cores (below, a thread costs more
/// than it saves).
const PARALLEL_FROM: usize = 1 << 15;

/// AdamW (decoupled weight decay, no AMSGrad), fused on flex.
#[derive(Clone)]
pub struct FusedAdamW {
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    weight_decay: f32,
    /// burn's own AdamW with the same settings, for other backends.
    fallback: AdamW,
}

impl FusedAdamW {
    /// AdamW with moment decays `0.9`, `0.999` (burn's and PyTorch's defaults), `epsilon` and
    /// decoupled `weight_decay`.
    pub fn new(epsilon: f32, weight_decay: f32) -> Self {
        let (beta_1, beta_2) = (0.9, 0.999);
        FusedAdamW {
            beta_1,
            beta_2,
            epsilon,
            weight_decay,
            fallback: AdamWConfig::new()
                .with_beta_1(beta_1)
                .with_beta_2(beta_2)
                .with_epsilon(epsilon)
                .with_weight_decay(weight_decay)
                .build(),
        }
    }

    /// The optimiser for a model on the autodiff backend `B`.
    pub fn init<B: AutodiffBackend, M: burn::module::AutodiffModule<B>>(
        self,
    ) -> OptimizerAdaptor<Self, M, B> {
        OptimizerAdaptor::from(self)
    }

    /// One update on flex: the new parameter and state, or `None` for a non-f32 tensor.
    fn flex_step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<Flex, D>,
        grad: Tensor<Flex, D>,
        state: Option<AdamWState<Flex, D>>,
    ) -> Option<(Tensor<Flex, D>, AdamWState<Flex, D>)> {
        let shape = tensor.dims().to_vec();
        let flat = |t: Tensor<Flex, D>| f32_values(&t.into_primitive().tensor());
        let (param, grad) = (flat(tensor)?, flat(grad)?);
        let (moments, time) = match state {
            Some(s) => {
                let m = s.momentum;
                (Some((flat(m.moment_1)?, flat(m.moment_2)?)), m.time + 1)
            }
            None => (None, 1),
        };
        let time_i32 = time as i32;
        let update = Update {
            beta_1: self.beta_1,
            beta_2: self.beta_2,
            factor_1: 1.0 - self.beta_1,
            factor_2: 1.0 - self.beta_2,
            correction_1: 1f32 - self.beta_1.powi(time_i32),
            correction_2: 1f32 - self.beta_2.powi(time_i32),
            epsilon: self.epsilon,
            // burn's scalars are f64, converted to the element type by flex.
            keep: {
                let decay = lr * self.weight_decay as f64;
                (decay != 0.0).then_some((1.0 - decay) as f32)
            },
            lr: lr as f32,
        };
        let n = values(&param).len();
        let (mut p, mut m, mut v) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        let old = moments.as_ref().map(|(m, v)| (values(m), values(v)));
        let chunk = if n >= PARALLEL_FROM {
            n.div_ceil(crate::backend::item_threads().max(1))
        } else {
            n.max(1)
        };
        let (params, grads) = (values(&param), values(&grad));
        std::thread::scope(|scope| {
            let mut parts = p
                .chunks_mut(chunk)
                .zip(m.chunks_mut(chunk))
                .zip(v.chunks_mut(chunk))
                .enumerate()
                .map(|(i, ((p, m), v))| {
                    let at = i * chunk..(i * chunk + p.len());
                    let old = old.map(|(om, ov)| (&om[at.clone()], &ov[at.clone()]));
                    let inputs = (&params[at.clone()], &grads[at], old);
                    move || update.apply(inputs, (p, m, v))
                });
            let first = parts.next();
            for part in parts {
                scope.spawn(part);
            }
            if let Some(mut part) = first {
                part();
            }
        });
        let tensor = |values: Vec<f32>| -> Tensor<Flex, D> {
            let t: FlexTensor = flex_tensor(values, shape.clone());
            Tensor::from_primitive(TensorPrimitive::Float(t))
        };
        let momentum = AdaptiveMomentumState {
            time,
            moment_1: tensor(m),
            moment_2: tensor(v),
            max_moment_2: None,
        };
        Some((tensor(p), AdamWState { momentum }))
    }
}

/// The scalars of one AdamW update.
#[derive(Clone, Copy)]
struct Update {
    beta_1: f32,
    beta_2: f32,
    factor_1: f32,
    factor_2: f32,
    correction_1: f32,
    correction_2: f32,
    epsilon: f32,
    /// `1 − lr · weight_decay`, absent without decay.
    keep: Option<f32>,
    lr: f32,
}

impl Update {
    /// Writes the new parameters and moments of one slice, in the order of burn's tensor ops:
    /// `m = m·β₁ + g·(1−β₁)`, `v = v·β₂ + (g·g)·(1−β₂)` (without old moments, the second terms
    /// alone), `Δ = (m / c₁) / (√(v / c₂) + ε)`, `p = p·keep − Δ·lr`.
    #[allow(clippy::type_complexity)]
    fn apply(
        self,
        (params, grads, old): (&[f32], &[f32], Option<(&[f32], &[f32])>),
        (p, m, v): (&mut [f32], &mut [f32], &mut [f32]),
    ) {
        for i in 0..p.len() {
            let g = grads[i];
            let (m1, m2) = match old {
                Some((om, ov)) => (
                    om[i] * self.beta_1 + g * self.factor_1,
                    ov[i] * self.beta_2 + (g * g) * self.factor_2,
                ),
                None => (g * self.factor_1, (g * g) * self.factor_2),
            };
            let delta = (m1 / self.correction_1) / ((m2 / self.correction_2).sqrt() + self.epsilon);
            let decayed = match self.keep {
                Some(keep) => params[i] * keep,
                None => params[i],
            };
            p[i] = decayed - delta * self.lr;
            m[i] = m1;
            v[i] = m2;
        }
    }
}

impl<B: Backend> SimpleOptimizer<B> for FusedAdamW {
    type State<const D: usize> = AdamWState<B, D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<B, D>, Option<Self::State<D>>) {
        // Rust has no specialisation: flex is recognised by type at run time.
        type Args<B, const D: usize> = (Tensor<B, D>, Tensor<B, D>, Option<AdamWState<B, D>>);
        let args: Box<dyn Any> = Box::new((tensor, grad, state));
        let args = match args.downcast::<Args<Flex, D>>() {
            Ok(flex) => {
                let (tensor, grad, state) = *flex;
                match self.flex_step(lr, tensor.clone(), grad.clone(), state.clone()) {
                    Some((t, s)) => {
                        let out: Box<dyn Any> = Box::new((t, Some(s)));
                        if let Ok(out) = out.downcast::<(Tensor<B, D>, Option<AdamWState<B, D>>)>()
                        {
                            return *out;
                        }
                        unreachable!("B is flex")
                    }
                    None => Box::new((tensor, grad, state)) as Box<dyn Any>,
                }
            }
            Err(other) => other,
        };
        let (tensor, grad, state) = *args
            .downcast::<Args<B, D>>()
            .unwrap_or_else(|_| unreachable!("the arguments' own type"));
        self.fallback.step(lr, tensor, grad, state)
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &B::Device) -> Self::State<D> {
        <AdamW as SimpleOptimizer<B>>::to_device(state, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, TensorData};

    /// Three steps with decay, then three without, from random parameters and gradients
    /// (large enough to be split over threads): the same bits as burn's AdamW.
    #[test]
    fn matches_burns_adamw_bit_for_bit() {
        let device = Default::default();
        let fused = FusedAdamW::new(1e-8, 1e-2);
        let burn_adamw = AdamWConfig::new()
            .with_epsilon(1e-8)
            .with_weight_decay(1e-2)
            .build();
        let no_decay = FusedAdamW::new(1e-8, 0.0);
        let burn_no_decay = AdamWConfig::new()
            .with_epsilon(1e-8)
            .with_weight_decay(0.0)
            .build();
        for n in [7, PARALLEL_FROM + 13] {
            let param = Tensor::<Flex, 2>::random([n, 1], Distribution::Normal(0.0, 1.0), &device);
            let (mut a, mut b) = (param.clone(), param);
            let (mut sa, mut sb) = (None, None);
            for step in 0..6 {
                let grad =
                    Tensor::<Flex, 2>::random([n, 1], Distribution::Normal(0.0, 0.1), &device);
                let lr = 1e-3 * (step + 1) as f64;
                let (ours, theirs): (&FusedAdamW, &AdamW) = if step < 3 {
                    (&fused, &burn_adamw)
                } else {
                    (&no_decay, &burn_no_decay)
                };
                (a, sa) = ours.step(lr, a, grad.clone(), sa);
                (b, sb) = theirs.step(lr, b, grad, sb);
                let bits = |t: &Tensor<Flex, 2>| -> Vec<u32> {
                    let data: TensorData = t.to_data();
                    data.to_vec::<f32>()
                        .expect("f32")
                        .iter()
                        .map(|v| v.to_bits())
                        .collect()
                };
                assert_eq!(bits(&a), bits(&b), "parameters, n {n}, step {step}");
                let (ma, mb) = (
                    sa.as_ref().expect("state").momentum.clone(),
                    sb.as_ref().expect("state").momentum.clone(),
                );
                assert_eq!(ma.time, mb.time);
                assert_eq!(bits(&ma.moment_1), bits(&mb.moment_1), "m, step {step}");
                assert_eq!(bits(&ma.moment_2), bits(&mb.moment_2), "v, step {step}");
            }
        }
    }
}
