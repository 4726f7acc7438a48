//! Datasets, transforms and the background batch loader.
//!
//! Sources: a folder of PNG/JPEG images with an optional Hugging Face "imagefolder"
//! `metadata.jsonl` (`file_name`, `text`, optional `label`), or MNIST-format IDX files
//! (`train-images-idx3-ubyte`, optionally `.gz`). Transforms follow diffusers'
//! `train_unconditional.py`: resize the shorter side, center or random crop, optional horizontal
//! flip, scale to [-1, 1]. Shuffling is a per-epoch permutation drawn from the run seed, and
//! every random augmentation is seeded by (seed, epoch, position), so a batch is a pure function
//! of where it is in the run: background threads cannot change results and resume is exact.

use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use image::imageops::FilterType;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataSource {
    /// A folder of images, optionally with `metadata.jsonl`.
    ImageFolder,
    /// MNIST-format IDX files: `data.path` is the file or the folder holding it.
    MnistIdx,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColorMode {
    Rgb,
    Grayscale,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CropMode {
    Center,
    Random,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnBadImage {
    /// Warn, naming the file, and use the next readable image instead.
    Warn,
    /// Stop with an error naming the file.
    Error,
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("dataset path {path} does not exist")]
    Missing { path: PathBuf },
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Metadata {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: not an MNIST IDX image file: {message}")]
    Idx { path: PathBuf, message: String },
    #[error("unreadable image {path}: {message}")]
    BadImage { path: PathBuf, message: String },
    #[error("dataset {path} is empty: {detail}")]
    Empty { path: PathBuf, detail: String },
    #[error("dataset {path} has {len} usable images, fewer than one batch of {batch}")]
    TooSmall {
        path: PathBuf,
        len: usize,
        batch: usize,
    },
    #[error("every image in {path} failed to decode")]
    NothingDecodes { path: PathBuf },
}

/// What to do to each image.
#[derive(Debug, Clone, Copy)]
pub struct Transform {
    pub resolution: usize,
    pub color: ColorMode,
    pub crop: CropMode,
    pub random_flip: bool,
}

impl Transform {
    pub fn channels(&self) -> usize {
        match self.color {
            ColorMode::Rgb => 3,
            ColorMode::Grayscale => 1,
        }
    }

    /// Resize (shorter side), crop, flip, and scale to [-1, 1]; returns CHW floats.
    pub fn apply(&self, img: image::DynamicImage, rng: &mut impl Rng) -> Vec<f32> {
        let r = self.resolution as u32;
        let (w, h) = (img.width(), img.height());
        let scale = r as f64 / w.min(h) as f64;
        let (nw, nh) = (
            ((w as f64 * scale).round() as u32).max(r),
            ((h as f64 * scale).round() as u32).max(r),
        );
        let img = if (nw, nh) == (w, h) {
            img
        } else {
            img.resize_exact(nw, nh, FilterType::Triangle)
        };
        let (x0, y0) = match self.crop {
            CropMode::Center => ((nw - r) / 2, (nh - r) / 2),
            CropMode::Random => (rng.random_range(0..=nw - r), rng.random_range(0..=nh - r)),
        };
        let img = img.crop_imm(x0, y0, r, r);
        let flip = self.random_flip && rng.random_bool(0.5);
        let c = self.channels();
        let n = (r * r) as usize;
        let mut out = vec![0f32; c * n];
        let to_unit = |v: u8| v as f32 / 127.5 - 1.0;
        let buf: Vec<u8> = match self.color {
            ColorMode::Rgb => img.to_rgb8().into_raw(),
            ColorMode::Grayscale => img.to_luma8().into_raw(),
        };
        for y in 0..r as usize {
            for x in 0..r as usize {
                let sx = if flip { r as usize - 1 - x } else { x };
                for ch in 0..c {
                    out[ch * n + y * r as usize + x] = to_unit(buf[(y * r as usize + sx) * c + ch]);
                }
            }
        }
        out
    }
}

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

#[derive(Deserialize)]
struct MetadataLine {
    file_name: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    label: Option<i64>,
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
        if ds.len() == 0 {
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
                let line = line.map_err(|source| DataError::Io {
                    path: meta_path.clone(),
                    source,
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
            let mut paths = Vec::new();
            let mut stack = vec![root.to_path_buf()];
            while let Some(dir) = stack.pop() {
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
                    if p.is_dir() {
                        stack.push(p);
                    } else if is_image(&p) {
                        paths.push(p);
                    }
                }
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

/// A batch of images on the host, `[batch, channels, res, res]` row-major, in [-1, 1].
#[derive(Debug, Clone)]
pub struct Batch {
    pub images: Vec<f32>,
    pub shape: [usize; 4],
    pub captions: Vec<Option<String>>,
    pub labels: Vec<Option<i64>>,
    /// Dataset indices, for tests and debugging.
    pub indices: Vec<usize>,
    /// With data parallelism a batch is one rank's slice of the global batch: these are its
    /// first sample's position in the global batch and the global batch size (0 and the batch
    /// size otherwise). Per-sample randomness is drawn for the global batch, so it is the same
    /// whatever the number of ranks.
    pub offset: usize,
    pub global_size: usize,
}

/// Where the loader stands: epoch and the next batch within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LoaderPosition {
    pub epoch: u64,
    pub batch_in_epoch: usize,
}

/// The deterministic order of one epoch: `drop_last` batches of a seeded permutation.
pub fn epoch_order(len: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_da7a);
    rng.set_stream(epoch);
    order.shuffle(&mut rng);
    order
}

/// Streams batches decoded on background threads, in a fixed order from `start` on.
/// An epoch is `len / batch_size` batches; the remainder of the permutation is dropped, so every
/// batch has the same shape (PyTorch `drop_last=True`). With data parallelism every rank runs
/// its own loader over the same global batches and decodes only its `shard` of each (a
/// contiguous range of slots), so the ranks' shards are disjoint and together are exactly the
/// single-device batch.
pub struct Loader {
    rx: Receiver<Result<(LoaderPosition, Batch), DataError>>,
    position: LoaderPosition,
    pub bad_images: Arc<AtomicUsize>,
    pub batches_per_epoch: usize,
}

impl Loader {
    pub fn spawn(
        dataset: Arc<Dataset>,
        transform: Transform,
        batch_size: usize,
        seed: u64,
        start: LoaderPosition,
        num_workers: usize,
        prefetch: usize,
        on_bad: OnBadImage,
        shard: std::ops::Range<usize>,
    ) -> Result<Self, DataError> {
        assert!(
            shard.start < shard.end && shard.end <= batch_size,
            "bad shard {shard:?}"
        );
        let len = dataset.len();
        if len < batch_size {
            return Err(DataError::TooSmall {
                path: dataset.path().to_path_buf(),
                len,
                batch: batch_size,
            });
        }
        let batches_per_epoch = len / batch_size;
        let (tx, rx) = sync_channel(prefetch.max(1));
        let bad_images = Arc::new(AtomicUsize::new(0));
        let bad = bad_images.clone();
        std::thread::Builder::new()
            .name("difftrain-loader".into())
            .spawn(move || {
                produce(
                    dataset,
                    transform,
                    batch_size,
                    seed,
                    start,
                    num_workers.max(1),
                    on_bad,
                    bad,
                    shard,
                    tx,
                )
            })
            .map_err(|source| DataError::Io {
                path: PathBuf::from("<loader thread>"),
                source,
            })?;
        Ok(Self {
            rx,
            position: start,
            bad_images,
            batches_per_epoch,
        })
    }

    /// The position of the next batch `next_batch` will return.
    pub fn position(&self) -> LoaderPosition {
        self.position
    }

    pub fn next_batch(&mut self) -> Result<Batch, DataError> {
        let (pos, batch) = self
            .rx
            .recv()
            .expect("loader thread ended without reporting an error")?;
        debug_assert_eq!(pos, self.position);
        self.position = if pos.batch_in_epoch + 1 == self.batches_per_epoch {
            LoaderPosition {
                epoch: pos.epoch + 1,
                batch_in_epoch: 0,
            }
        } else {
            LoaderPosition {
                epoch: pos.epoch,
                batch_in_epoch: pos.batch_in_epoch + 1,
            }
        };
        Ok(batch)
    }
}

#[allow(clippy::too_many_arguments)]
fn produce(
    dataset: Arc<Dataset>,
    transform: Transform,
    batch_size: usize,
    seed: u64,
    start: LoaderPosition,
    workers: usize,
    on_bad: OnBadImage,
    bad: Arc<AtomicUsize>,
    shard: std::ops::Range<usize>,
    tx: SyncSender<Result<(LoaderPosition, Batch), DataError>>,
) {
    let len = dataset.len();
    let per_epoch = len / batch_size;
    let mut pos = start;
    loop {
        let order = epoch_order(len, seed, pos.epoch);
        while pos.batch_in_epoch < per_epoch {
            let idx =
                &order[pos.batch_in_epoch * batch_size..(pos.batch_in_epoch + 1) * batch_size];
            let result = decode_batch(
                &dataset,
                transform,
                idx,
                shard.clone(),
                seed,
                pos,
                workers,
                on_bad,
                &bad,
            );
            if tx.send(result.map(|b| (pos, b))).is_err() {
                return; // the trainer hung up
            }
            pos.batch_in_epoch += 1;
        }
        pos = LoaderPosition {
            epoch: pos.epoch + 1,
            batch_in_epoch: 0,
        };
    }
}

#[allow(clippy::too_many_arguments)]
fn decode_batch(
    dataset: &Dataset,
    transform: Transform,
    indices: &[usize],
    slots: std::ops::Range<usize>,
    seed: u64,
    pos: LoaderPosition,
    workers: usize,
    on_bad: OnBadImage,
    bad: &AtomicUsize,
) -> Result<Batch, DataError> {
    let decode_one = |slot: usize, index: usize| -> Result<(usize, Vec<f32>), DataError> {
        // Augmentation randomness depends only on (seed, epoch, slot): thread-independent.
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xa06_0000);
        rng.set_stream(
            pos.epoch
                .wrapping_mul(1 << 32)
                .wrapping_add((pos.batch_in_epoch * indices.len() + slot) as u64),
        );
        let len = dataset.len();
        for attempt in 0..len {
            let i = (index + attempt) % len;
            match dataset.decode(i) {
                Ok(img) => return Ok((i, transform.apply(img, &mut rng))),
                Err(e) if on_bad == OnBadImage::Warn => {
                    eprintln!("warning: {e}; using the next image instead");
                    bad.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        Err(DataError::NothingDecodes {
            path: dataset.path().to_path_buf(),
        })
    };
    let mine = &indices[slots.clone()];
    let chunk = mine.len().div_ceil(workers);
    let decoded: Vec<Result<(usize, Vec<f32>), DataError>> = std::thread::scope(|s| {
        let handles: Vec<_> = mine
            .chunks(chunk)
            .enumerate()
            .map(|(c, part)| {
                let decode_one = &decode_one;
                let first = slots.start + c * chunk;
                s.spawn(move || {
                    part.iter()
                        .enumerate()
                        .map(|(j, &index)| decode_one(first + j, index))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("decode thread panicked"))
            .collect()
    });
    let r = transform.resolution;
    let c = transform.channels();
    let mut images = Vec::with_capacity(mine.len() * c * r * r);
    let mut used = Vec::with_capacity(mine.len());
    for d in decoded {
        let (i, pixels) = d?;
        images.extend_from_slice(&pixels);
        used.push(i);
    }
    let captions = used
        .iter()
        .map(|&i| dataset.caption(i).map(str::to_string))
        .collect();
    let labels = used.iter().map(|&i| dataset.label(i)).collect();
    Ok(Batch {
        images,
        shape: [mine.len(), c, r, r],
        captions,
        labels,
        indices: used,
        offset: slots.start,
        global_size: indices.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn epochs_are_permutations_that_differ() {
        let a = epoch_order(100, 7, 0);
        let b = epoch_order(100, 7, 1);
        assert_ne!(a, b);
        assert_eq!(a, epoch_order(100, 7, 0));
        let set: HashSet<usize> = a.iter().copied().collect();
        assert_eq!(set.len(), 100);
    }

    #[test]
    fn transform_scales_to_unit_range_and_flips() {
        let mut img = image::RgbImage::new(4, 4);
        img.put_pixel(0, 0, image::Rgb([255, 0, 128]));
        let t = Transform {
            resolution: 4,
            color: ColorMode::Rgb,
            crop: CropMode::Center,
            random_flip: false,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let out = t.apply(image::DynamicImage::ImageRgb8(img.clone()), &mut rng);
        assert_eq!(out.len(), 48);
        assert_eq!((out[0], out[16], out[1]), (1.0, -1.0, -1.0));
        assert!((out[32] - 0.003_921_6).abs() < 1e-6);
        let flip = Transform {
            random_flip: true,
            ..t
        };
        let flips: HashSet<bool> = (0..16)
            .map(|_| flip.apply(image::DynamicImage::ImageRgb8(img.clone()), &mut rng)[3] == 1.0)
            .collect();
        assert_eq!(
            flips.len(),
            2,
            "random_flip should sometimes flip and sometimes not"
        );
    }
}
