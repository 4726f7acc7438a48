//! Latent caching for latent diffusion: every image encoded once by the frozen first stage,
//! kept as its posterior's mean and standard deviation, for the image and its mirror image.
//!
//! kohya caches one fixed latent sample per image, which changes the training distribution;
//! here the latent is drawn at training time from the cached `N(mean, std²)` with the same noise
//! the uncached path draws, so cached and uncached training give the same weights. The cache
//! lives in `<output_dir>/latent_cache/<key>/` as safetensors shards; the key is a hash of the
//! first stage's weights and of every transform setting, so a changed VAE or transform builds a
//! new cache instead of reusing a stale one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::TensorData;

use super::{Dataset, Transform};
use crate::io::IoError;
use crate::io::safetensors::{SafetensorsFile, save_tensors};

/// Images per shard file.
const SHARD: usize = 1024;

/// The cached posteriors of a dataset.
pub struct LatentCache {
    /// Per image, `[flipped 0/1][mean, std][c, h, w]`.
    values: Vec<f32>,
    /// The latent shape `[c, h, w]`.
    pub shape: [usize; 3],
    pub len: usize,
}

/// Encodes pixels `[n, c, h, w]` into the posterior's `(mean, std, [lc, lh, lw])`, on the host.
pub type Encoder<'a> = dyn FnMut(&[f32], [usize; 4]) -> (Vec<f32>, Vec<f32>, [usize; 3]) + 'a;

impl LatentCache {
    fn per(&self) -> usize {
        self.shape.iter().product()
    }

    /// `(mean, std)` of image `index`, mirrored or not.
    pub fn get(&self, index: usize, flipped: bool) -> (&[f32], &[f32]) {
        let per = self.per();
        let at = (index * 4 + 2 * flipped as usize) * per;
        (
            &self.values[at..at + per],
            &self.values[at + per..at + 2 * per],
        )
    }

    /// The cache folder for `key` under a run's output folder.
    pub fn dir(out: &Path, key: &str) -> PathBuf {
        out.join("latent_cache").join(key)
    }

    /// Loads the cache of `key` if it was built completely from the dataset's files as they are
    /// now (each file's size and modification time are recorded in `files.json`), else builds it
    /// with `encode` (images `[n, c, h, w]` in [-1, 1] -> their posteriors' `(mean, std)`, each
    /// `[n, lc, lh, lw]` flattened, and the latent shape), shard by shard: each shard is written
    /// when it is done, a build stopped between shards (`stop` says so) resumes from the shards
    /// already written, and a stop request is answered within one shard.
    pub fn load_or_build(
        out: &Path,
        key: &str,
        dataset: &Dataset,
        transform: Transform,
        batch: usize,
        encode: &mut Encoder<'_>,
        stop: &dyn Fn() -> bool,
    ) -> Result<(Self, Built), CacheError> {
        let dir = Self::dir(out, key);
        let files = manifest(dataset);
        let mut built = Built::Built;
        let complete = dir.join("complete").is_file();
        match changed_files(&dir, &files) {
            None if complete => {
                if let Some(cache) = Self::load(&dir, dataset.len())? {
                    return Ok((cache, Built::Reused));
                }
            }
            // A build that was stopped, of these same files: its shards are reused below.
            None => {}
            Some(why) => {
                // Stale: every shard goes (they hold the old images' latents).
                let _ = std::fs::remove_dir_all(&dir);
                if complete {
                    built = Built::Rebuilt(why);
                }
            }
        }
        std::fs::create_dir_all(&dir).map_err(|source| IoError::Write {
            path: dir.clone(),
            source,
        })?;
        crate::io::write_json(&dir.join("files.json"), &serde_json::json!(files))?;
        let transform = transform.without_flip();
        let (c, r) = (transform.channels(), transform.resolution);
        let mut values = Vec::new();
        let mut shape = [0; 3];
        for (s, shard_start) in (0..dataset.len()).step_by(SHARD).enumerate() {
            let shard_len = SHARD.min(dataset.len() - shard_start);
            let path = dir.join(format!("shard-{s:05}.safetensors"));
            if let Some((v, sh)) = read_shard(&path, shard_len) {
                values.extend(v);
                shape = sh;
                continue;
            }
            if stop() {
                return Err(CacheError::Stopped);
            }
            let mut shard = Vec::new();
            let mut start = shard_start;
            while start < shard_start + shard_len {
                let n = batch.min(shard_start + shard_len - start);
                // Each image and its mirror, side by side: [i0, i0 flipped, i1, ...].
                let mut pixels = Vec::with_capacity(2 * n * c * r * r);
                for i in start..start + n {
                    let img = dataset.decode(i).map_err(|e| IoError::Read {
                        path: dataset.path().to_path_buf(),
                        source: std::io::Error::other(e),
                    })?;
                    // Center crop, no flip: the transform draws nothing.
                    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
                    let plain = transform.apply(img, &mut rng);
                    let mut mirror = plain.clone();
                    for plane in mirror.chunks_mut(r) {
                        plane.reverse();
                    }
                    pixels.extend(plain);
                    pixels.extend(mirror);
                }
                let (mean, std, sh) = encode(&pixels, [2 * n, c, r, r]);
                shape = sh;
                let per: usize = sh.iter().product();
                for k in 0..2 * n {
                    shard.extend_from_slice(&mean[k * per..(k + 1) * per]);
                    shard.extend_from_slice(&std[k * per..(k + 1) * per]);
                }
                start += n;
            }
            write_shard(&path, &shard, shard_len, shape)?;
            values.extend(shard);
        }
        // Written last: a cache without it is incomplete (its shards are reused).
        crate::io::write_atomic(&dir.join("complete"), dataset.len().to_string().as_bytes())?;
        let cache = Self {
            values,
            shape,
            len: dataset.len(),
        };
        Ok((cache, built))
    }

    fn load(dir: &Path, len: usize) -> Result<Option<Self>, IoError> {
        let complete = std::fs::read_to_string(dir.join("complete")).ok();
        if complete.and_then(|t| t.trim().parse::<usize>().ok()) != Some(len) {
            return Ok(None);
        }
        let mut values = Vec::new();
        let mut shape = [0; 3];
        for s in 0..len.div_ceil(SHARD) {
            let path = dir.join(format!("shard-{s:05}.safetensors"));
            let file = SafetensorsFile::open(&path)?;
            let data = file.read("moments").map_err(|source| IoError::Tensor {
                path: path.clone(),
                source,
            })?;
            let dims = data.shape().to_vec();
            if dims.len() != 6 {
                return Err(IoError::Format {
                    path,
                    message: format!("moments has shape {dims:?}"),
                });
            }
            shape = [dims[3], dims[4], dims[5]];
            values.extend(data.convert::<f32>().try_into_vec::<f32>().map_err(|e| {
                IoError::Format {
                    path: path.clone(),
                    message: format!("{e:?}"),
                }
            })?);
        }
        Ok(Some(Self { values, shape, len }))
    }
}

/// How [`LatentCache::load_or_build`] got the cache.
#[derive(Debug, Clone, PartialEq)]
pub enum Built {
    Reused,
    Built,
    /// Built anew because the images changed since the old one: why.
    Rebuilt(String),
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error(transparent)]
    Io(#[from] IoError),
    /// A stop was requested (SIGINT/SIGTERM) between shards.
    #[error("the latent cache build was stopped")]
    Stopped,
}

/// Each data file's name (relative to the dataset's folder), size and modification time (ns).
type Manifest = Vec<(String, u64, u64)>;

fn manifest(dataset: &Dataset) -> Manifest {
    let root = dataset.path();
    dataset
        .files()
        .iter()
        .map(|p| {
            let meta = std::fs::metadata(p).ok();
            let size = meta.as_ref().map_or(0, |m| m.len());
            let mtime = meta
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos() as u64);
            let name = p.strip_prefix(root).unwrap_or(p).display().to_string();
            (name, size, mtime)
        })
        .collect()
}

/// Why the cache in `dir` does not describe `files` (`None` when it does). A cache without a
/// record of its files (from before the record was kept) is rebuilt too.
fn changed_files(dir: &Path, files: &Manifest) -> Option<String> {
    let Some(old) = std::fs::read(dir.join("files.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Manifest>(&b).ok())
    else {
        return Some("it has no record of the files it was built from".into());
    };
    let changed: Vec<&str> = files
        .iter()
        .filter(|f| !old.contains(f))
        .map(|f| f.0.as_str())
        .collect();
    if changed.is_empty() && old.len() == files.len() {
        return None;
    }
    let shown: Vec<&str> = changed.iter().take(3).copied().collect();
    Some(format!(
        "{} image file(s) changed since it was built ({}{})",
        changed.len().max(1),
        if shown.is_empty() {
            "files were removed".to_string()
        } else {
            shown.join(", ")
        },
        if changed.len() > 3 { ", ..." } else { "" }
    ))
}

/// A shard's values and latent shape, when it was written completely for `n` images.
fn read_shard(path: &Path, n: usize) -> Option<(Vec<f32>, [usize; 3])> {
    let file = SafetensorsFile::open(path).ok()?;
    let data = file.read("moments").ok()?;
    let dims = data.shape().to_vec();
    if dims.len() != 6 || dims[0] != n {
        return None;
    }
    let shape = [dims[3], dims[4], dims[5]];
    Some((data.convert::<f32>().try_into_vec::<f32>().ok()?, shape))
}

fn write_shard(path: &Path, values: &[f32], n: usize, shape: [usize; 3]) -> Result<(), IoError> {
    let [c, h, w] = shape;
    let tensors = std::collections::BTreeMap::from([(
        "moments".to_string(),
        TensorData::new(values.to_vec(), [n, 2, 2, c, h, w]),
    )]);
    let meta = HashMap::from([("images".to_string(), n.to_string())]);
    save_tensors(path, &tensors, &meta)
}
