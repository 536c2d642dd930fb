//! OD-DETR's parts against independent arithmetic: the EMA update rule and its parameter ids,
//! and the multi-target quality focal loss, which must equal the sigmoid focal loss when the
//! quality targets are one-hot.

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::{Tensor, TensorData};
use densekd::backend::Inference;
use densekd::distill::ema::{Ema, EmaConfig};
use densekd::ops::losses::quality_focal_loss;
use densekd::ops::losses::sigmoid_focal_loss;

#[derive(Module, Debug)]
struct Tiny<B: burn::tensor::backend::Backend> {
    weight: Param<Tensor<B, 1>>,
    norm: burn::nn::BatchNorm<B>,
}

/// Ids of the trainable parameters (burn's running statistics keep the id they were made with:
/// `RunningState::map` cannot change it, and the optimiser never sees them).
struct Ids(Vec<ParamId>, Vec<String>);

impl<B: burn::tensor::backend::Backend> ModuleVisitor<B> for Ids {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.1.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.1.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if !self.1.last().is_some_and(|n| n.starts_with("running_")) {
            self.0.push(param.id);
        }
    }
}

fn tiny(value: f32) -> Tiny<Inference> {
    let device = Default::default();
    let mut norm = burn::nn::BatchNormConfig::new(2).init::<Inference>(&device);
    norm.running_mean = burn::module::RunningState::new(Tensor::full([2], value, &device));
    Tiny {
        weight: Param::from_tensor(Tensor::full([3], value, &device)),
        norm,
    }
}

fn values(m: &Tiny<Inference>) -> (Vec<f32>, Vec<f32>) {
    let v = |t: Tensor<Inference, 1>| t.into_data().to_vec::<f32>().expect("f32");
    (v(m.weight.val()), v(m.norm.running_mean.value()))
}

#[test]
fn ema_follows_the_update_rule_with_its_own_parameter_ids() {
    let config = EmaConfig {
        decay: 0.9,
        warmup: true,
        average_buffers: true,
    };
    let student = tiny(0.0);
    let mut ema = Ema::new(student.clone(), config);
    let (mut a, mut b) = (Ids(Vec::new(), Vec::new()), Ids(Vec::new(), Vec::new()));
    student.visit(&mut a);
    ema.model.visit(&mut b);
    assert_eq!(a.0.len(), 3, "weight, gamma and beta");
    assert!(
        a.0.iter().all(|id| !b.0.contains(id)),
        "ids shared with the student"
    );

    // Warm-up: update n uses min(0.9, (1 + n) / (10 + n)): 0.1, then 2/11.
    ema.update(&tiny(1.0));
    let (w, mean) = values(&ema.model);
    assert!(w.iter().all(|x| (x - 0.9).abs() < 1e-6), "{w:?}");
    assert!(mean.iter().all(|x| (x - 0.9).abs() < 1e-6), "{mean:?}");
    ema.update(&tiny(2.0));
    let expected = 0.9 * (2.0 / 11.0) + 2.0 * (1.0 - 2.0 / 11.0);
    let (w, _) = values(&ema.model);
    assert!(w.iter().all(|x| (x - expected).abs() < 1e-5), "{w:?}");
    // The student is untouched.
    assert_eq!(values(&student).0, vec![0.0; 3]);

    // Without buffer averaging the running statistics are copied.
    let mut copy = Ema::new(
        tiny(0.0),
        EmaConfig {
            decay: 0.5,
            warmup: false,
            average_buffers: false,
        },
    );
    copy.update(&tiny(4.0));
    let (w, mean) = values(&copy.model);
    assert_eq!(w, vec![2.0; 3]);
    assert_eq!(mean, vec![4.0; 2]);
}

#[test]
fn quality_focal_loss_reduces_to_focal_loss_for_one_hot_targets() {
    let device = Default::default();
    let logits: Vec<f32> = (0..24).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
    let onehot: Vec<f32> = (0..24).map(|i| (i % 5 == 0) as u8 as f32).collect();
    let t = |v: Vec<f32>| Tensor::<Inference, 3>::from_data(TensorData::new(v, [2, 3, 4]), &device);
    let qfl = quality_focal_loss(
        t(logits.clone()),
        t(onehot.clone()),
        t(onehot.clone()),
        0.25,
        2.0,
    )
    .into_scalar();
    let focal = sigmoid_focal_loss(t(logits.clone()), t(onehot.clone()), 0.25, 2.0)
        .sum()
        .into_scalar();
    assert!(
        (qfl - focal).abs() < 1e-4 * focal.abs().max(1.0),
        "{qfl} vs {focal}"
    );

    // A positive with quality 0.6: α·|0.6 − p|²·BCE(p, 0.6), computed by hand.
    let x = 0.3f64;
    let p = 1.0 / (1.0 + (-x).exp());
    let bce = -(0.6 * p.ln() + 0.4 * (1.0 - p).ln());
    let expected = 0.25 * (0.6 - p).powi(2) * bce;
    let one =
        |v: f32| Tensor::<Inference, 3>::from_data(TensorData::new(vec![v], [1, 1, 1]), &device);
    let got = quality_focal_loss(one(x as f32), one(0.6), one(1.0), 0.25, 2.0).into_scalar();
    assert!((got as f64 - expected).abs() < 1e-6, "{got} vs {expected}");
}
