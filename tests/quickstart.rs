//! The quickstart recipe learns what the shapes dataset looks like: a statistic that tells
//! "one flat-coloured shape on a flat background" from blobs (the one `scripts/eval_shapes.py`
//! computes, with the dataset and an untrained model as its reference points) on samples of a
//! shortened quickstart run.

use std::path::Path;

use difftrain::config::Config;
use difftrain::data::{Dataset, Transform};
use difftrain::pipelines::{self, SampleRequest};
use difftrain::train::TrainOptions;

/// `[h][w]` RGB pixels in 0..=255.
type Image = Vec<Vec<[i32; 3]>>;

fn median(mut v: Vec<i32>) -> i32 {
    v.sort_unstable();
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2
    }
}

fn median_colour(pixels: &[[i32; 3]]) -> [i32; 3] {
    [0, 1, 2].map(|c| median(pixels.iter().map(|p| p[c]).collect()))
}

fn dist(a: [i32; 3], b: [i32; 3]) -> i32 {
    (0..3).map(|c| (a[c] - b[c]).abs()).max().unwrap()
}

/// Whether `img` is one flat-coloured shape on a flat background (scripts/eval_shapes.py):
/// the background is the border's median colour; the foreground (pixels > 48 from it) covers
/// 4-70%; >= 85% of the interior foreground is within 40 of its median colour; >= 90% of the
/// background is within 32 of the background colour.
fn flat_shape(img: &Image) -> bool {
    let (h, w) = (img.len(), img[0].len());
    let mut border = Vec::new();
    for (&top, &bottom) in img[0].iter().zip(&img[h - 1]) {
        border.push(top);
        border.push(bottom);
    }
    for row in img {
        border.push(row[0]);
        border.push(row[w - 1]);
    }
    let bg = median_colour(&border);
    let fg: Vec<Vec<bool>> = img
        .iter()
        .map(|r| r.iter().map(|&p| dist(p, bg) > 48).collect())
        .collect();
    let frac = fg.iter().flatten().filter(|&&f| f).count() as f64 / (h * w) as f64;
    if !(0.04..=0.7).contains(&frac) {
        return false;
    }
    let mut inner = Vec::new();
    for y in 1..h - 1 {
        for x in 1..w - 1 {
            if fg[y][x] && fg[y - 1][x] && fg[y + 1][x] && fg[y][x - 1] && fg[y][x + 1] {
                inner.push(img[y][x]);
            }
        }
    }
    if inner.len() < 2 {
        return false;
    }
    let colour = median_colour(&inner);
    let pure = inner.iter().filter(|&&p| dist(p, colour) <= 40).count() as f64 / inner.len() as f64;
    let background: Vec<[i32; 3]> = (0..h)
        .flat_map(|y| (0..w).map(move |x| (y, x)))
        .filter(|&(y, x)| !fg[y][x])
        .map(|(y, x)| img[y][x])
        .collect();
    let flat_bg =
        background.iter().filter(|&&p| dist(p, bg) <= 32).count() as f64 / background.len() as f64;
    pure >= 0.85 && flat_bg >= 0.9
}

/// `[n, 3, h, w]` floats in [-1, 1] as 8-bit images (as the PNG writer rounds them).
fn images(data: &[f32], shape: [usize; 4]) -> Vec<Image> {
    let [n, c, h, w] = shape;
    assert_eq!(c, 3);
    (0..n)
        .map(|i| {
            (0..h)
                .map(|y| {
                    (0..w)
                        .map(|x| {
                            [0, 1, 2].map(|ch| {
                                let v = data[((i * c + ch) * h + y) * w + x];
                                (((v + 1.0) * 0.5).clamp(0.0, 1.0) * 255.0).round() as i32
                            })
                        })
                        .collect()
                })
                .collect()
        })
        .collect()
}

fn flat_fraction(imgs: &[Image]) -> f64 {
    imgs.iter().filter(|i| flat_shape(i)).count() as f64 / imgs.len() as f64
}

/// The shipped quickstart config, shortened to `steps`, writing under `out`.
fn quickstart(out: &Path, steps: usize) -> Config {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut c = Config::load(&root.join("configs/quickstart.toml"), &[]).unwrap();
    c.data.path = root.join(&c.data.path);
    c.run.output_dir = Some(out.to_path_buf());
    c.train.max_steps = steps;
    c.train.lr_warmup_steps = c.train.lr_warmup_steps.min(steps / 10);
    c.checkpoint.every_steps = 0;
    c.logging.sample_every = 0;
    c.logging.tensorboard = false;
    c
}

fn samples(out: &Path) -> Vec<Image> {
    let req = SampleRequest {
        num: Some(64),
        seed: 1,
        ..SampleRequest::default()
    };
    let (grid, _) = pipelines::sample(out, &req).unwrap();
    images(&grid.images, grid.shape)
}

#[test]
fn quickstart_recipe_learns_flat_shapes() {
    let opts = TrainOptions {
        write_outputs: true,
        quiet: true,
        overflow_at_step: None,
        overrides: Vec::new(),
    };
    let tmp = tempfile::tempdir().unwrap();
    // Reference points: the dataset itself, and a model trained for one step.
    let c = quickstart(&tmp.path().join("untrained"), 1);
    let ds = Dataset::open(c.data.source, &c.data.path, c.data.on_bad_image).unwrap();
    let t = Transform {
        random_flip: false,
        ..c.data.transform()
    };
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
    let mut data = Vec::new();
    for i in 0..256 {
        data.extend(t.apply(ds.decode(i).unwrap(), &mut rng));
    }
    let r = c.data.resolution;
    let dataset = flat_fraction(&images(&data, [256, 3, r, r]));
    pipelines::train(&c, &opts).unwrap();
    let untrained = flat_fraction(&samples(&tmp.path().join("untrained")));
    // The recipe, a shortened run (the full 900 steps reach ~97%, the dataset's own level).
    let c = quickstart(&tmp.path().join("trained"), 400);
    pipelines::train(&c, &opts).unwrap();
    let trained = flat_fraction(&samples(&tmp.path().join("trained")));
    eprintln!(
        "flat single-colour shapes: dataset {:.0}%, untrained {:.0}%, quickstart recipe at 400 steps {:.0}%",
        dataset * 100.0,
        untrained * 100.0,
        trained * 100.0
    );
    assert!(
        dataset >= 0.9,
        "the statistic rejects the dataset itself: {dataset}"
    );
    assert!(
        untrained <= 0.05,
        "the statistic accepts noise: {untrained}"
    );
    assert!(
        trained >= 0.4,
        "the quickstart recipe did not learn flat shapes: {trained}"
    );
}
