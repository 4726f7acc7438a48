//! safetensors keyed by module path: dtype-aware, tensor-by-tensor reading and streaming writes,
//! strict loading.
//!
//! Reading parses the header only; each tensor is read (one `pread` from a file, or a slice of
//! bytes already in memory) when the model asks for it, converted to the parameter's dtype and
//! dropped, so loading a 3.4 GB Stable Diffusion U-Net holds about one copy of it, not two.
//! Writing streams each parameter in its own dtype (or one chosen dtype) after the header.
//! Loading is strict like nanoGPT's: every missing, unexpected and mis-shaped key is reported in
//! one sorted message, nothing is loaded "as fits".

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use ::safetensors::Dtype;
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::prelude::*;
use burn::tensor::DType;

use super::keys::PathStack;
use super::{IoError, write_atomic_with};

/// What is wrong with one tensor of a safetensors file, or with a file's header.
#[derive(Debug, thiserror::Error)]
pub enum TensorError {
    #[error("no tensor named {0:?}")]
    Missing(String),
    #[error("tensor {key:?} has dtype {dtype}; only float tensors are supported")]
    NotFloat { key: String, dtype: String },
    #[error("reading {key:?}")]
    Read {
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{key}: rows {start}..{end} exceed its shape {shape:?}")]
    Rows {
        key: String,
        start: usize,
        end: usize,
        shape: Vec<usize>,
    },
    #[error("tensor {key} has dtype {dtype:?}, which safetensors cannot store")]
    Unstorable { key: String, dtype: DType },
    #[error("bad header")]
    Header(#[source] serde_json::Error),
    #[error("the header describes {end} bytes but the file has {total} (truncated or padded)")]
    Length { end: u64, total: u64 },
}

/// A host f32 copy of one tensor (tests, fixtures and small host-side computations).
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

fn to_host(data: TensorData) -> Vec<f32> {
    data.convert::<f32>()
        .try_into_vec::<f32>()
        .expect("converted to f32 above")
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
        self.out.insert(
            self.path.key(),
            HostTensor {
                shape,
                data: to_host(t.into_data()),
            },
        );
    }
}

/// Every float parameter of `module` as host f32, by key.
pub fn named_tensors<M: Module>(module: &M) -> BTreeMap<String, HostTensor> {
    let mut c = Collector::default();
    module.visit(&mut c);
    c.out
}

#[derive(Default)]
struct IdCollector {
    path: PathStack,
    out: BTreeMap<String, burn::module::ParamId>,
}

impl ModuleVisitor for IdCollector {
    fn enter_module(&mut self, name: &str, container: &str) {
        self.path.enter(name, container);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.out.insert(self.path.key(), param.id);
    }
}

/// The id of every float parameter of `module`, by key (to find a named parameter's gradient).
pub fn named_param_ids<M: Module>(module: &M) -> BTreeMap<String, burn::module::ParamId> {
    let mut c = IdCollector::default();
    module.visit(&mut c);
    c.out
}

/// burn's dtype for a safetensors float dtype.
fn burn_dtype(dtype: Dtype) -> Option<DType> {
    Some(match dtype {
        Dtype::F64 => DType::F64,
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        _ => return None,
    })
}

fn file_dtype(dtype: DType) -> Option<Dtype> {
    Some(match dtype {
        DType::F64 => Dtype::F64,
        DType::F32 | DType::Flex32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        _ => return None,
    })
}

/// Where a reader takes tensor bytes from.
enum Bytes<'a> {
    File(std::fs::File),
    Memory(&'a [u8]),
}

/// A safetensors file with its header parsed and its data left where it is.
pub struct SafetensorsFile<'a> {
    path: PathBuf,
    bytes: Bytes<'a>,
    header: ::safetensors::tensor::Metadata,
    /// Offset of the data section (8 + header length).
    data_start: u64,
}

impl SafetensorsFile<'static> {
    /// Opens `path` and parses its header; tensors are read on demand.
    pub fn open(path: &Path) -> Result<Self, IoError> {
        use std::io::Read;
        let read_err = |source| IoError::Read {
            path: path.to_path_buf(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(read_err)?;
        let file_len = file.metadata().map_err(read_err)?.len();
        let format = |message: String| IoError::Format {
            path: path.to_path_buf(),
            message,
        };
        let mut n = [0u8; 8];
        file.read_exact(&mut n).map_err(|_| {
            format(format!(
                "{file_len} bytes is shorter than the 8-byte header size"
            ))
        })?;
        let n = u64::from_le_bytes(n);
        if n > 100 << 20 || 8 + n > file_len {
            return Err(format(format!(
                "header size {n} does not fit a file of {file_len} bytes"
            )));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header).map_err(read_err)?;
        let header = parse_header(&header, 8 + n, file_len).map_err(|source| IoError::Tensor {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            bytes: Bytes::File(file),
            header,
            data_start: 8 + n,
        })
    }
}

fn parse_header(
    header: &[u8],
    data_start: u64,
    total_len: u64,
) -> Result<::safetensors::tensor::Metadata, TensorError> {
    let header: ::safetensors::tensor::Metadata =
        serde_json::from_slice(header).map_err(TensorError::Header)?;
    let end = data_start + header.data_len() as u64;
    if end != total_len {
        return Err(TensorError::Length {
            end,
            total: total_len,
        });
    }
    Ok(header)
}

impl<'a> SafetensorsFile<'a> {
    /// Parses safetensors bytes already in memory (read from `path`, named in errors).
    pub fn from_bytes(bytes: &'a [u8], path: &Path) -> Result<Self, IoError> {
        let format = |message: String| IoError::Format {
            path: path.to_path_buf(),
            message,
        };
        let n = bytes
            .get(..8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .ok_or_else(|| format(format!("{} bytes is shorter than the header", bytes.len())))?;
        let header = usize::try_from(n)
            .ok()
            .and_then(|n| bytes.get(8..8 + n))
            .ok_or_else(|| format(format!("header size {n} exceeds the file")))?;
        let header =
            parse_header(header, 8 + n, bytes.len() as u64).map_err(|source| IoError::Tensor {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            bytes: Bytes::Memory(bytes),
            header,
            data_start: 8 + n,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `__metadata__` strings of the header.
    pub fn metadata(&self) -> HashMap<String, String> {
        self.header.metadata().clone().unwrap_or_default()
    }

    /// Tensor names, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.header.tensors().into_keys().collect();
        keys.sort();
        keys
    }

    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.header.info(name).map(|i| i.shape.clone())
    }

    /// One tensor in its stored dtype.
    pub fn read(&self, name: &str) -> Result<TensorData, TensorError> {
        let info = self
            .header
            .info(name)
            .ok_or_else(|| TensorError::Missing(name.to_string()))?;
        let dtype = burn_dtype(info.dtype).ok_or_else(|| TensorError::NotFloat {
            key: name.to_string(),
            dtype: format!("{:?}", info.dtype),
        })?;
        let (start, end) = info.data_offsets;
        let bytes = match &self.bytes {
            Bytes::Memory(b) => {
                let at = self.data_start as usize;
                b[at + start..at + end].to_vec()
            }
            Bytes::File(f) => {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; end - start];
                f.read_exact_at(&mut buf, self.data_start + start as u64)
                    .map_err(|source| TensorError::Read {
                        key: name.to_string(),
                        source,
                    })?;
                buf
            }
        };
        Ok(TensorData::from_bytes_vec(bytes, info.shape.clone(), dtype))
    }

    /// Every tensor as host f32 (fixtures and tests; models load with [`load_into`]).
    pub fn to_host(&self) -> Result<BTreeMap<String, HostTensor>, IoError> {
        self.keys()
            .into_iter()
            .map(|k| {
                let data = self.read(&k).map_err(|source| IoError::Tensor {
                    path: self.path.clone(),
                    source,
                })?;
                let shape = data.shape().to_vec();
                Ok((
                    k,
                    HostTensor {
                        shape,
                        data: to_host(data),
                    },
                ))
            })
            .collect()
    }
}

/// Reads every floating-point tensor of a safetensors file as host f32.
pub fn load_safetensors(path: &Path) -> Result<BTreeMap<String, HostTensor>, IoError> {
    SafetensorsFile::open(path)?.to_host()
}

/// Something tensors can be loaded from by key: a safetensors file, or host tensors.
pub trait TensorSource {
    /// Every key, sorted.
    fn keys(&self) -> Vec<String>;
    fn shape(&self, key: &str) -> Option<Vec<usize>>;
    fn read(&self, key: &str) -> Result<TensorData, TensorError>;
}

impl TensorSource for SafetensorsFile<'_> {
    fn keys(&self) -> Vec<String> {
        SafetensorsFile::keys(self)
    }
    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        SafetensorsFile::shape(self, key)
    }
    fn read(&self, key: &str) -> Result<TensorData, TensorError> {
        SafetensorsFile::read(self, key)
    }
}

impl TensorSource for BTreeMap<String, HostTensor> {
    fn keys(&self) -> Vec<String> {
        self.keys().cloned().collect()
    }
    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.get(key).map(|t| t.shape.clone())
    }
    fn read(&self, key: &str) -> Result<TensorData, TensorError> {
        let t = self
            .get(key)
            .ok_or_else(|| TensorError::Missing(key.to_string()))?;
        Ok(TensorData::new(t.data.clone(), t.shape.clone()))
    }
}

struct Loader<'a, S: ?Sized> {
    path: PathStack,
    /// Only these parameters are loaded (`None`: all; the others keep their values).
    only: Option<&'a std::collections::HashSet<ParamId>>,
    source: &'a S,
    used: Vec<String>,
    problems: Vec<String>,
}

impl<S: TensorSource + ?Sized> ModuleMapper for Loader<'_, S> {
    fn enter_module(&mut self, name: &str, container: &str) {
        self.path.enter(name, container);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if self.only.is_some_and(|ids| !ids.contains(&param.id)) {
            return param;
        }
        let key = self.path.key();
        let want = param.lazy_shape().dims::<D>().to_vec();
        let Some(shape) = self.source.shape(&key) else {
            self.problems
                .push(format!("missing key {key} (model shape {want:?})"));
            return param;
        };
        self.used.push(key.clone());
        if shape != want {
            self.problems.push(format!(
                "shape mismatch for {key}: file {shape:?}, model {want:?}"
            ));
            return param;
        }
        let data = match self.source.read(&key) {
            Ok(d) => d,
            Err(e) => {
                self.problems.push(crate::error::chain(&e));
                return param;
            }
        };
        param.map(|old| {
            let fresh = Tensor::<D>::from_data(data, (&old.device(), old.dtype()));
            if old.is_require_grad() {
                fresh.require_grad()
            } else {
                fresh
            }
        })
    }
}

/// Loads the tensors of `source` into `module` strictly, each converted to its parameter's
/// dtype; `path` names the file in errors.
pub fn load_into<M: Module, S: TensorSource + ?Sized>(
    module: M,
    source: &S,
    path: &Path,
) -> Result<M, IoError> {
    load_into_only(module, source, path, None)
}

/// [`load_into`] for the parameters `only` names (`None`: all), e.g. only the LoRA adapters of
/// a model whose base comes from elsewhere: each of them must be in `source`, and `source` must
/// hold nothing else.
pub fn load_into_only<M: Module, S: TensorSource + ?Sized>(
    module: M,
    source: &S,
    path: &Path,
    only: Option<&std::collections::HashSet<ParamId>>,
) -> Result<M, IoError> {
    let mut loader = Loader {
        path: PathStack::default(),
        only,
        source,
        used: Vec::new(),
        problems: Vec::new(),
    };
    // Each tensor is read, converted and dropped: those one-off blocks of every size must not
    // pile up in the caching allocator (they did: 1.3 GB over a 4 GB Stable Diffusion folder).
    let module = crate::memory::uncached(|| module.map(&mut loader));
    let mut problems = loader.problems;
    let used: std::collections::HashSet<&String> = loader.used.iter().collect();
    problems.extend(
        source
            .keys()
            .into_iter()
            .filter(|k| !used.contains(k))
            .map(|k| format!("unexpected key {k}")),
    );
    if problems.is_empty() {
        Ok(module)
    } else {
        problems.sort();
        Err(IoError::Mismatch {
            path: path.to_path_buf(),
            problems,
        })
    }
}

/// Opens `path` and loads it into `module` strictly (see [`load_into`]).
pub fn load_file<M: Module>(module: M, path: &Path) -> Result<M, IoError> {
    load_into(module, &SafetensorsFile::open(path)?, path)
}

/// Name, dtype and shape of every float parameter, in visiting order.
#[derive(Default)]
struct Layout {
    path: PathStack,
    entries: Vec<(String, DType, Vec<usize>)>,
}

impl ModuleVisitor for Layout {
    fn enter_module(&mut self, name: &str, container: &str) {
        self.path.enter(name, container);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = param.val();
        self.entries
            .push((self.path.key(), t.dtype(), t.dims().to_vec()));
    }
}

/// Writes each float parameter's bytes (in `dtype`, or its own) in visiting order.
struct Streamer<'w> {
    out: &'w mut dyn Write,
    dtype: Option<DType>,
    result: std::io::Result<()>,
}

impl ModuleVisitor for Streamer<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.result.is_err() {
            return;
        }
        let t = param.val();
        let dtype = self.dtype.unwrap_or(t.dtype());
        let data = t.into_data().convert_dtype(dtype);
        self.result = self.out.write_all(data.as_bytes());
    }
}

/// The safetensors header for tensors stored in the given order, padded to 8 bytes like the
/// reference writer; returns `8-byte length | JSON`.
fn header_bytes(
    entries: &[(String, Dtype, Vec<usize>)],
    metadata: &HashMap<String, String>,
) -> Vec<u8> {
    let mut map = serde_json::Map::new();
    if !metadata.is_empty() {
        let meta: BTreeMap<&String, &String> = metadata.iter().collect();
        map.insert("__metadata__".into(), serde_json::json!(meta));
    }
    let mut offset = 0usize;
    for (name, dtype, shape) in entries {
        let size = shape.iter().product::<usize>() * dtype.bitsize() / 8;
        map.insert(
            name.clone(),
            serde_json::json!({
                "dtype": dtype,
                "shape": shape,
                "data_offsets": [offset, offset + size],
            }),
        );
        offset += size;
    }
    let mut json = serde_json::to_vec(&map).expect("the header serialises");
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend(json);
    out
}

fn module_layout<M: Module>(
    module: &M,
    dtype: Option<DType>,
) -> Result<Vec<(String, Dtype, Vec<usize>)>, TensorError> {
    let mut layout = Layout::default();
    module.visit(&mut layout);
    layout
        .entries
        .into_iter()
        .map(|(k, d, s)| {
            let d = dtype.unwrap_or(d);
            file_dtype(d)
                .map(|fd| (k.clone(), fd, s))
                .ok_or(TensorError::Unstorable { key: k, dtype: d })
        })
        .collect()
}

/// Streams `module`'s float parameters as safetensors into `out` (in `dtype`, or each
/// parameter's own).
pub fn write_module<M: Module>(
    out: &mut dyn Write,
    module: &M,
    dtype: Option<DType>,
    metadata: &HashMap<String, String>,
) -> std::io::Result<()> {
    let layout = module_layout(module, dtype).map_err(std::io::Error::other)?;
    out.write_all(&header_bytes(&layout, metadata))?;
    let mut streamer = Streamer {
        out,
        dtype,
        result: Ok(()),
    };
    module.visit(&mut streamer);
    streamer.result
}

/// `module` as safetensors bytes (checkpoints, which checksum what they write).
pub fn module_bytes<M: Module>(
    module: &M,
    metadata: &HashMap<String, String>,
) -> Result<Vec<u8>, TensorError> {
    let layout = module_layout(module, None)?;
    let mut out = header_bytes(&layout, metadata);
    let mut streamer = Streamer {
        out: &mut out,
        dtype: None,
        result: Ok(()),
    };
    module.visit(&mut streamer);
    // Writes into a Vec cannot fail.
    streamer.result.expect("writing into memory");
    Ok(out)
}

#[derive(Default)]
struct DataCollector<'a> {
    path: PathStack,
    only: Option<&'a std::collections::HashSet<ParamId>>,
    out: BTreeMap<String, TensorData>,
}

impl ModuleVisitor for DataCollector<'_> {
    fn enter_module(&mut self, name: &str, container: &str) {
        self.path.enter(name, container);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.only.is_none_or(|ids| ids.contains(&param.id)) {
            self.out.insert(self.path.key(), param.val().into_data());
        }
    }
}

/// The float parameters of `module` that `only` names, in their own dtype, by key.
pub fn tensors_of<M: Module>(
    module: &M,
    only: &std::collections::HashSet<ParamId>,
) -> BTreeMap<String, TensorData> {
    let mut c = DataCollector {
        only: Some(only),
        ..DataCollector::default()
    };
    module.visit(&mut c);
    c.out
}

/// How many float weights `module` has (only those `only` names, when given), read from the
/// shapes (lazy parameters stay unallocated).
pub fn count_weights<M: Module>(
    module: &M,
    only: Option<&std::collections::HashSet<ParamId>>,
) -> u64 {
    struct Count<'a> {
        only: Option<&'a std::collections::HashSet<ParamId>>,
        total: u64,
    }
    impl ModuleVisitor for Count<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if self.only.is_none_or(|ids| ids.contains(&param.id)) {
                self.total += param.lazy_shape().num_elements() as u64;
            }
        }
    }
    let mut c = Count { only, total: 0 };
    module.visit(&mut c);
    c.total
}

/// Named tensors as safetensors bytes.
pub fn tensors_bytes(
    tensors: &BTreeMap<String, TensorData>,
    metadata: &HashMap<String, String>,
) -> Result<Vec<u8>, TensorError> {
    let mut layout = Vec::with_capacity(tensors.len());
    for (k, t) in tensors {
        let dtype = file_dtype(t.dtype()).ok_or_else(|| TensorError::Unstorable {
            key: k.clone(),
            dtype: t.dtype(),
        })?;
        layout.push((k.clone(), dtype, t.shape().to_vec()));
    }
    let mut out = header_bytes(&layout, metadata);
    for t in tensors.values() {
        out.extend_from_slice(t.as_bytes());
    }
    Ok(out)
}

/// Saves `module` atomically as safetensors, in `dtype` or each parameter's own.
pub fn save_module<M: Module>(
    path: &Path,
    module: &M,
    dtype: Option<DType>,
    metadata: &HashMap<String, String>,
) -> Result<(), IoError> {
    write_atomic_with(path, |w| write_module(w, module, dtype, metadata))
}

/// Saves named tensors (already in host memory, any float dtype) atomically as safetensors.
pub fn save_tensors(
    path: &Path,
    tensors: &BTreeMap<String, TensorData>,
    metadata: &HashMap<String, String>,
) -> Result<(), IoError> {
    let mut layout = Vec::with_capacity(tensors.len());
    for (k, t) in tensors {
        let dtype = file_dtype(t.dtype()).ok_or_else(|| IoError::Format {
            path: path.to_path_buf(),
            message: format!("tensor {k} has dtype {:?}", t.dtype()),
        })?;
        layout.push((k.clone(), dtype, t.shape().to_vec()));
    }
    write_atomic_with(path, |w| {
        w.write_all(&header_bytes(&layout, metadata))?;
        tensors.values().try_for_each(|t| w.write_all(t.as_bytes()))
    })
}

/// A parameter id derived from the parameter's key (FNV-1a), so a rebuilt model gets the same
/// ids and optimizer state saved by id (burn's `OptimizerRecord`) finds its parameters again.
fn key_id(key: &str) -> u64 {
    super::layout::Fnv1a::default()
        .bytes(key.as_bytes())
        .value()
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

    /// A two-parameter module (io sits below `nn`, so the test brings its own).
    #[derive(Module, Debug)]
    struct Linear {
        weight: Param<Tensor<2>>,
        bias: Option<Param<Tensor<1>>>,
    }

    impl Linear {
        fn new(fan_in: usize, fan_out: usize, bias: bool, device: &Device) -> Self {
            let w = Tensor::<2>::random(
                [fan_out, fan_in],
                burn::tensor::Distribution::Default,
                device,
            );
            Self {
                weight: Param::from_tensor(w),
                bias: bias.then(|| Param::from_tensor(Tensor::ones([fan_out], device))),
            }
        }
    }

    #[test]
    fn half_files_load_into_f32_parameters() {
        // 1.0, -2.0, 0.33325195, 2^-24 as f16 and bf16 bit patterns.
        let f16: Vec<u8> = [0x3c00u16, 0xc000, 0x3555, 0x0001]
            .iter()
            .flat_map(|h| h.to_le_bytes())
            .collect();
        let tensors = BTreeMap::from([(
            "weight".to_string(),
            TensorData::from_bytes_vec(f16, [2, 2], DType::F16),
        )]);
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("w.safetensors");
        save_tensors(&path, &tensors, &HashMap::new()).unwrap();
        let host = load_safetensors(&path).unwrap();
        assert_eq!(
            host["weight"].data,
            vec![1.0, -2.0, 0.333_251_95, 2f32.powi(-24)]
        );
        let device = Device::flex();
        let lin = Linear::new(2, 2, false, &device);
        let lin = load_file(lin, &path).unwrap();
        assert_eq!(lin.weight.val().dtype(), DType::F32);
        let w: Vec<f32> = lin.weight.val().into_data().try_into_vec().unwrap();
        assert_eq!(w, host["weight"].data);
    }

    #[test]
    fn streamed_module_round_trips_and_reads_with_the_reference_parser() {
        let device = Device::flex();
        let lin = Linear::new(3, 2, true, &device);
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        let bytes = module_bytes(&lin, &meta).unwrap();
        // The safetensors crate's own parser accepts it.
        let st = ::safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.names().len(), 2);
        let file = SafetensorsFile::from_bytes(&bytes, Path::new("mem")).unwrap();
        assert_eq!(file.metadata()["format"], "pt");
        assert_eq!(file.keys(), vec!["bias", "weight"]);
        let back = load_into(Linear::new(3, 2, true, &device), &file, Path::new("mem")).unwrap();
        assert_eq!(named_tensors(&back), named_tensors(&lin));
        // Stored as bf16 on request.
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("bf16.safetensors");
        save_module(&path, &lin, Some(DType::BF16), &meta).unwrap();
        let f = SafetensorsFile::open(&path).unwrap();
        assert_eq!(f.read("weight").unwrap().dtype(), DType::BF16);
        // A truncated file is named, not mis-read.
        let short = tmp.path().join("short.safetensors");
        std::fs::write(&short, &bytes[..bytes.len() - 1]).unwrap();
        let err = crate::error::chain(&SafetensorsFile::open(&short).err().unwrap());
        assert!(
            err.contains("short.safetensors") && err.contains("truncated"),
            "{err}"
        );
    }
}
