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

    /// Loads the cache of `key` if it was built completely, else builds it with `encode` (images
    /// `[n, c, h, w]` in [-1, 1] -> their posteriors' `(mean, std)`, each `[n, lc, lh, lw]`
    /// flattened, and the latent shape) and writes it.
    pub fn load_or_build(
        out: &Path,
        key: &str,
        dataset: &Dataset,
        transform: Transform,
        batch: usize,
        encode: &mut Encoder<'_>,
    ) -> Result<(Self, bool), IoError> {
        let dir = Self::dir(out, key);
        if let Some(cache) = Self::load(&dir, dataset.len())? {
            return Ok((cache, false));
        }
        let transform = transform.without_flip();
        let (c, r) = (transform.channels(), transform.resolution);
        let mut values = Vec::new();
        let mut shape = [0; 3];
        let mut start = 0;
        while start < dataset.len() {
            let n = batch.min(dataset.len() - start);
            // Each image and its mirror, side by side: [i0, i0 flipped, i1, i1 flipped, ...].
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
            let (mean, std, s) = encode(&pixels, [2 * n, c, r, r]);
            shape = s;
            let per: usize = s.iter().product();
            for k in 0..2 * n {
                values.extend_from_slice(&mean[k * per..(k + 1) * per]);
                values.extend_from_slice(&std[k * per..(k + 1) * per]);
            }
            start += n;
        }
        let cache = Self {
            values,
            shape,
            len: dataset.len(),
        };
        cache.save(&dir)?;
        Ok((cache, true))
    }

    fn save(&self, dir: &Path) -> Result<(), IoError> {
        let per = self.per();
        let [c, h, w] = self.shape;
        for (s, start) in (0..self.len).step_by(SHARD).enumerate() {
            let n = SHARD.min(self.len - start);
            let values = self.values[start * 4 * per..(start + n) * 4 * per].to_vec();
            let tensors = std::collections::BTreeMap::from([(
                "moments".to_string(),
                TensorData::new(values, [n, 2, 2, c, h, w]),
            )]);
            let meta = HashMap::from([("images".to_string(), n.to_string())]);
            save_tensors(
                &dir.join(format!("shard-{s:05}.safetensors")),
                &tensors,
                &meta,
            )?;
        }
        // Written last: a cache without it is incomplete and rebuilt.
        crate::io::write_atomic(&dir.join("complete"), self.len.to_string().as_bytes())
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

/// A short stable hash (FNV-1a, 64 bits, hex) of `parts`, for cache keys and fingerprints.
pub fn fingerprint(parts: &[&[u8]]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.iter().chain(&[0xff]) {
            h = (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}
