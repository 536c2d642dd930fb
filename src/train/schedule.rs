//! Learning rate as a pure function of the step, so a resumed run needs only the step count.

use crate::train::config::{OptimConfig, Schedule};

/// Linear warm-up, then constant, step, cosine or poly decay.
#[derive(Debug, Clone, PartialEq)]
pub struct LrSchedule {
    base: f64,
    warmup: usize,
    total: usize,
    steps_per_epoch: usize,
    kind: Schedule,
    milestones: Vec<usize>,
    gamma: f64,
    min_ratio: f64,
    power: f64,
}

impl LrSchedule {
    /// The schedule of `optim` for epochs of `steps_per_epoch` optimiser steps.
    pub fn new(optim: &OptimConfig, steps_per_epoch: usize) -> Self {
        LrSchedule {
            base: optim.lr,
            warmup: optim.warmup_steps,
            total: optim.epochs * steps_per_epoch,
            steps_per_epoch: steps_per_epoch.max(1),
            kind: optim.schedule,
            milestones: optim.milestones.clone(),
            gamma: optim.gamma,
            min_ratio: optim.min_lr_ratio,
            power: optim.power,
        }
    }

    /// Total optimiser steps.
    pub fn total_steps(&self) -> usize {
        self.total
    }

    /// The rate of optimiser step `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        let decayed = match self.kind {
            Schedule::Constant => self.base,
            Schedule::Step => {
                let epoch = step / self.steps_per_epoch;
                let passed = self.milestones.iter().filter(|&&m| epoch >= m).count();
                self.base * self.gamma.powi(passed as i32)
            }
            Schedule::Cosine | Schedule::Poly => {
                let span = self.total.saturating_sub(self.warmup).max(1) as f64;
                let t = (step.saturating_sub(self.warmup) as f64 / span).min(1.0);
                let min = self.base * self.min_ratio;
                let left = match self.kind {
                    Schedule::Poly => (1.0 - t).powf(self.power),
                    _ => 0.5 * (1.0 + (std::f64::consts::PI * t).cos()),
                };
                min + (self.base - min) * left
            }
        };
        if step < self.warmup {
            decayed * (step + 1) as f64 / self.warmup as f64
        } else {
            decayed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn optim(kind: Schedule) -> OptimConfig {
        OptimConfig {
            optimizer: crate::train::config::OptimizerKind::Adamw,
            momentum: 0.9,
            nesterov: false,
            batch_size: 1,
            epochs: 10,
            replicas: 1,
            lr: 1.0,
            backbone_lr_mult: 0.1,
            weight_decay: 0.0,
            eps: 1e-8,
            clip_norm: 0.0,
            clip_value: 0.0,
            skip_nonfinite: 0,
            warmup_steps: 4,
            schedule: kind,
            milestones: vec![5, 8],
            gamma: 0.1,
            min_lr_ratio: 0.01,
            power: 0.9,
        }
    }

    #[test]
    fn warmup_then_step_decay_at_milestone_epochs() {
        let s = LrSchedule::new(&optim(Schedule::Step), 10);
        assert_eq!(s.total_steps(), 100);
        assert_eq!(s.lr(0), 0.25);
        assert_eq!(s.lr(3), 1.0);
        assert_eq!(s.lr(49), 1.0);
        assert!((s.lr(50) - 0.1).abs() < 1e-12);
        assert!((s.lr(80) - 0.01).abs() < 1e-12);
    }

    #[test]
    fn cosine_runs_from_base_to_floor() {
        let s = LrSchedule::new(&optim(Schedule::Cosine), 10);
        assert_eq!(s.lr(4), 1.0);
        let mid = s.lr(52);
        assert!((mid - (0.01 + 0.99 * 0.5)).abs() < 1e-12, "{mid}");
        assert!((s.lr(100) - 0.01).abs() < 1e-12);
        assert!(s.lr(60) < s.lr(59));
    }

    #[test]
    fn poly_decays_from_base_to_floor_with_its_power() {
        let mut o = optim(Schedule::Poly);
        o.warmup_steps = 0;
        let s = LrSchedule::new(&o, 10);
        // mmseg's PolyLR: eta_min + (base − eta_min)·(1 − step/total)^power.
        assert_eq!(s.lr(0), 1.0);
        let at = |step: f64| 0.01 + 0.99 * (1.0 - step / 100.0).powf(0.9);
        for step in [1, 37, 50, 99] {
            assert!((s.lr(step) - at(step as f64)).abs() < 1e-12, "step {step}");
        }
        assert!((s.lr(100) - 0.01).abs() < 1e-12);
    }
}
