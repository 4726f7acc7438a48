//! Step checkpoints: atomic directory writes, a `latest` pointer file, rotation, verification
//! and the choice of where a run resumes from.
//!
//! Mirrors accelerate's `save_state`/`load_state` as used by diffusers' training scripts
//! (`checkpointing_steps`, `checkpoints_total_limit`, `resume_from_checkpoint="latest"`), with
//! the failure modes reported against them closed:
//! - a checkpoint is built in a hidden temporary directory, every file fsynced, then renamed
//!   into place; `state.json` (written last) holds the size and CRC32C of every other file, so a
//!   truncated or bit-flipped checkpoint is detected instead of loaded;
//! - `latest` is a one-line text file updated atomically after the rename;
//! - rotation only ever deletes complete checkpoints at or below the current step, never the one
//!   `latest` names, and renames before deleting so a half-deleted one is never mistaken for a
//!   checkpoint.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{Config, Resume};
use crate::resume::ResumeRules;

/// The file in the output directory naming the newest complete checkpoint.
pub const LATEST: &str = "latest";
/// Written last into a checkpoint: counters, RNG states and the checksums of the other files.
pub const STATE_FILE: &str = "state.json";
pub const MODEL_FILE: &str = "model.safetensors";
pub const EMA_FILE: &str = "ema.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.bpk";
/// The resolved run config, in every checkpoint and beside every export (same name in both, so
/// `sample --checkpoint` reads either).
pub const CONFIG_FILE: &str = "difftrain.toml";
/// Version of the checkpoint layout; `read_verified` refuses others.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot write checkpoint {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read checkpoint {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("checkpoint {path} is unusable: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error(
        "{dir} has no usable checkpoint:\n  {}",
        failures.join("\n  ")
    )]
    NoneUsable { dir: PathBuf, failures: Vec<String> },
    #[error(
        "{dir} is in use by another training run ({holder}); wait for it to finish, stop it, or \
         choose another run.output_dir"
    )]
    Locked { dir: PathBuf, holder: String },
    #[error(transparent)]
    Io(#[from] crate::io::IoError),
}

/// The state of the random stream that draws timesteps and noise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RngState {
    /// ChaCha8 key, hex.
    pub seed: String,
    pub stream: u64,
    /// Position in the stream, in 32-bit words (a u128, as a decimal string for JSON).
    pub word_pos: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FileSum {
    pub bytes: u64,
    pub crc32c: u32,
}

/// Everything besides tensors that continuing a run exactly needs, plus provenance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub format_version: u32,
    /// Optimizer steps completed.
    pub step: usize,
    /// Position of the next micro-batch: epoch and batch inside it.
    pub epoch: u64,
    pub batch_in_epoch: usize,
    /// Seeds the per-epoch permutation and the augmentation draws (`run.seed`).
    pub data_seed: u64,
    pub dataset_len: usize,
    pub rng: RngState,
    /// diffusers' `EMAModel.optimization_step`, when EMA is on.
    pub ema_optimization_step: Option<u64>,
    pub skipped_steps: usize,
    pub last_loss: f64,
    /// The LR schedule is a pure function of the step; these record what it was.
    pub lr_schedule: String,
    pub lr_next: f64,
    pub crate_version: String,
    pub git_revision: String,
    pub saved_unix_time: u64,
    /// Size and CRC32C of every other file in the checkpoint.
    pub files: BTreeMap<String, FileSum>,
    /// Hashes of what the run depends on outside the checkpoint (a frozen first stage, a
    /// pretrained base model), by name; resume refuses a change.
    #[serde(default)]
    pub fingerprints: BTreeMap<String, String>,
    /// The fp16 loss scaler (`train.mixed_precision = "fp16"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_scaler: Option<crate::optim::precision::GradScaler>,
}

/// The crate version and git revision this binary was built from.
pub fn provenance() -> (String, String) {
    (
        env!("CARGO_PKG_VERSION").to_string(),
        env!("DIFFTRAIN_GIT_REV").to_string(),
    )
}

pub fn checkpoint_name(step: usize) -> String {
    format!("checkpoint-{step}")
}

/// The step of a `checkpoint-<N>` directory.
pub fn parse_step_of(dir: &Path) -> Option<usize> {
    parse_step(dir.file_name()?.to_str()?)
}

fn parse_step(name: &str) -> Option<usize> {
    name.strip_prefix("checkpoint-")?.parse().ok()
}

fn write_err(path: &Path) -> impl Fn(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Write {
        path: path.to_path_buf(),
        source,
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let mut f = std::fs::File::create(path).map_err(write_err(path))?;
    f.write_all(bytes).map_err(write_err(path))?;
    f.sync_all().map_err(write_err(path))
}

fn sync_dir(dir: &Path) {
    // Best-effort: some filesystems cannot fsync a directory.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Complete checkpoints (`checkpoint-<N>` directories) in `out_dir`, by step.
pub fn list(out_dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut found: Vec<(usize, PathBuf)> = std::fs::read_dir(out_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| Some((parse_step(e.file_name().to_str()?)?, e.path())))
        .collect();
    found.sort();
    found
}

/// The checkpoint directory `latest` names, if the file exists and is well-formed.
pub fn read_latest(out_dir: &Path) -> Option<(usize, PathBuf)> {
    let text = std::fs::read_to_string(out_dir.join(LATEST)).ok()?;
    let name = text.trim();
    Some((parse_step(name)?, out_dir.join(name)))
}

/// Removes what a killed writer left behind (hidden `.checkpoint-*` temporary directories).
/// Only the single writing process may call this.
pub fn remove_stale(out_dir: &Path) -> Vec<PathBuf> {
    let stale: Vec<PathBuf> = std::fs::read_dir(out_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                // A killed writer's temporary checkpoint directory or `latest` pointer.
                .is_some_and(|n| n.starts_with(".checkpoint-") || n.starts_with(".latest.tmp-"))
        })
        .map(|e| e.path())
        .collect();
    let mut stale = stale;
    // A killed atomic write's `.<name>.tmp-<pid>` files in the folders runs write into.
    for sub in ["", "export", "samples", "latent_cache", "tokenizer"] {
        stale_temporaries(&out_dir.join(sub), sub.is_empty(), &mut stale);
    }
    stale.sort();
    stale.dedup();
    for p in &stale {
        if p.is_dir() {
            let _ = std::fs::remove_dir_all(p);
        } else {
            let _ = std::fs::remove_file(p);
        }
    }
    stale
}

/// The files named as `io::write_atomic_with` names its temporaries (`.<name>.tmp-<digits>`)
/// in `dir` (and, unless `top_only`, its subfolders).
fn stale_temporaries(dir: &Path, top_only: bool, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = e.path();
        let name = e.file_name();
        let name = name.to_string_lossy();
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        if is_dir {
            if !top_only {
                stale_temporaries(&path, false, out);
            }
            continue;
        }
        let temporary = name.starts_with('.')
            && name
                .rsplit_once(".tmp-")
                .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()));
        if temporary {
            out.push(path);
        }
    }
}

/// Writes `files` plus `state.json` as `<out_dir>/checkpoint-<step>/` atomically, then points
/// `latest` at it. A kill at any instant leaves the previous checkpoint and pointer intact or the
/// new ones complete.
pub fn write(
    out_dir: &Path,
    state: &mut TrainState,
    files: &[(&str, Vec<u8>)],
) -> Result<PathBuf, CheckpointError> {
    let name = checkpoint_name(state.step);
    let pid = std::process::id();
    let tmp = out_dir.join(format!(".{name}.tmp-{pid}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(write_err(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(write_err(&tmp))?;
    state.files.clear();
    for (file, bytes) in files {
        let path = tmp.join(file);
        write_synced(&path, bytes)?;
        state.files.insert(
            file.to_string(),
            FileSum {
                bytes: bytes.len() as u64,
                crc32c: crc32c::crc32c(bytes),
            },
        );
    }
    let json = serde_json::to_vec_pretty(state).expect("the state serialises");
    write_synced(&tmp.join(STATE_FILE), &json)?;
    sync_dir(&tmp);

    let dest = out_dir.join(&name);
    // A checkpoint of the same step from an earlier attempt (e.g. the run resumed from an older
    // one after this one was found corrupt) is moved aside, never merged into.
    let old = out_dir.join(format!(".{name}.old-{pid}"));
    let replaced = dest.exists();
    if replaced {
        std::fs::rename(&dest, &old).map_err(write_err(&dest))?;
    }
    std::fs::rename(&tmp, &dest).map_err(write_err(&dest))?;
    sync_dir(out_dir);
    crate::io::write_atomic(&out_dir.join(LATEST), format!("{name}\n").as_bytes())?;
    if replaced {
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(dest)
}

/// Deletes all but the newest `keep_last` checkpoints at or below `current_step` (checkpoints
/// of a later step belong to an abandoned attempt and are left alone), never the one `latest`
/// names. `keep_last = 0` keeps everything. Returns what was deleted.
pub fn rotate(
    out_dir: &Path,
    keep_last: usize,
    current_step: usize,
) -> Result<Vec<PathBuf>, CheckpointError> {
    if keep_last == 0 {
        return Ok(Vec::new());
    }
    let latest = read_latest(out_dir).map(|(_, p)| p);
    let mut eligible: Vec<(usize, PathBuf)> = list(out_dir)
        .into_iter()
        .filter(|(s, _)| *s <= current_step)
        .collect();
    eligible.reverse(); // newest first
    let mut removed = Vec::new();
    for (step, path) in eligible.into_iter().skip(keep_last) {
        if Some(&path) == latest.as_ref() {
            continue;
        }
        // Rename first: a kill mid-delete leaves a hidden directory, not a partial checkpoint.
        let doomed = out_dir.join(format!(
            ".{}.deleting-{}",
            checkpoint_name(step),
            std::process::id()
        ));
        std::fs::rename(&path, &doomed).map_err(write_err(&path))?;
        std::fs::remove_dir_all(&doomed).map_err(write_err(&doomed))?;
        removed.push(path);
    }
    Ok(removed)
}

/// A verified checkpoint: its state and the bytes of its files.
pub struct Loaded {
    pub dir: PathBuf,
    pub state: TrainState,
    pub files: BTreeMap<String, Vec<u8>>,
}

impl Loaded {
    pub fn file(&self, name: &str) -> Result<&[u8], CheckpointError> {
        self.files
            .get(name)
            .map(Vec::as_slice)
            .ok_or_else(|| CheckpointError::Corrupt {
                path: self.dir.clone(),
                why: format!("it has no {name}"),
            })
    }

    /// The resolved config the checkpoint was trained with.
    pub fn config(&self) -> Result<Config, CheckpointError> {
        let path = self.dir.join(CONFIG_FILE);
        let text = String::from_utf8_lossy(self.file(CONFIG_FILE)?).into_owned();
        Config::parse(&path, &text, &[]).map_err(|e| CheckpointError::Corrupt {
            path: self.dir.clone(),
            why: e.to_string(),
        })
    }
}

/// Reads a checkpoint and checks every file against the sizes and CRCs in `state.json`.
pub fn read_verified(dir: &Path) -> Result<Loaded, CheckpointError> {
    let corrupt = |why: String| CheckpointError::Corrupt {
        path: dir.to_path_buf(),
        why,
    };
    if !dir.is_dir() {
        return Err(corrupt("no such directory".into()));
    }
    let state_path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&state_path).map_err(|e| {
        corrupt(format!(
            "cannot read {STATE_FILE} ({e}); not a complete checkpoint"
        ))
    })?;
    let state: TrainState = serde_json::from_slice(&bytes)
        .map_err(|e| corrupt(format!("{STATE_FILE} is not valid: {e}")))?;
    if state.format_version != FORMAT_VERSION {
        return Err(corrupt(format!(
            "format version {} (this build reads {FORMAT_VERSION})",
            state.format_version
        )));
    }
    let mut files = BTreeMap::new();
    for (name, sum) in &state.files {
        let path = dir.join(name);
        let data = std::fs::read(&path).map_err(|e| corrupt(format!("cannot read {name}: {e}")))?;
        if data.len() as u64 != sum.bytes {
            return Err(corrupt(format!(
                "{name} has {} bytes, {STATE_FILE} says {}",
                data.len(),
                sum.bytes
            )));
        }
        let crc = crc32c::crc32c(&data);
        if crc != sum.crc32c {
            return Err(corrupt(format!(
                "{name} fails its checksum (crc32c {crc:08x}, expected {:08x})",
                sum.crc32c
            )));
        }
        files.insert(name.clone(), data);
    }
    Ok(Loaded {
        dir: dir.to_path_buf(),
        state,
        files,
    })
}

/// Where a run starts, and what the user should be told about the choice.
pub struct Start {
    pub checkpoint: Option<Loaded>,
    pub notes: Vec<String>,
}

/// Resolves `checkpoint.resume`:
/// - `"none"`: a fresh run (the caller refuses to start one over existing checkpoints);
/// - a path: that checkpoint, or an error saying why it is unusable;
/// - `"latest"`: the checkpoint `latest` names. If it is missing or fails verification, the
///   newest older checkpoint that verifies, with a note naming both. No checkpoint at all
///   starts a new run (like diffusers); checkpoints that all fail are an error listing each.
pub fn resolve(out_dir: &Path, resume: &Resume) -> Result<Start, CheckpointError> {
    match resume {
        Resume::None => Ok(Start {
            checkpoint: None,
            notes: Vec::new(),
        }),
        Resume::Path(p) => Ok(Start {
            checkpoint: Some(read_verified(p)?),
            notes: Vec::new(),
        }),
        Resume::Latest => {
            let mut notes = Vec::new();
            let mut failures = Vec::new();
            let named = read_latest(out_dir);
            let below = match &named {
                Some((step, path)) => match read_verified(path) {
                    Ok(c) => {
                        return Ok(Start {
                            checkpoint: Some(c),
                            notes,
                        });
                    }
                    Err(e) => {
                        failures.push(crate::error::chain(&e));
                        *step
                    }
                },
                None => usize::MAX,
            };
            for (_, path) in list(out_dir).into_iter().rev().filter(|(s, _)| *s < below) {
                match read_verified(&path) {
                    Ok(c) => {
                        let why = match &named {
                            Some(_) => failures.join("; "),
                            None => {
                                format!("{}/{LATEST} is missing or unreadable", out_dir.display())
                            }
                        };
                        // With `latest` unreadable nothing says which came last: this is the
                        // newest complete one.
                        let which = if named.is_some() {
                            "previous"
                        } else {
                            "newest"
                        };
                        notes.push(format!(
                            "warning: {why}; resuming from the {which} complete checkpoint {} \
                             (work after step {} is redone)",
                            path.display(),
                            c.state.step
                        ));
                        return Ok(Start {
                            checkpoint: Some(c),
                            notes,
                        });
                    }
                    Err(e) => failures.push(crate::error::chain(&e)),
                }
            }
            if failures.is_empty() {
                notes.push(format!(
                    "no checkpoint in {}; starting a new run",
                    out_dir.display()
                ));
                Ok(Start {
                    checkpoint: None,
                    notes,
                })
            } else {
                Err(CheckpointError::NoneUsable {
                    dir: out_dir.to_path_buf(),
                    failures,
                })
            }
        }
    }
}

/// Differences between the config a checkpoint was trained with and the current one:
/// `(breaking, allowed)`, each line `key: old -> new` (breaking ones say what they would do).
/// Which changes break resume is each config section's rule ([`ResumeRules`]).
pub fn compare_configs(saved: &Config, now: &Config) -> (Vec<String>, Vec<String>) {
    let breaking = now.breaks_resume(saved, "");
    let allowed = crate::resume::differences("", saved, now)
        .into_iter()
        .filter(|(key, _, _)| key != "checkpoint.resume" && !breaking.iter().any(|c| &c.key == key))
        .map(|(key, old, new)| format!("{key}: {old} -> {new}"))
        .collect();
    (breaking.iter().map(|c| c.to_string()).collect(), allowed)
}

/// An exclusive advisory lock on a run's output folder (`<output_dir>/.lock`), held while a
/// `train` process writes there: a second run on the same folder is refused with the holder's
/// pid, host and start time. The kernel releases the lock when its process dies, so a stale
/// lock file of a killed run is simply taken over (with a note).
pub struct RunLock {
    _file: std::fs::File,
    path: PathBuf,
}

impl RunLock {
    pub fn acquire(dir: &Path) -> Result<Self, CheckpointError> {
        use std::io::{Read, Seek, Write};
        let path = dir.join(".lock");
        let io_err = |source| {
            CheckpointError::Io(crate::io::IoError::Write {
                path: path.clone(),
                source,
            })
        };
        std::fs::create_dir_all(dir).map_err(io_err)?;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err)?;
        let mut previous = String::new();
        let _ = file.read_to_string(&mut previous);
        let previous = previous.trim().to_string();
        #[cfg(unix)]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: flock on a file descriptor this function owns.
            let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if r != 0 {
                return Err(CheckpointError::Locked {
                    dir: dir.to_path_buf(),
                    holder: if previous.is_empty() {
                        "another process".into()
                    } else {
                        previous
                    },
                });
            }
        }
        if !previous.is_empty() {
            eprintln!(
                "note: {} was left by a run that is no longer running ({previous}); taking it over",
                path.display()
            );
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "unknown host".into());
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let me = format!(
            "pid {} on {host}, started at unix time {since}",
            std::process::id()
        );
        file.set_len(0).map_err(io_err)?;
        file.rewind().map_err(io_err)?;
        file.write_all(me.as_bytes()).map_err(io_err)?;
        Ok(Self { _file: file, path })
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // A finished run leaves no lock file; the kernel drops the lock with the descriptor.
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(step: usize) -> TrainState {
        let (crate_version, git_revision) = provenance();
        TrainState {
            format_version: FORMAT_VERSION,
            step,
            epoch: 0,
            batch_in_epoch: step,
            data_seed: 0,
            dataset_len: 10,
            rng: RngState {
                seed: "00".into(),
                stream: 0,
                word_pos: "0".into(),
            },
            ema_optimization_step: None,
            skipped_steps: 0,
            grad_scaler: None,
            last_loss: 0.5,
            lr_schedule: "constant".into(),
            lr_next: 1e-3,
            crate_version,
            git_revision,
            saved_unix_time: 0,
            files: BTreeMap::new(),
            fingerprints: BTreeMap::new(),
        }
    }

    fn save(dir: &Path, step: usize) -> PathBuf {
        write(dir, &mut state(step), &[("a.bin", vec![step as u8; 64])]).unwrap()
    }

    #[test]
    fn write_points_latest_and_rotation_keeps_the_newest() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        for step in [10, 20, 30, 40] {
            save(dir, step);
            rotate(dir, 2, step).unwrap();
        }
        let steps: Vec<usize> = list(dir).into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![30, 40]);
        assert_eq!(read_latest(dir).unwrap().0, 40);
        assert!(
            remove_stale(dir).is_empty(),
            "no temporary directories left"
        );
        let c = read_verified(&dir.join("checkpoint-40")).unwrap();
        assert_eq!(c.state.step, 40);
        assert_eq!(c.files["a.bin"], vec![40u8; 64]);
    }

    #[test]
    fn rotation_spares_latest_and_later_steps() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        for step in [10, 20, 30] {
            save(dir, step);
        }
        // A resumed attempt from step 10 writes 15: 20 and 30 belong to the abandoned attempt.
        save(dir, 15);
        rotate(dir, 1, 15).unwrap();
        let steps: Vec<usize> = list(dir).into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![15, 20, 30]);
        // `latest` is never deleted, even when it is not among the newest.
        std::fs::write(dir.join(LATEST), "checkpoint-15\n").unwrap();
        save(dir, 5);
        std::fs::write(dir.join(LATEST), "checkpoint-15\n").unwrap();
        rotate(dir, 1, 40).unwrap();
        let steps: Vec<usize> = list(dir).into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![15, 30]);
    }

    #[test]
    fn corrupt_latest_falls_back_and_says_so() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        save(dir, 10);
        let newest = save(dir, 20);
        // Flip one byte of a file: sizes agree, the CRC does not.
        let f = newest.join("a.bin");
        let mut bytes = std::fs::read(&f).unwrap();
        bytes[3] ^= 1;
        std::fs::write(&f, bytes).unwrap();
        let err = read_verified(&newest).err().unwrap().to_string();
        assert!(
            err.contains("checkpoint-20") && err.contains("checksum"),
            "{err}"
        );
        let start = resolve(dir, &Resume::Latest).unwrap();
        assert_eq!(start.checkpoint.unwrap().state.step, 10);
        let note = start.notes.join("\n");
        assert!(
            note.contains("checkpoint-20") && note.contains("checkpoint-10"),
            "{note}"
        );
        // An explicit path is not second-guessed.
        assert!(resolve(dir, &Resume::Path(newest.clone())).is_err());
        // Truncation and a missing state file are caught too.
        std::fs::write(dir.join("checkpoint-10/a.bin"), [1u8; 3]).unwrap();
        let err = resolve(dir, &Resume::Latest).err().unwrap().to_string();
        assert!(err.contains("3 bytes") && err.contains("checksum"), "{err}");
        std::fs::remove_file(newest.join(STATE_FILE)).unwrap();
        assert!(
            read_verified(&newest)
                .err()
                .unwrap()
                .to_string()
                .contains("not a complete")
        );
    }

    #[test]
    fn no_checkpoint_starts_fresh_with_a_note() {
        let tmp = tempfile::tempdir().unwrap();
        let start = resolve(tmp.path(), &Resume::Latest).unwrap();
        assert!(start.checkpoint.is_none());
        assert!(start.notes[0].contains("starting a new run"));
    }

    #[test]
    fn config_changes_are_classified() {
        let saved = Config::default();
        let mut now = saved.clone();
        now.train.max_steps *= 2;
        now.train.learning_rate = 5e-4;
        let (breaking, allowed) = compare_configs(&saved, &now);
        assert!(breaking.is_empty(), "{breaking:?}");
        assert_eq!(allowed.len(), 2, "{allowed:?}");
        now.model.unet.block_out_channels = vec![32, 64, 64, 64];
        now.train.batch_size = 3;
        let (breaking, _) = compare_configs(&saved, &now);
        assert_eq!(breaking.len(), 2, "{breaking:?}");
        assert!(
            breaking[0].starts_with("model.unet.block_out_channels"),
            "{breaking:?}"
        );
        assert!(
            breaking[1].contains("train.batch_size: 16 -> 3"),
            "{breaking:?}"
        );
    }
}
