//! Training progress for a person watching: a bar on a terminal; otherwise (nohup, CI, a
//! cluster job's log file) a plain line every `log_every_steps` with the step, loss, speed and
//! ETA, as detectron2 and mmdet print.

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use crate::error::{Error, Result};

/// How progress is shown.
pub(super) enum Progress {
    /// An interactive bar.
    Bar(ProgressBar),
    /// Plain lines.
    Lines {
        /// Steps of the whole run.
        total: usize,
        /// Step and time this invocation started at (a resumed run's speed counts from there).
        start: (usize, Instant),
        /// Step and time of the previous line.
        last: (usize, Instant),
    },
}

impl Progress {
    /// A bar when `bar` is asked for and stderr is a terminal, else lines; at `step` of `total`.
    pub fn new(bar: bool, total: usize, step: usize) -> Result<Self> {
        if !(bar && std::io::stderr().is_terminal()) {
            let now = Instant::now();
            return Ok(Progress::Lines {
                total,
                start: (step, now),
                last: (step, now),
            });
        }
        let pb = ProgressBar::new(total as u64);
        pb.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} ETA {eta} {msg}",
            )
            .map_err(|e| Error::config("progress", e.to_string()))?
            .progress_chars("=> "),
        );
        pb.set_position(step as u64);
        Ok(Progress::Bar(pb))
    }

    /// Reports that `step` steps are done; `loss` is known on logging steps.
    pub fn update(&mut self, step: usize, loss: Option<f64>, lr: f64) {
        match self {
            Progress::Bar(pb) => {
                pb.set_position(step as u64);
                if let Some(loss) = loss {
                    pb.set_message(format!("loss {loss:.3} lr {lr:.2e}"));
                }
            }
            Progress::Lines { total, start, last } => {
                let Some(loss) = loss else { return };
                let now = Instant::now();
                let rate = |(s0, t0): (usize, Instant)| {
                    (step - s0) as f64 / now.duration_since(t0).as_secs_f64().max(1e-9)
                };
                let (recent, overall) = (rate(*last), rate(*start));
                let eta = (*total - step.min(*total)) as f64 / overall.max(1e-9);
                eprintln!(
                    "step {step}/{total} loss {loss:.4} lr {lr:.2e} {recent:.2} steps/s ETA {}",
                    duration(eta)
                );
                *last = (step, now);
            }
        }
    }

    /// [`Progress::println`] when `show` is set (one rank of a multi-process run prints).
    pub fn println_if(&self, show: bool, line: &str) {
        if show {
            self.println(line);
        }
    }

    /// Prints `line` without garbling the bar.
    pub fn println(&self, line: &str) {
        match self {
            Progress::Bar(pb) => pb.suspend(|| eprintln!("{line}")),
            Progress::Lines { .. } => eprintln!("{line}"),
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Progress::Bar(pb) = self {
            pb.finish_and_clear();
        }
    }
}

/// `1h02m`, `3m05s` or `42s`.
fn duration(seconds: f64) -> String {
    let s = seconds.round().clamp(0.0, 1e9) as u64;
    match (s / 3600, s % 3600 / 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

#[cfg(test)]
mod tests {
    use super::duration;

    #[test]
    fn durations_read_like_a_clock() {
        assert_eq!(duration(42.4), "42s");
        assert_eq!(duration(185.0), "3m05s");
        assert_eq!(duration(3720.0), "1h02m");
        assert_eq!(duration(f64::INFINITY), "277777h46m");
    }
}
