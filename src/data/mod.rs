//! Datasets, transforms and the background batch loader, and the `[data]` config section.
//!
//! Sources: a folder of PNG/JPEG images with an optional Hugging Face "imagefolder"
//! `metadata.jsonl` (`file_name`, `text`, optional `label`), or MNIST-format IDX files
//! (`train-images-idx3-ubyte`, optionally `.gz`). Transforms follow diffusers'
//! `train_unconditional.py`: resize the shorter side, center or random crop, optional horizontal
//! flip, scale to [-1, 1]. Shuffling is a per-epoch permutation drawn from the run seed, and
//! every random augmentation is seeded by (seed, epoch, position), so a batch is a pure function
//! of where it is in the run: background threads cannot change results and resume is exact.

pub mod dataset;
pub mod latent_cache;
pub mod loader;

use std::path::PathBuf;

use image::imageops::FilterType;
use rand::Rng;
use serde::{Deserialize, Serialize};

pub use dataset::Dataset;
pub use loader::{Batch, Loader, LoaderPosition, LoaderSpec};

/// `[data]`: where the images are and how each is transformed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    pub source: DataSource,
    pub path: PathBuf,
    pub resolution: usize,
    pub color: ColorMode,
    pub crop: CropMode,
    pub random_flip: bool,
    pub on_bad_image: OnBadImage,
    /// Threads decoding images in the background.
    pub num_workers: usize,
    /// Batches decoded ahead of the compute.
    pub prefetch_batches: usize,
    /// Latent diffusion: encode the dataset once with the frozen first stage (each image's
    /// posterior mean and std, both flips) and train from that cache instead of decoding
    /// images every step. Needs `crop = "center"`.
    pub cache_latents: bool,
    /// LoRA with a frozen text encoder: encode each distinct caption once and reuse its
    /// embedding (diffusers/kohya's `cache_text_encoder_outputs`).
    pub cache_text_embeddings: bool,
    /// A text-conditioned run (LoRA, latent diffusion on captions) whose images have no
    /// caption is refused unless this says training on empty prompts is meant.
    pub allow_empty_captions: bool,
}

impl crate::resume::ResumeRules for DataConfig {
    /// What the images are: another source, size or colour mode makes other training data.
    /// The path and the loading options may change (a moved dataset, more workers).
    fn breaks_resume(&self, old: &Self, prefix: &str) -> Vec<crate::resume::Change> {
        use crate::resume::field;
        let why = "changes the training images";
        [
            field(prefix, "source", &old.source, &self.source, why),
            field(prefix, "resolution", &old.resolution, &self.resolution, why),
            field(prefix, "color", &old.color, &self.color, why),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

impl DataConfig {
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.resolution == 0 {
            p.push("data.resolution must be positive".into());
        }
        if self.num_workers == 0 {
            p.push("data.num_workers must be at least 1".into());
        }
        if self.cache_latents && self.crop != CropMode::Center {
            p.push(
                "data.cache_latents needs data.crop = \"center\" (a random crop cannot be cached; \
                 flips can)"
                    .into(),
            );
        }
        p
    }

    /// The channel count images have after loading.
    pub fn channels(&self) -> usize {
        self.color.channels()
    }

    /// The training transform (random flips as configured).
    pub fn transform(&self) -> Transform {
        Transform {
            resolution: self.resolution,
            color: self.color,
            crop: self.crop,
            random_flip: self.random_flip,
        }
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            source: DataSource::ImageFolder,
            path: PathBuf::from("datasets/shapes"),
            resolution: 32,
            color: ColorMode::Rgb,
            crop: CropMode::Center,
            random_flip: false,
            on_bad_image: OnBadImage::Warn,
            num_workers: 2,
            prefetch_batches: 4,
            cache_latents: false,
            cache_text_embeddings: false,
            allow_empty_captions: false,
        }
    }
}

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

impl ColorMode {
    pub fn channels(self) -> usize {
        match self {
            Self::Rgb => 3,
            Self::Grayscale => 1,
        }
    }
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
    #[error(
        "{missing} of {total} images in {path} have no caption (captions come from a \
         metadata.jsonl with a \"text\" per image); a text-conditioned run would train them \
         on the empty prompt. Add the captions, or set data.allow_empty_captions = true if that \
         is meant"
    )]
    NoCaptions {
        path: PathBuf,
        missing: usize,
        total: usize,
    },
    #[error("{path} line {line}: {message}")]
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
        self.color.channels()
    }

    /// This transform without random flips (fixed batches: grids, the latent scale, caches).
    pub fn without_flip(self) -> Self {
        Self {
            random_flip: false,
            ..self
        }
    }

    /// The dataset's images `indices` through this transform, one after the other with draws
    /// from `rng`: `(pixels, [n, c, r, r])`.
    pub fn batch(
        &self,
        dataset: &Dataset,
        indices: &[usize],
        rng: &mut impl Rng,
    ) -> Result<(Vec<f32>, [usize; 4]), DataError> {
        let mut images = Vec::new();
        for &i in indices {
            images.extend(self.apply(dataset.decode(i)?, rng));
        }
        let r = self.resolution;
        Ok((images, [indices.len(), self.channels(), r, r]))
    }

    /// Resize (shorter side), crop, flip, and scale to [-1, 1]; returns CHW floats.
    pub fn apply(&self, img: image::DynamicImage, rng: &mut impl Rng) -> Vec<f32> {
        self.apply_flip(img, rng).0
    }

    /// The flip decision [`Transform::apply`] makes, drawn from `rng` the same way, without an
    /// image; only for center crops (a random crop's draws need the image's size).
    pub fn flip_only(&self, rng: &mut impl Rng) -> bool {
        debug_assert_eq!(self.crop, CropMode::Center);
        self.random_flip && rng.random_bool(0.5)
    }

    /// [`Transform::apply`], also saying whether the image was flipped.
    pub fn apply_flip(&self, img: image::DynamicImage, rng: &mut impl Rng) -> (Vec<f32>, bool) {
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
        (out, flip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use std::collections::HashSet;

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
