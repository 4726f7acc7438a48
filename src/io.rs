//! Weight files and images: safetensors keyed by module path, strict loading, PNG grids.
//!
//! The only module that maps parameters to file keys. Paths come from burn's module visitor
//! (struct field names and `Vec` indices joined by dots); enum variant names are left out, so
//! a model's key is its diffusers key. Loading is strict like nanoGPT's: every missing,
//! unexpected and mis-shaped key is reported in one sorted message, nothing is loaded "as fits".

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::prelude::*;
use safetensors::{Dtype, SafeTensors};

#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid safetensors file: {message}")]
    Format { path: PathBuf, message: String },
    #[error("{path}: weights do not match the model:\n  {}", problems.join("\n  "))]
    Mismatch {
        path: PathBuf,
        problems: Vec<String>,
    },
    #[error("cannot encode image {path}: {message}")]
    Image { path: PathBuf, message: String },
}

/// Tracks the dotted path while a visitor or mapper walks a module.
#[derive(Default)]
struct PathStack {
    parts: Vec<String>,
    pushed: Vec<bool>,
}

impl PathStack {
    fn enter(&mut self, name: &str, container: &str) {
        let push = !container.starts_with("Enum:");
        if push {
            self.parts.push(name.to_string());
        }
        self.pushed.push(push);
    }

    fn exit(&mut self) {
        if self.pushed.pop() == Some(true) {
            self.parts.pop();
        }
    }

    fn key(&self) -> String {
        self.parts.join(".")
    }
}

/// A host copy of one tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

#[derive(Default)]
struct Collector {
    path: PathStack,
    out: BTreeMap<String, HostTensor>,
}

impl ModuleVisitor for Collector {
    fn enter_module(&mut self, name: &str, container: &str) {
        self.path.enter(name, container);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = param.val();
        let shape = t.dims().to_vec();
        let data = t
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .expect("converted to f32 above");
        self.out.insert(self.path.key(), HostTensor { shape, data });
    }
}

/// Every float parameter of `module`, by key.
pub fn named_tensors<M: Module>(module: &M) -> BTreeMap<String, HostTensor> {
    let mut c = Collector::default();
    module.visit(&mut c);
    c.out
}

/// Writes `path` via a temporary file in the same folder, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), IoError> {
    let err = |source| IoError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(err)?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(err)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all(); // directory fsync is best-effort (unsupported on some filesystems)
    }
    Ok(())
}

/// Serialises tensors as f32 safetensors with string metadata.
pub fn safetensors_bytes(
    tensors: &BTreeMap<String, HostTensor>,
    metadata: &HashMap<String, String>,
) -> Result<Vec<u8>, String> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(k, t)| {
            let bytes: &[u8] = bytemuck_f32(&t.data);
            let view = safetensors::tensor::TensorView::new(Dtype::F32, t.shape.clone(), bytes)
                .expect("shape and byte length agree by construction");
            (k.clone(), view)
        })
        .collect();
    let meta = (!metadata.is_empty()).then(|| metadata.clone());
    safetensors::serialize(views, meta).map_err(|e| e.to_string())
}

/// Saves tensors as f32 safetensors with string metadata.
pub fn save_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, HostTensor>,
    metadata: &HashMap<String, String>,
) -> Result<(), IoError> {
    let bytes = safetensors_bytes(tensors, metadata).map_err(|message| IoError::Format {
        path: path.to_path_buf(),
        message,
    })?;
    write_atomic(path, &bytes)
}

fn bytemuck_f32(data: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding or invalid bit patterns; the slice covers exactly the data,
    // and safetensors stores little-endian, which is every target this crate builds for.
    unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), std::mem::size_of_val(data)) }
}

fn to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("chunk of 8")) as f32)
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half_to_f32(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
            .collect(),
        _ => return None,
    })
}

fn half_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as i32;
    let man = (h & 0x3ff) as u32;
    let bits = match exp {
        0 if man == 0 => sign,
        0 => {
            // subnormal: value = man * 2^-24
            let v = man as f32 * 2f32.powi(-24);
            return if sign != 0 { -v } else { v };
        }
        31 => sign | 0x7f80_0000 | (man << 13),
        e => sign | (((e - 15 + 127) as u32) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

/// Reads every floating-point tensor of a safetensors file.
pub fn load_safetensors(path: &Path) -> Result<BTreeMap<String, HostTensor>, IoError> {
    let bytes = std::fs::read(path).map_err(|source| IoError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_safetensors(&bytes, path)
}

/// Parses safetensors bytes read from `path` (named in errors).
pub fn parse_safetensors(
    bytes: &[u8],
    path: &Path,
) -> Result<BTreeMap<String, HostTensor>, IoError> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| IoError::Format {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let data = to_f32(view.dtype(), view.data()).ok_or_else(|| IoError::Format {
            path: path.to_path_buf(),
            message: format!(
                "tensor {name:?} has dtype {:?}; only float tensors are supported",
                view.dtype()
            ),
        })?;
        out.insert(
            name,
            HostTensor {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    Ok(out)
}

struct Loader<'a> {
    path: PathStack,
    tensors: &'a BTreeMap<String, HostTensor>,
    used: Vec<String>,
    problems: Vec<String>,
}

impl ModuleMapper for Loader<'_> {
    fn enter_module(&mut self, name: &str, container: &str) {
        self.path.enter(name, container);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let key = self.path.key();
        let Some(t) = self.tensors.get(&key) else {
            self.problems.push(format!(
                "missing key {key} (model shape {:?})",
                param.lazy_shape().dims::<D>()
            ));
            return param;
        };
        self.used.push(key.clone());
        let want = param.lazy_shape().dims::<D>().to_vec();
        if t.shape != want {
            self.problems.push(format!(
                "shape mismatch for {key}: file {:?}, model {want:?}",
                t.shape
            ));
            return param;
        }
        let tensors = self.tensors;
        param.map(|old| {
            let device = old.device();
            let fresh = Tensor::<D>::from_data(
                TensorData::new(tensors[&key].data.clone(), want.clone()),
                &device,
            );
            if old.is_require_grad() {
                fresh.require_grad()
            } else {
                fresh
            }
        })
    }
}

/// Loads `tensors` into `module` strictly; `source` names the file in errors.
pub fn load_into<M: Module>(
    module: M,
    tensors: &BTreeMap<String, HostTensor>,
    source: &Path,
) -> Result<M, IoError> {
    let mut loader = Loader {
        path: PathStack::default(),
        tensors,
        used: Vec::new(),
        problems: Vec::new(),
    };
    let module = module.map(&mut loader);
    let mut problems = loader.problems;
    let used: std::collections::HashSet<&String> = loader.used.iter().collect();
    problems.extend(
        tensors
            .keys()
            .filter(|k| !used.contains(k))
            .map(|k| format!("unexpected key {k}")),
    );
    if problems.is_empty() {
        Ok(module)
    } else {
        problems.sort();
        Err(IoError::Mismatch {
            path: source.to_path_buf(),
            problems,
        })
    }
}

/// A PNG grid of images `[n, c, h, w]` in [-1, 1], `ncol` columns, 2px gaps.
pub struct GridPng {
    pub png: Vec<u8>,
    pub width: u32,
    pub height: u32,
}

/// Encodes images `[n, c, h, w]` in [-1, 1] as one RGB PNG grid with `ncol` columns.
pub fn grid_png(images: &[f32], shape: [usize; 4], ncol: usize) -> Result<GridPng, String> {
    let [n, c, h, w] = shape;
    let ncol = ncol.clamp(1, n.max(1));
    let nrow = n.div_ceil(ncol);
    let pad = 2;
    let (gw, gh) = (ncol * (w + pad) + pad, nrow * (h + pad) + pad);
    let mut grid = image::RgbImage::from_pixel(gw as u32, gh as u32, image::Rgb([0, 0, 0]));
    let to_u8 = |v: f32| (((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round()) as u8;
    for i in 0..n {
        let (ox, oy) = (pad + (i % ncol) * (w + pad), pad + (i / ncol) * (h + pad));
        for y in 0..h {
            for x in 0..w {
                let px = |ch: usize| to_u8(images[((i * c + ch.min(c - 1)) * h + y) * w + x]);
                grid.put_pixel(
                    (ox + x) as u32,
                    (oy + y) as u32,
                    image::Rgb([px(0), px(1), px(2)]),
                );
            }
        }
    }
    let mut png = Vec::new();
    grid.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| e.to_string())?;
    Ok(GridPng {
        png,
        width: gw as u32,
        height: gh as u32,
    })
}

/// Writes images `[n, c, h, w]` in [-1, 1] as one PNG grid with `ncol` columns and 2px gaps.
pub fn save_grid(
    images: &[f32],
    shape: [usize; 4],
    ncol: usize,
    path: &Path,
) -> Result<GridPng, IoError> {
    let grid = grid_png(images, shape, ncol).map_err(|message| IoError::Image {
        path: path.to_path_buf(),
        message,
    })?;
    write_atomic(path, &grid.png)?;
    Ok(grid)
}

/// A parameter id derived from the parameter's key (FNV-1a), so a rebuilt model gets the same
/// ids and optimizer state saved by id (burn's `OptimizerRecord`) finds its parameters again.
fn key_id(key: &str) -> u64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

#[derive(Default)]
struct StableIds {
    path: PathStack,
}

impl ModuleMapper for StableIds {
    fn enter_module(&mut self, name: &str, container: &str) {
        self.path.enter(name, container);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (_, value, mapper) = param.consume();
        Param::from_mapped_value(ParamId::from(key_id(&self.path.key())), value, mapper)
    }
}

/// Gives every parameter an id that depends only on its key (see [`key_id`]).
pub fn stable_param_ids<M: Module>(module: M) -> M {
    module.map(&mut StableIds::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_conversion_matches_known_values() {
        assert_eq!(half_to_f32(0x3c00), 1.0);
        assert_eq!(half_to_f32(0xc000), -2.0);
        assert_eq!(half_to_f32(0x3555), 0.333_251_95);
        assert_eq!(half_to_f32(0x0001), 2f32.powi(-24));
    }
}
