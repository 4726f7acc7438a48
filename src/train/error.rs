//! What can go wrong in a training run, whatever the family.

use std::path::PathBuf;

use crate::checkpoint;
use crate::device::DeviceError;
use crate::io;
use crate::tensorboard::EventError;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Io(#[from] io::IoError),
    #[error(
        "non-finite {what} ({value}) at step {step}; the weights were not updated. \
         Lower train.learning_rate or set train.on_nonfinite = \"skip\" to skip such steps"
    )]
    NonFinite {
        what: &'static str,
        value: f64,
        step: usize,
    },
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    #[error("cannot resume from {dir}: {why}")]
    Resume { dir: PathBuf, why: String },
    #[error("cannot resume from {dir}: {why}")]
    Undecodable { dir: PathBuf, why: String },
    #[error(
        "{dir} already holds checkpoints (newest: {newest}) and checkpoint.resume = \"none\". \
         Continue them with `--resume latest` (or checkpoint.resume = \"latest\"), or choose \
         another run.output_dir, or delete the old run"
    )]
    ExistingCheckpoints { dir: PathBuf, newest: PathBuf },
    #[error(transparent)]
    Events(#[from] EventError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(
        "{0} is neither a checkpoint, an export, nor a run directory with export/ or a latest checkpoint"
    )]
    NotARun(PathBuf),
    /// A step of a family's pipeline failed (loading a pretrained model or a first stage,
    /// drawing a sample grid): what was being done, and why (the source).
    #[error("{context}")]
    Stage {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// Settings that cannot work together, found while assembling a stage (the model and
    /// the data, a first stage and the backbone).
    #[error("{0}")]
    Incompatible(String),
    #[error(transparent)]
    Lora(#[from] crate::lora::LoraError),
    #[error(transparent)]
    Architecture(#[from] crate::models::NotADenoiser),
    #[error(transparent)]
    Sync(#[from] crate::distributed::SyncError),
    #[error(transparent)]
    Launch(crate::distributed::launch::LaunchError),
    #[error(
        "{dir}: {:.2} GB free on its disk, but a checkpoint and the export of this run need \
         about {:.2} GB; free some space or point run.output_dir at another disk",
        *free as f64 / 1e9,
        *need as f64 / 1e9
    )]
    NoSpace { dir: PathBuf, free: u64, need: u64 },
    #[error("rank {rank} panicked: {message}")]
    RankPanicked { rank: usize, message: String },
    #[error(
        "stopped by {} after step {step}{}; continue with `--resume latest`",
        crate::signals::name(*signal),
        checkpoint.as_ref().map(|c| format!(" ({} written)", c.display())).unwrap_or_default()
    )]
    Interrupted {
        signal: i32,
        step: usize,
        checkpoint: Option<PathBuf>,
    },
    #[error(
        "stopped by {} during the final export; the export was finished first ({} is complete, \
         step {step})",
        crate::signals::name(*signal),
        export.display()
    )]
    StoppedAfterExport {
        signal: i32,
        step: usize,
        export: PathBuf,
    },
    #[error(
        "{skipped} consecutive steps up to step {step} had a non-finite loss or gradient and were \
         skipped (train.max_consecutive_skips = {limit}); the run is diverging. Lower \
         train.learning_rate, or resume from an earlier checkpoint"
    )]
    TooManySkips {
        skipped: usize,
        step: usize,
        limit: usize,
    },
}

impl TrainError {
    /// The signal (SIGINT/SIGTERM) that stopped the run, when one did: the process then exits
    /// with 128 + it, after its checkpoint or its export was written.
    pub fn stop_signal(&self) -> Option<i32> {
        match self {
            Self::Interrupted { signal, .. } | Self::StoppedAfterExport { signal, .. } => {
                Some(*signal)
            }
            _ => None,
        }
    }

    /// A [`TrainError::Stage`]: `context` says what was being done, `source` why it failed.
    pub fn stage(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        Self::Stage {
            context: context.into(),
            source: source.into(),
        }
    }
}
