//! Opening a dataset: a folder of images (with an optional Hugging Face `metadata.jsonl`) or
//! MNIST IDX files, with a header check of every image up front.

use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use super::{DataError, DataSource, OnBadImage};

/// One training example before decoding.
#[derive(Debug, Clone)]
pub struct Item {
    pub path: PathBuf,
    pub caption: Option<String>,
    pub label: Option<i64>,
}

/// A dataset: items plus how to decode one.
pub enum Dataset {
    Folder {
        root: PathBuf,
        items: Vec<Item>,
    },
    Idx {
        path: PathBuf,
        rows: usize,
        cols: usize,
        pixels: Arc<Vec<u8>>,
        labels: Option<Vec<u8>>,
    },
}

/// One line of `metadata.jsonl` (the Hugging Face `imagefolder` layout): any other key is an
/// error naming the accepted ones (a `"caption"` key would otherwise train on empty prompts).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MetadataLine {
    file_name: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    label: Option<i64>,
}

/// A file's identity (device, inode) on Unix; its canonical path elsewhere.
#[cfg(unix)]
fn file_id(meta: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (meta.dev(), meta.ino())
}

#[cfg(not(unix))]
fn file_id(meta: &std::fs::Metadata) -> (u64, u64) {
    (meta.len(), 0)
}

fn is_image(path: &Path) -> bool {
    matches!(
        path.extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
            .as_deref(),
        Some("png" | "jpg" | "jpeg")
    )
}

fn read_gz_or_plain(path: &Path) -> Result<Vec<u8>, DataError> {
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let raw = std::fs::read(path).map_err(io)?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(io)?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

fn find_idx(dir: &Path, stem: &str) -> Option<PathBuf> {
    [stem.to_string(), format!("{stem}.gz")]
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
}

impl Dataset {
    /// Opens the dataset and checks every image header; unreadable ones are skipped with a
    /// warning (or are an error with `OnBadImage::Error`).
    pub fn open(source: DataSource, path: &Path, on_bad: OnBadImage) -> Result<Self, DataError> {
        if !path.exists() {
            return Err(DataError::Missing {
                path: path.to_path_buf(),
            });
        }
        let ds = match source {
            DataSource::ImageFolder => Self::open_folder(path, on_bad)?,
            DataSource::MnistIdx => Self::open_idx(path)?,
        };
        if ds.is_empty() {
            let detail = match source {
                DataSource::ImageFolder => "no readable .png/.jpg/.jpeg files".to_string(),
                DataSource::MnistIdx => "the IDX file holds 0 images".to_string(),
            };
            return Err(DataError::Empty {
                path: path.to_path_buf(),
                detail,
            });
        }
        Ok(ds)
    }

    fn open_folder(root: &Path, on_bad: OnBadImage) -> Result<Self, DataError> {
        let meta_path = root.join("metadata.jsonl");
        let mut items = Vec::new();
        if meta_path.is_file() {
            let file = std::fs::File::open(&meta_path).map_err(|source| DataError::Io {
                path: meta_path.clone(),
                source,
            })?;
            for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
                let line = line.map_err(|source| match source.kind() {
                    std::io::ErrorKind::InvalidData => DataError::Metadata {
                        path: meta_path.clone(),
                        line: i + 1,
                        message: "not valid UTF-8".into(),
                    },
                    _ => DataError::Io {
                        path: meta_path.clone(),
                        source,
                    },
                })?;
                if line.trim().is_empty() {
                    continue;
                }
                let meta: MetadataLine =
                    serde_json::from_str(&line).map_err(|e| DataError::Metadata {
                        path: meta_path.clone(),
                        line: i + 1,
                        message: e.to_string(),
                    })?;
                let path = root.join(&meta.file_name);
                if !path.is_file() {
                    return Err(DataError::Metadata {
                        path: meta_path.clone(),
                        line: i + 1,
                        message: format!(
                            "file_name {:?} does not exist in {}",
                            meta.file_name,
                            root.display()
                        ),
                    });
                }
                items.push(Item {
                    path,
                    caption: meta.text,
                    label: meta.label,
                });
            }
        } else {
            // Each real directory once (by device and inode: a symlink loop such as
            // `ln -s . loop` would otherwise multiply the dataset or never end), and only
            // regular files (a FIFO named `x.png` would block the header check forever).
            let mut paths = Vec::new();
            let mut stack = vec![root.to_path_buf()];
            let mut seen = std::collections::HashSet::new();
            let mut skipped_entries: Vec<String> = Vec::new();
            while let Some(dir) = stack.pop() {
                let id = std::fs::metadata(&dir)
                    .map(|m| file_id(&m))
                    .map_err(|source| DataError::Io {
                        path: dir.clone(),
                        source,
                    })?;
                if !seen.insert(id) {
                    skipped_entries.push(format!("{} (a directory already read)", dir.display()));
                    continue;
                }
                let entries = std::fs::read_dir(&dir).map_err(|source| DataError::Io {
                    path: dir.clone(),
                    source,
                })?;
                for entry in entries {
                    let p = entry
                        .map_err(|source| DataError::Io {
                            path: dir.clone(),
                            source,
                        })?
                        .path();
                    // Follows symlinks; a dangling one is skipped.
                    let Ok(meta) = std::fs::metadata(&p) else {
                        if is_image(&p) {
                            skipped_entries.push(format!("{} (a broken link)", p.display()));
                        }
                        continue;
                    };
                    if meta.is_dir() {
                        stack.push(p);
                    } else if is_image(&p) {
                        if meta.is_file() {
                            paths.push(p);
                        } else {
                            skipped_entries.push(format!("{} (not a regular file)", p.display()));
                        }
                    }
                }
            }
            if !skipped_entries.is_empty() {
                eprintln!(
                    "warning: {} skipped {} entr{}: {}",
                    root.display(),
                    skipped_entries.len(),
                    if skipped_entries.len() == 1 {
                        "y"
                    } else {
                        "ies"
                    },
                    skipped_entries
                        .iter()
                        .take(5)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            paths.sort();
            items = paths
                .into_iter()
                .map(|path| Item {
                    path,
                    caption: None,
                    label: None,
                })
                .collect();
        }
        // Header check: cheap, catches non-images and truncated headers before training.
        let mut kept = Vec::with_capacity(items.len());
        let mut skipped = 0;
        for item in items {
            match image::ImageReader::open(&item.path)
                .and_then(|r| r.with_guessed_format())
                .map(|r| r.into_dimensions())
            {
                Ok(Ok(_)) => kept.push(item),
                Ok(Err(e)) => bad_image(&item.path, &e.to_string(), on_bad, &mut skipped)?,
                Err(e) => bad_image(&item.path, &e.to_string(), on_bad, &mut skipped)?,
            }
        }
        if skipped > 0 {
            eprintln!(
                "warning: skipped {skipped} unreadable image(s) in {}",
                root.display()
            );
        }
        Ok(Self::Folder {
            root: root.to_path_buf(),
            items: kept,
        })
    }

    fn open_idx(path: &Path) -> Result<Self, DataError> {
        let file = if path.is_dir() {
            find_idx(path, "train-images-idx3-ubyte").ok_or_else(|| DataError::Idx {
                path: path.to_path_buf(),
                message: "folder has no train-images-idx3-ubyte[.gz]".into(),
            })?
        } else {
            path.to_path_buf()
        };
        let bytes = read_gz_or_plain(&file)?;
        let err = |message: String| DataError::Idx {
            path: file.clone(),
            message,
        };
        if bytes.len() < 16 {
            return Err(err(format!(
                "{} bytes is shorter than the 16-byte header",
                bytes.len()
            )));
        }
        let word = |i: usize| {
            u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]) as usize
        };
        if word(0) != 0x0803 {
            return Err(err(format!(
                "magic number {:#010x}, expected 0x00000803 (u8, 3 dims)",
                word(0)
            )));
        }
        let (n, rows, cols) = (word(4), word(8), word(12));
        if bytes.len() != 16 + n * rows * cols {
            return Err(err(format!(
                "header says {n}x{rows}x{cols} but the file has {} data bytes",
                bytes.len() - 16
            )));
        }
        let labels = file
            .parent()
            .and_then(|d| find_idx(d, "train-labels-idx1-ubyte"))
            .map(|p| read_gz_or_plain(&p))
            .transpose()?
            .filter(|l| l.len() == 8 + n)
            .map(|l| l[8..].to_vec());
        Ok(Self::Idx {
            path: file,
            rows,
            cols,
            pixels: Arc::new(bytes[16..].to_vec()),
            labels,
        })
    }

    pub fn len(&self) -> usize {
        match self {
            Self::Folder { items, .. } => items.len(),
            Self::Idx {
                rows, cols, pixels, ..
            } => pixels.len() / (rows * cols).max(1),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn path(&self) -> &Path {
        match self {
            Self::Folder { root, .. } => root,
            Self::Idx { path, .. } => path,
        }
    }

    /// The files the images come from (each image's own file, or the one IDX file).
    pub fn files(&self) -> Vec<PathBuf> {
        match self {
            Self::Folder { items, .. } => items.iter().map(|i| i.path.clone()).collect(),
            Self::Idx { path, .. } => vec![path.clone()],
        }
    }

    /// Images without a caption.
    pub fn missing_captions(&self) -> usize {
        (0..self.len())
            .filter(|&i| self.caption(i).is_none())
            .count()
    }

    /// Refuses a text-conditioned run's data with images that have no caption, unless
    /// `allow_empty` (`data.allow_empty_captions`).
    pub fn require_captions(&self, allow_empty: bool) -> Result<(), DataError> {
        let missing = self.missing_captions();
        if missing == 0 || allow_empty {
            return Ok(());
        }
        Err(DataError::NoCaptions {
            path: self.path().to_path_buf(),
            missing,
            total: self.len(),
        })
    }

    pub fn caption(&self, index: usize) -> Option<&str> {
        match self {
            Self::Folder { items, .. } => items[index].caption.as_deref(),
            Self::Idx { .. } => None,
        }
    }

    pub fn label(&self, index: usize) -> Option<i64> {
        match self {
            Self::Folder { items, .. } => items[index].label,
            Self::Idx { labels, .. } => labels.as_ref().map(|l| l[index] as i64),
        }
    }

    /// Decodes item `index`.
    pub fn decode(&self, index: usize) -> Result<image::DynamicImage, DataError> {
        match self {
            Self::Folder { items, .. } => {
                let path = &items[index].path;
                image::ImageReader::open(path)
                    .and_then(|r| r.with_guessed_format())
                    .map_err(|e| DataError::BadImage {
                        path: path.clone(),
                        message: e.to_string(),
                    })?
                    .decode()
                    .map_err(|e| DataError::BadImage {
                        path: path.clone(),
                        message: e.to_string(),
                    })
            }
            Self::Idx {
                rows, cols, pixels, ..
            } => {
                let n = rows * cols;
                let buf = pixels[index * n..(index + 1) * n].to_vec();
                let img = image::GrayImage::from_raw(*cols as u32, *rows as u32, buf)
                    .expect("IDX buffer length checked at open");
                Ok(image::DynamicImage::ImageLuma8(img))
            }
        }
    }
}

fn bad_image(
    path: &Path,
    message: &str,
    on_bad: OnBadImage,
    skipped: &mut usize,
) -> Result<(), DataError> {
    match on_bad {
        OnBadImage::Error => Err(DataError::BadImage {
            path: path.to_path_buf(),
            message: message.to_string(),
        }),
        OnBadImage::Warn => {
            eprintln!(
                "warning: skipping unreadable image {}: {message}",
                path.display()
            );
            *skipped += 1;
            Ok(())
        }
    }
}
