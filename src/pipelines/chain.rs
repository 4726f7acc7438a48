//! Chained configs: a stage-2 run whose input (`model.pixelcnn.vqvae`, `model.ldm.first_stage`,
//! `model.pretrained`) is trained first from a stage-1 config (`model.pixelcnn.vqvae_config`,
//! `model.ldm.first_stage_config`, `model.pretrained_train_config`).
//!
//! A stage is done only when its export is complete: `export.json` is the export's last file,
//! so a stage killed while training (checkpoints, no export) or while exporting (some files,
//! no `export.json`) is resumed from its newest checkpoint to its own `train.max_steps` and
//! exported before stage 2 reads it.

use std::path::Path;

use crate::config::{Config, Resume};
use crate::io;
use crate::train::{EXPORT_STEP_FILE, TrainError, TrainOptions};

/// Whether `dir` (a run's output_dir or its `export/` folder) holds a complete export.
pub fn export_complete(dir: &Path) -> bool {
    dir.join(EXPORT_STEP_FILE).is_file() || dir.join("export").join(EXPORT_STEP_FILE).is_file()
}

/// What a chained input needs before stage 2 can read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Needed {
    Nothing,
    /// Stage 1 has not started, or stopped before its export was complete.
    Training,
}

/// Trains stage 1 from `stage_path` when `input` (`key`'s value) is not ready: `input` is the
/// stage's own output (its output_dir or export folder) without a complete export, or any
/// other path that holds no weights (`ready` says whether it does).
pub fn ensure_stage(
    key: &str,
    input: &Path,
    stage_path: &Path,
    ready: impl FnOnce() -> bool,
    opts: &TrainOptions,
    stage2: &Config,
) -> Result<(), TrainError> {
    let mut stage_cfg = Config::load(stage_path, &[])?;
    let out = stage_cfg.output_dir();
    let own = [out.clone(), out.join("export")]
        .iter()
        .any(|p| io::resolved(p) == io::resolved(input));
    let needed = match (own, export_complete(input)) {
        (_, true) => Needed::Nothing,
        (true, false) => Needed::Training,
        (false, false) if ready() => Needed::Nothing,
        (false, false) => Needed::Training,
    };
    if needed == Needed::Nothing {
        return Ok(());
    }
    if !opts.quiet {
        for note in unshared_overrides(&opts.overrides, stage2, &stage_cfg) {
            eprintln!(
                "note: {note} (stage 1 is trained from {})",
                stage_path.display()
            );
        }
        let why = match (own, checkpoint_exists(&out)) {
            (true, true) => "its export is not complete; resuming it",
            _ => "it holds no weights yet; training it",
        };
        eprintln!(
            "stage 1: {key} = {}: {why} from {}",
            input.display(),
            stage_path.display()
        );
    }
    stage_cfg.checkpoint.resume = Resume::Latest;
    // The overrides were stage 2's: a chain inside stage 1 compares nothing against them.
    let inner = TrainOptions {
        overrides: Vec::new(),
        ..opts.clone()
    };
    super::train(&stage_cfg, &inner)?;
    Ok(())
}

fn checkpoint_exists(out: &Path) -> bool {
    crate::checkpoint::read_latest(out).is_some()
}

/// Each `--set key=value` of stage 2 whose key stage 1's config holds with another value:
/// the override reaches only the config it was given for.
pub fn unshared_overrides(overrides: &[String], stage2: &Config, stage1: &Config) -> Vec<String> {
    let as_value = |c: &Config| toml::Value::try_from(c).ok();
    let (Some(two), Some(one)) = (as_value(stage2), as_value(stage1)) else {
        return Vec::new();
    };
    let lookup = |v: &toml::Value, key: &str| -> Option<toml::Value> {
        key.split('.')
            .try_fold(v.clone(), |v, part| v.get(part).cloned())
    };
    let mut notes = Vec::new();
    for set in overrides {
        let Some((key, _)) = set.split_once('=') else {
            continue;
        };
        let key = key.trim();
        // run.* names this run (its name, output folder, devices): different by design.
        if key.starts_with("run.") {
            continue;
        }
        match (lookup(&two, key), lookup(&one, key)) {
            (Some(a), Some(b)) if a != b => notes.push(format!(
                "--set {key} applies to this config only: stage 1 keeps {key} = {}, this \
                 stage has {key} = {}",
                b.to_string().trim(),
                a.to_string().trim()
            )),
            _ => {}
        }
    }
    notes
}
