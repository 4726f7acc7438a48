//! The background batch loader: per-epoch seeded permutations, `drop_last` batches, decoding
//! on worker threads, data-parallel shards.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{DataError, Dataset, OnBadImage, Transform};

/// Images already warned about (by dataset path and index), so each is reported once.
static WARNED: std::sync::LazyLock<
    std::sync::Mutex<std::collections::HashSet<std::path::PathBuf>>,
> = std::sync::LazyLock::new(Default::default);

/// A batch of images on the host, `[batch, channels, res, res]` row-major, in [-1, 1].
#[derive(Debug, Clone)]
pub struct Batch {
    pub images: Vec<f32>,
    pub shape: [usize; 4],
    pub captions: Vec<Option<String>>,
    pub labels: Vec<Option<i64>>,
    /// Dataset indices (latent caches look samples up by them).
    pub indices: Vec<usize>,
    /// Whether each image was flipped by the transform.
    pub flipped: Vec<bool>,
    /// With data parallelism a batch is one rank's slice of the global batch: these are its
    /// first sample's position in the global batch and the global batch size (0 and the batch
    /// size otherwise). Per-sample randomness is drawn for the global batch, so it is the same
    /// whatever the number of ranks.
    pub offset: usize,
    pub global_size: usize,
}

impl Batch {
    /// Samples `range` of this batch, as a batch at its place in the global batch.
    pub fn slice(&self, range: std::ops::Range<usize>) -> Batch {
        let [_, c, h, w] = self.shape;
        // Batches for a latent cache carry no pixels.
        let per = if self.images.is_empty() { 0 } else { c * h * w };
        Batch {
            images: self.images[range.start * per..range.end * per].to_vec(),
            shape: [range.len(), c, h, w],
            captions: self.captions[range.clone()].to_vec(),
            labels: self.labels[range.clone()].to_vec(),
            indices: self.indices[range.clone()].to_vec(),
            flipped: self.flipped[range.clone()].to_vec(),
            offset: self.offset + range.start,
            global_size: self.global_size,
        }
    }
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

/// How a [`Loader`] reads its dataset.
#[derive(Debug, Clone)]
pub struct LoaderSpec {
    pub transform: Transform,
    /// Images per (global) micro-batch.
    pub batch_size: usize,
    /// Seeds the per-epoch order and the augmentation draws.
    pub seed: u64,
    /// Where the first batch is.
    pub start: LoaderPosition,
    /// Decoding threads.
    pub num_workers: usize,
    /// Batches decoded ahead.
    pub prefetch: usize,
    pub on_bad: OnBadImage,
    /// This replica's slice of each batch.
    pub shard: std::ops::Range<usize>,
    /// Decode the images (off when the run trains from cached latents: indices and flips
    /// only).
    pub decode: bool,
}

impl Loader {
    pub fn spawn(dataset: Arc<Dataset>, spec: LoaderSpec) -> Result<Self, DataError> {
        let LoaderSpec {
            transform,
            batch_size,
            seed,
            start,
            num_workers,
            prefetch,
            on_bad,
            shard,
            decode,
        } = spec;
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
                    decode,
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

// The loader thread's body: the spec unpacked plus the channel and counters it owns.
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
    decode: bool,
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
                decode,
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

// The decoding workers' body, with the same unpacked spec.
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
    decode: bool,
) -> Result<Batch, DataError> {
    type Decoded = (usize, Vec<f32>, bool);
    let decode_one = |slot: usize, index: usize| -> Result<Decoded, DataError> {
        // Augmentation randomness depends only on (seed, epoch, slot): thread-independent.
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xa06_0000);
        rng.set_stream(
            pos.epoch
                .wrapping_mul(1 << 32)
                .wrapping_add((pos.batch_in_epoch * indices.len() + slot) as u64),
        );
        if !decode {
            // Latents come from a cache: only the flip decision is needed (center crop).
            return Ok((index, Vec::new(), transform.flip_only(&mut rng)));
        }
        let len = dataset.len();
        for attempt in 0..len {
            let i = (index + attempt) % len;
            match dataset.decode(i) {
                Ok(img) => {
                    let (pixels, flipped) = transform.apply_flip(img, &mut rng);
                    return Ok((i, pixels, flipped));
                }
                Err(e) if on_bad == OnBadImage::Warn => {
                    // Once per file (a bad image fails again every epoch); the end-of-run
                    // summary gives the total count.
                    let first = WARNED
                        .lock()
                        .map(|mut w| w.insert(dataset.path().join(i.to_string())))
                        .unwrap_or(true);
                    if first {
                        eprintln!(
                            "warning: {e}; using the next image instead (warned once per file)"
                        );
                    }
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
    let decoded: Vec<Result<Decoded, DataError>> = std::thread::scope(|s| {
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
    let mut flipped = Vec::with_capacity(mine.len());
    for d in decoded {
        let (i, pixels, flip) = d?;
        images.extend_from_slice(&pixels);
        used.push(i);
        flipped.push(flip);
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
        flipped,
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
}
