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
use burn::tensor::{DType, Tensor, TensorPrimitive};
use burn_flex::FlexTensor;

use crate::model::layers::fused_norm::{flex_tensor, values};

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

    /// One update on flex, written over the parameter's and moments' own buffers (copied
    /// first only where another tensor shares them); the arguments back for a non-f32 tensor.
    fn flex_step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<Flex, D>,
        grad: Tensor<Flex, D>,
        state: Option<AdamWState<Flex, D>>,
    ) -> Result<Updated<D>, Box<Args<Flex, D>>> {
        let is_f32 = |t: &Tensor<Flex, D>| t.dtype() == DType::F32;
        let all_f32 = is_f32(&tensor)
            && is_f32(&grad)
            && state
                .as_ref()
                .is_none_or(|s| is_f32(&s.momentum.moment_1) && is_f32(&s.momentum.moment_2));
        if !all_f32 {
            return Err(Box::new((tensor, grad, state)));
        }
        let shape = tensor.dims().to_vec();
        let n = shape.iter().product::<usize>();
        let mut param = owned(tensor);
        let grad = grad.into_primitive().tensor().to_contiguous();
        let (mut m, mut v, time) = match state {
            Some(s) => {
                let s = s.momentum;
                (owned(s.moment_1), owned(s.moment_2), s.time + 1)
            }
            None => {
                let zeros = || flex_tensor(vec![0f32; n], shape.clone());
                (zeros(), zeros(), 1)
            }
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
            fresh: time == 1,
        };
        let chunk = if n >= PARALLEL_FROM {
            n.div_ceil(crate::backend::item_threads().max(1))
        } else {
            n.max(1)
        };
        let grads = values(&grad);
        std::thread::scope(|scope| {
            let mut parts = param
                .storage_mut::<f32>()
                .chunks_mut(chunk)
                .zip(m.storage_mut::<f32>().chunks_mut(chunk))
                .zip(v.storage_mut::<f32>().chunks_mut(chunk))
                .zip(grads.chunks(chunk))
                .map(|(((p, m), v), g)| move || update.apply(g, (p, m, v)));
            let first = parts.next();
            for part in parts {
                scope.spawn(part);
            }
            if let Some(mut part) = first {
                part();
            }
        });
        let tensor = |t: FlexTensor| -> Tensor<Flex, D> {
            Tensor::from_primitive(TensorPrimitive::Float(t))
        };
        let momentum = AdaptiveMomentumState {
            time,
            moment_1: tensor(m),
            moment_2: tensor(v),
            max_moment_2: None,
        };
        Ok((tensor(param), AdamWState { momentum }))
    }
}

/// A contiguous f32 flex tensor of `t`'s values that no other tensor shares: `t`'s own buffer
/// when it is contiguous and its only owner, else a copy.
fn owned<const D: usize>(t: Tensor<Flex, D>) -> FlexTensor {
    let mut t = t.into_primitive().tensor().to_contiguous();
    t.storage_mut::<f32>();
    t
}

/// A parameter, its gradient and its state.
type Args<B, const D: usize> = (Tensor<B, D>, Tensor<B, D>, Option<AdamWState<B, D>>);

/// An updated parameter and its state on flex.
type Updated<const D: usize> = (Tensor<Flex, D>, AdamWState<Flex, D>);

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
    /// The first step: no moments yet.
    fresh: bool,
}

impl Update {
    /// Updates one slice of parameters and moments in place, in the order of burn's tensor ops:
    /// `m = m·β₁ + g·(1−β₁)`, `v = v·β₂ + (g·g)·(1−β₂)` (on the first step, the second terms
    /// alone), `Δ = (m / c₁) / (√(v / c₂) + ε)`, `p = p·keep − Δ·lr`.
    fn apply(self, grads: &[f32], (p, m, v): (&mut [f32], &mut [f32], &mut [f32])) {
        for i in 0..p.len() {
            let g = grads[i];
            let (m1, m2) = if self.fresh {
                (g * self.factor_1, (g * g) * self.factor_2)
            } else {
                (
                    m[i] * self.beta_1 + g * self.factor_1,
                    v[i] * self.beta_2 + (g * g) * self.factor_2,
                )
            };
            let delta = (m1 / self.correction_1) / ((m2 / self.correction_2).sqrt() + self.epsilon);
            let decayed = match self.keep {
                Some(keep) => p[i] * keep,
                None => p[i],
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
        let args: Box<dyn Any> = Box::new((tensor, grad, state));
        let args = match args.downcast::<Args<Flex, D>>() {
            Ok(flex) => {
                let (tensor, grad, state) = *flex;
                match self.flex_step(lr, tensor, grad, state) {
                    Ok((t, s)) => {
                        let out: Box<dyn Any> = Box::new((t, Some(s)));
                        if let Ok(out) = out.downcast::<(Tensor<B, D>, Option<AdamWState<B, D>>)>()
                        {
                            return *out;
                        }
                        unreachable!("B is flex")
                    }
                    Err(args) => args as Box<dyn Any>,
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
