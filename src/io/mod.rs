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
    /// A valid file whose contents are not what was asked for (an unsupported LoRA kind).
    #[error("{path}: {message}")]
    Content { path: PathBuf, message: String },
    #[error(
        "{path}: tensor {key} holds NaN or infinite values (the file is damaged, or the \
         training that wrote it diverged)"
    )]
    NotFinite { path: PathBuf, key: String },
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

/// `path` made absolute with symlinks resolved as far as it exists (the rest appended).
pub fn resolved(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut existing = abs.as_path();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                existing = parent;
            }
            _ => return abs,
        }
    }
    let mut out = std::fs::canonicalize(existing).unwrap_or_else(|_| existing.to_path_buf());
    for name in rest.into_iter().rev() {
        out.push(name);
    }
    out
}

/// Bytes free for this process on the disk holding `dir` (or its nearest existing ancestor);
/// `None` when that cannot be asked. Tests set `DIFFTRAIN_TEST_FREE_BYTES` to pretend a
/// nearly full disk.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    if let Ok(v) = std::env::var("DIFFTRAIN_TEST_FREE_BYTES") {
        return v.trim().parse().ok();
    }
    let mut at = resolved(dir);
    while !at.exists() {
        at = at.parent()?.to_path_buf();
    }
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(at.as_os_str().as_bytes()).ok()?;
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return None;
        }
        Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Whether `inner` is `outer` or lies inside it, after [`resolved`] (symlinks followed).
pub fn is_within(inner: &Path, outer: &Path) -> bool {
    resolved(inner).starts_with(resolved(outer))
}

/// Checks that `dir` could be written without creating anything: it, or the nearest of its
/// ancestors that exists, is a directory this process may write (`--check` and `sample`'s
/// `--out` find an unusable folder before any work).
pub fn check_writable(dir: &Path) -> Result<(), IoError> {
    let fail = |path: &Path, why: &str| IoError::Write {
        path: path.to_path_buf(),
        source: std::io::Error::other(why.to_string()),
    };
    let mut at = dir;
    loop {
        match std::fs::metadata(at) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => return Err(fail(at, "it is a file, not a folder")),
            Err(_) => match at.parent().filter(|p| !p.as_os_str().is_empty()) {
                Some(parent) => at = parent,
                None => return Ok(()),
            },
        }
    }
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(at.as_os_str().as_bytes())
            .map_err(|_| fail(at, "its path holds a NUL byte"))?;
        // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
        if unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } != 0 {
            return Err(IoError::Write {
                path: at.to_path_buf(),
                source: std::io::Error::last_os_error(),
            });
        }
    }
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
