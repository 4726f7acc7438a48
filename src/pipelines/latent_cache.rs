//! `data.cache_latents` for the latent families (latent diffusion and LoRA): the dataset's
//! posterior moments under a frozen first stage, loaded or built once (by rank 0 first in a
//! multi-process launch). The cache itself is `data::latent_cache`.

use std::sync::Arc;

use burn::prelude::*;

use crate::config::Config;
use crate::data::Dataset;
use crate::data::latent_cache::{Built, CacheError, LatentCache};
use crate::io::layout::fingerprint;
use crate::models::latent_diffusion::FirstStage;
use crate::nn::to_host;
use crate::train::TrainError;

/// `data.cache_latents`: the dataset's posterior moments under the frozen `first` stage (whose
/// weights hash to `first_fingerprint`), loaded or built once; `None` when caching is off.
pub fn latent_cache(
    cfg: &Config,
    first: &FirstStage,
    first_fingerprint: &str,
    dataset: &Dataset,
    device: &Device,
    quiet: bool,
) -> Result<Option<Arc<LatentCache>>, TrainError> {
    if !cfg.data.cache_latents {
        return Ok(None);
    }
    // A first stage held in half (a mixed-precision LoRA run reads its VAE in half) encodes
    // slightly differently: its cache is another one. (f32 keeps the key it always had.)
    let transform = format!("{:?}", cfg.data.transform());
    let dataset_path = dataset.path().to_string_lossy();
    let mut parts = vec![
        first_fingerprint.as_bytes(),
        transform.as_bytes(),
        dataset_path.as_bytes(),
    ];
    let dtype = crate::optim::precision::weights_dtype(first)
        .filter(|d| *d != burn::tensor::DType::F32)
        .map(|d| format!("{d:?}"));
    if let Some(d) = &dtype {
        parts.push(d.as_bytes());
    }
    let key = fingerprint(&parts);
    let mut encode = |pixels: &[f32], shape: [usize; 4]| {
        let x = Tensor::<4>::from_data(TensorData::new(pixels.to_vec(), shape), device);
        let (mean, std) = first.moments(x);
        let dims = mean.dims();
        let std = std
            .map(to_host)
            .unwrap_or_else(|| vec![0.0; dims.iter().product()]);
        (to_host(mean), std, [dims[1], dims[2], dims[3]])
    };
    // In a multi-process launch rank 0 builds it and the others then load it (accelerate's
    // `main_process_first`).
    let process = crate::distributed::launch::current();
    const BUILT: &str = "the latent cache (rank 0 builds it)";
    if let Some(p) = process.as_ref().filter(|p| p.rank() > 0) {
        p.barrier(BUILT)?;
    }
    crate::signals::test_phase("latent_cache");
    // A stop request is answered between shards (those written are reused on resume).
    let stop = || crate::signals::requested().is_some();
    let built = LatentCache::load_or_build(
        &cfg.output_dir(),
        &key,
        dataset,
        cfg.data.transform(),
        cfg.train.batch_size.max(1),
        &mut encode,
        &stop,
    );
    let (cache, built) = match built {
        Ok(b) => b,
        Err(CacheError::Io(e)) => return Err(e.into()),
        Err(CacheError::Stopped) => {
            return Err(TrainError::Interrupted {
                signal: crate::signals::requested().unwrap_or(15),
                step: 0,
                checkpoint: None,
            });
        }
    };
    if let Some(p) = process.as_ref().filter(|p| p.rank() == 0) {
        p.barrier(BUILT)?;
    }
    if !quiet {
        let dir = LatentCache::dir(&cfg.output_dir(), &key);
        let what = match &built {
            Built::Built => "built".to_string(),
            Built::Reused => "reused".to_string(),
            Built::Rebuilt(why) => format!("rebuilt because {why}"),
        };
        eprintln!(
            "latent cache {what}: {} ({} images)",
            dir.display(),
            cache.len
        );
    }
    Ok(Some(Arc::new(cache)))
}
