//! The random streams of generation: image `i` of a request with seed `s` draws every random
//! number it needs (its initial noise, an ancestral sampler's noise, a PixelCNN's code draws)
//! from ChaCha8 keyed by `s`, stream `i`. So two seeds never share an image (each seed is
//! another key), and an image does not depend on how a request is split into batches (image
//! 12 is the same in one batch of 64 or in the second batch of 8).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

/// One stream per image of a batch: images `first..first + n` of a request.
pub struct ImageRngs(Vec<ChaCha8Rng>);

impl ImageRngs {
    pub fn new(seed: u64, first: usize, n: usize) -> Self {
        Self(
            (first..first + n)
                .map(|i| {
                    let mut rng = ChaCha8Rng::seed_from_u64(seed);
                    rng.set_stream(i as u64);
                    rng
                })
                .collect(),
        )
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `per_image` standard normals from each image's stream, image after image.
    pub fn normals(&mut self, per_image: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(per_image * self.0.len());
        for rng in &mut self.0 {
            out.extend((0..per_image).map(|_| rng.sample::<f32, _>(StandardNormal)));
        }
        out
    }

    /// Image `i`'s stream.
    pub fn image(&mut self, i: usize) -> &mut ChaCha8Rng {
        &mut self.0[i]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_depend_on_seed_and_index_only() {
        let all = ImageRngs::new(7, 0, 4).normals(3);
        let tail = ImageRngs::new(7, 2, 2).normals(3);
        assert_eq!(&all[6..], &tail[..]);
        let other = ImageRngs::new(8, 0, 4).normals(3);
        for i in 0..4 {
            for j in 0..4 {
                assert_ne!(all[i * 3..i * 3 + 3], other[j * 3..j * 3 + 3]);
            }
        }
    }
}
