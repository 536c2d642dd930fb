//! One training run from a resolved config: the run-folder guards, the task of the config's
//! model kind and the distiller of its method, and the loop. The CLI's `train` and `experiment` both go through here.

use std::path::Path;

use crate::backend::{device, device_for, Training};
use crate::distill::fcos_kd::FcosKd;
use crate::distill::lgd::Lgd;
use crate::distill::od_detr::OdDetr;
use crate::distill::seg_kd::SegKd;
use crate::distill::{DistillConfig, NoDistill};
use crate::error::{write_atomic, Error, Result};
use crate::model::deeplabv3::task::SegTask;
use crate::model::detr::task::DetrTask;
use crate::model::fcos::task::FcosTask;
use crate::task::Task;
use crate::train::config::{differing_keys, ModelSection, TrainConfig};
use crate::train::{fit, RunOptions, RunSummary};

/// Trains `config` into `run_dir`. A folder that already holds a checkpoint is refused unless
/// `resume` is set, and a resume whose config differs from the saved one is refused with the
/// differing keys.
pub fn train_run(
    config: &TrainConfig,
    run_dir: &Path,
    resume: bool,
    progress: bool,
) -> Result<RunSummary> {
    train_with_options(
        config,
        &RunOptions {
            run_dir: run_dir.to_path_buf(),
            resume,
            stop_after: None,
            progress,
            world: None,
        },
    )
}

/// [`train_run`] with every [`RunOptions`] field (tests stop runs early with `stop_after`).
pub fn train_with_options(config: &TrainConfig, options: &RunOptions) -> Result<RunSummary> {
    let (run_dir, resume) = (options.run_dir.as_path(), options.resume);
    let saved_path = run_dir.join("config.toml");
    let has_checkpoint = run_dir.join("checkpoints").join("latest.json").exists();
    if resume && !has_checkpoint {
        return Err(Error::config(
            "--resume",
            format!(
                "{} holds no checkpoint to resume; train without --resume to start a run there",
                run_dir.display()
            ),
        ));
    }
    if resume && !saved_path.exists() {
        return Err(Error::config(
            "--resume",
            format!(
                "{} is missing: the run's config cannot be checked against this one; restore it \
                 (or copy the config the run was started with there) and resume again",
                saved_path.display()
            ),
        ));
    }
    if resume {
        let saved = TrainConfig::load(&saved_path, &[])?;
        let changed = differing_keys(&saved, config)?;
        if !changed.is_empty() {
            return Err(Error::config(
                "--resume",
                format!(
                    "the config differs from {} in: {}; resume with the same config and overrides",
                    saved_path.display(),
                    changed.join(", ")
                ),
            ));
        }
    } else if has_checkpoint {
        return Err(Error::config(
            "--out",
            format!(
                "{} already holds a run with checkpoints; pass --resume to continue it or choose another --out",
                run_dir.display()
            ),
        ));
    }
    if options.world.as_ref().is_none_or(|w| w.is_leader()) {
        write_atomic(&saved_path, config.to_toml()?.as_bytes())?;
    }
    let device = options
        .world
        .as_ref()
        .map_or_else(device, |w| device_for(w.local_rank));
    let loop_config = config.loop_config();
    match config.model()? {
        ModelSection::Detr(section) => {
            let task = DetrTask::new(&config.task_inputs(), section)?;
            let model = task.init_model::<Training>(&device)?;
            match &config.distill {
                DistillConfig::None(_) => {
                    fit(&task, &mut NoDistill, model, &loop_config, options, &device)
                }
                DistillConfig::OdDetr(c) => {
                    let mut distiller = OdDetr::new(&model, *c);
                    fit(&task, &mut distiller, model, &loop_config, options, &device)
                }
                other => Err(unsupported(other, "detr")),
            }
        }
        ModelSection::Fcos(section) => {
            let task = FcosTask::new(&config.task_inputs(), section)?;
            let model = task.init_model::<Training>(&device)?;
            match &config.distill {
                DistillConfig::None(_) => {
                    fit(&task, &mut NoDistill, model, &loop_config, options, &device)
                }
                DistillConfig::Lgd(c) => {
                    let mut distiller = Lgd::new(&task, c.clone())?;
                    fit(&task, &mut distiller, model, &loop_config, options, &device)
                }
                DistillConfig::FcosKd(c) => {
                    let mut distiller = FcosKd::<Training>::new(&task, c.clone())?;
                    fit(&task, &mut distiller, model, &loop_config, options, &device)
                }
                other => Err(unsupported(other, "fcos")),
            }
        }
        ModelSection::DeepLabV3(section) => {
            let task = SegTask::new(&config.task_inputs(), section)?;
            let model = task.init_model::<Training>(&device)?;
            match &config.distill {
                DistillConfig::None(_) => {
                    fit(&task, &mut NoDistill, model, &loop_config, options, &device)
                }
                DistillConfig::SegKd(c) => {
                    let total = Task::<Training>::batches_per_epoch(&task) * config.optim.epochs;
                    let mut distiller = SegKd::<Training>::new(&task, c.clone(), total)?;
                    fit(&task, &mut distiller, model, &loop_config, options, &device)
                }
                other => Err(unsupported(other, "deeplabv3")),
            }
        }
    }
}

/// The error for a method that [`DistillConfig::validate`] should have refused for `kind`.
fn unsupported(method: &DistillConfig, kind: &str) -> Error {
    Error::config(
        "distill.method",
        format!(
            "`{}` does not apply to the model kind `{kind}`",
            method.method()
        ),
    )
}
