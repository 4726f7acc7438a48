//! Files: weights (safetensors), images (PNG grids) and atomic writes.
//!
//! The only module that maps parameters to file keys ([`safetensors`]). Paths come from burn's
//! module visitor (struct field names and `Vec` indices joined by dots); enum variant names are
//! left out, so a model's key is its diffusers key. Later key formats (the original single-file
//! Stable Diffusion names, PEFT/kohya LoRA names) are translated here and nowhere else.

pub mod base_model;
pub mod config_json;
pub mod image;
pub mod keys;
pub mod layout;
pub mod lora;
pub mod safetensors;
pub mod single_file;

use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid safetensors file: {message}")]
    Format { path: PathBuf, message: String },
    #[error("{path}")]
    Tensor {
        path: PathBuf,
        #[source]
        source: safetensors::TensorError,
    },
    #[error("{path}: weights do not match the model:\n  {}", problems.join("\n  "))]
    Mismatch {
        path: PathBuf,
        problems: Vec<String>,
    },
    #[error("cannot encode image {path}")]
    Image {
        path: PathBuf,
        #[source]
        source: ::image::ImageError,
    },
}

/// Writes `path` via a temporary file in the same folder: `fill` writes the contents, then
/// fsync and rename, so a reader sees the old file or the whole new one, never a part.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<(), IoError> {
    let err = |source| IoError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(err)?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let file = std::fs::File::create(&tmp).map_err(err)?;
    let mut writer = std::io::BufWriter::with_capacity(1 << 20, file);
    let written = fill(&mut writer).and_then(|()| writer.flush());
    let synced = written.and_then(|()| writer.get_ref().sync_all());
    if let Err(e) = synced {
        drop(writer);
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    drop(writer);
    std::fs::rename(&tmp, path).map_err(err)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all(); // directory fsync is best-effort (unsupported on some filesystems)
    }
    Ok(())
}

/// Writes `path` atomically (see [`write_atomic_with`]).
/// Creates `dir` if needed and proves it writable with a probe file (removed again), so a run
/// finds an unwritable output folder before it computes anything.
pub fn ensure_writable_dir(dir: &Path) -> Result<(), IoError> {
    let fail = |source| IoError::Write {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(fail)?;
    let probe = dir.join(format!(".write-test-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(fail)?;
    std::fs::remove_file(&probe).map_err(fail)?;
    Ok(())
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), IoError> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// Writes pretty-printed JSON atomically (diffusers' `config.json`, `model_index.json`, ...).
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), IoError> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialise");
    write_atomic(path, text.as_bytes())
}

/// Reads a JSON file, naming it in errors.
pub fn read_json(path: &Path) -> Result<serde_json::Value, IoError> {
    let text = std::fs::read(path).map_err(|source| IoError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&text).map_err(|e| IoError::Read {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })
}
