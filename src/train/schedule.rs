//! Learning-rate schedules with linear warmup, as transformers' schedulers.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// Linear warmup, then linear decay to 0 (`get_linear_schedule_with_warmup`).
    #[default]
    Linear,
    /// Linear warmup, then a half cosine to 0 (`get_cosine_schedule_with_warmup`).
    Cosine,
    /// Linear warmup, then constant.
    Constant,
}

/// The learning rate at `step` (0-based) of `total` steps.
pub fn learning_rate(kind: ScheduleKind, base: f64, step: u64, warmup: u64, total: u64) -> f64 {
    if step < warmup {
        return base * step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    match kind {
        ScheduleKind::Linear => base * (1.0 - progress).max(0.0),
        ScheduleKind::Cosine => {
            base * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
        }
        ScheduleKind::Constant => base,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay() {
        assert_eq!(learning_rate(ScheduleKind::Linear, 1.0, 0, 10, 110), 0.0);
        assert_eq!(learning_rate(ScheduleKind::Linear, 1.0, 5, 10, 110), 0.5);
        assert_eq!(learning_rate(ScheduleKind::Linear, 1.0, 10, 10, 110), 1.0);
        assert_eq!(learning_rate(ScheduleKind::Linear, 1.0, 60, 10, 110), 0.5);
        assert!((learning_rate(ScheduleKind::Cosine, 1.0, 60, 10, 110) - 0.5).abs() < 1e-12);
        assert_eq!(
            learning_rate(ScheduleKind::Constant, 2.0, 100, 10, 110),
            2.0
        );
    }
}
