//! Sample grids as PNG: images `[n, c, h, w]` in [-1, 1] tiled with 2px gaps.

use std::path::Path;

use super::{IoError, write_atomic};

/// Images `[n, c, h, w]` in [-1, 1] (host, row-major) to show as a grid of `columns`.
#[derive(Debug, Clone)]
pub struct Grid {
    pub images: Vec<f32>,
    pub shape: [usize; 4],
    pub columns: usize,
}

impl Grid {
    /// A near-square grid of `images`.
    pub fn square(images: Vec<f32>, shape: [usize; 4]) -> Self {
        Self {
            images,
            shape,
            columns: grid_columns(shape[0]),
        }
    }
}

/// An encoded grid and its size (TensorBoard's image summary needs both).
pub struct GridPng {
    pub png: Vec<u8>,
    pub width: u32,
    pub height: u32,
}

/// The column count of a near-square grid of `n` images.
pub fn grid_columns(n: usize) -> usize {
    (n as f64).sqrt().ceil() as usize
}

/// Encodes images `[n, c, h, w]` in [-1, 1] as one RGB PNG grid with `ncol` columns.
pub fn grid_png(
    images: &[f32],
    shape: [usize; 4],
    ncol: usize,
) -> Result<GridPng, ::image::ImageError> {
    let [n, c, h, w] = shape;
    let ncol = ncol.clamp(1, n.max(1));
    let nrow = n.div_ceil(ncol);
    let pad = 2;
    let (gw, gh) = (ncol * (w + pad) + pad, nrow * (h + pad) + pad);
    let mut grid = ::image::RgbImage::from_pixel(gw as u32, gh as u32, ::image::Rgb([0, 0, 0]));
    let to_u8 = |v: f32| (((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round()) as u8;
    for i in 0..n {
        let (ox, oy) = (pad + (i % ncol) * (w + pad), pad + (i / ncol) * (h + pad));
        for y in 0..h {
            for x in 0..w {
                let px = |ch: usize| to_u8(images[((i * c + ch.min(c - 1)) * h + y) * w + x]);
                grid.put_pixel(
                    (ox + x) as u32,
                    (oy + y) as u32,
                    ::image::Rgb([px(0), px(1), px(2)]),
                );
            }
        }
    }
    let mut png = Vec::new();
    grid.write_to(
        &mut std::io::Cursor::new(&mut png),
        ::image::ImageFormat::Png,
    )?;
    Ok(GridPng {
        png,
        width: gw as u32,
        height: gh as u32,
    })
}

/// Writes a grid as one PNG with 2px gaps.
pub fn save_grid(grid: &Grid, path: &Path) -> Result<GridPng, IoError> {
    let grid =
        grid_png(&grid.images, grid.shape, grid.columns).map_err(|source| IoError::Image {
            path: path.to_path_buf(),
            source,
        })?;
    write_atomic(path, &grid.png)?;
    Ok(grid)
}

/// Writes the one image of `grid` as a PNG without a border.
pub fn save_image(grid: &Grid, path: &Path) -> Result<(), IoError> {
    let png = single_png(grid).map_err(|source| IoError::Image {
        path: path.to_path_buf(),
        source,
    })?;
    write_atomic(path, &png)
}

/// Writes each image of a grid as its own PNG, `<dir>/<first + index:04>.png`; returns the
/// paths.
pub fn save_images(
    grid: &Grid,
    dir: &Path,
    first: usize,
) -> Result<Vec<std::path::PathBuf>, IoError> {
    let [n, c, h, w] = grid.shape;
    let per = c * h * w;
    (0..n)
        .map(|i| {
            let path = dir.join(format!("{:04}.png", first + i));
            let one = Grid {
                images: grid.images[i * per..(i + 1) * per].to_vec(),
                shape: [1, c, h, w],
                columns: 1,
            };
            let png = single_png(&one).map_err(|source| IoError::Image {
                path: path.clone(),
                source,
            })?;
            write_atomic(&path, &png)?;
            Ok(path)
        })
        .collect()
}

/// One image without the grid's border.
fn single_png(grid: &Grid) -> Result<Vec<u8>, ::image::ImageError> {
    let [_, c, h, w] = grid.shape;
    let to_u8 = |v: f32| (((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round()) as u8;
    let mut img = ::image::RgbImage::new(w as u32, h as u32);
    for y in 0..h {
        for x in 0..w {
            let px = |ch: usize| to_u8(grid.images[(ch.min(c - 1) * h + y) * w + x]);
            img.put_pixel(x as u32, y as u32, ::image::Rgb([px(0), px(1), px(2)]));
        }
    }
    let mut png = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut png),
        ::image::ImageFormat::Png,
    )?;
    Ok(png)
}
