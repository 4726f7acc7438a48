//! Devices: `run.device` / `run.devices` parsed into [`DeviceSpec`]s in one place, and turned
//! into burn devices (`cpu` is burn's Flex backend; `cuda:N` needs the `cuda` cargo feature).
//!
//! The config keeps the user's strings so that `Config::problems` can report a bad device
//! together with every other problem (a serde `try_from` would stop at the first); everything
//! that needs a device goes through [`DeviceRequest::parse`] and [`make_device`].

use burn::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device {0:?} needs the `cuda` cargo feature: rebuild with `--features cuda`")]
    NoCuda(String),
    #[error("{0:?} is not one of \"cpu\", \"cpu:N\", \"cuda\", \"cuda:N\"")]
    Unknown(String),
    #[error("run.devices = {0:?}: expected \"all\" or a list such as [\"cuda:0\", \"cuda:1\"]")]
    BadKeyword(String),
    #[error("run.devices is empty: list at least one device")]
    Empty,
    #[error("run.devices: {0}")]
    InList(Box<DeviceError>),
    #[error("run.devices = {0:?} mixes CPU and CUDA devices; use one kind")]
    Mixed(Vec<String>),
    #[error("run.devices lists {0:?} twice")]
    Twice(String),
    /// What the CUDA driver said about a device.
    #[error("{0}")]
    Invalid(String),
}

/// Where a run's tensors live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The CPU (Flex); the index only tells data-parallel worker threads apart.
    Cpu(usize),
    Cuda(usize),
}

impl DeviceSpec {
    /// `cpu`, `cpu:N`, `cuda` or `cuda:N`.
    pub fn parse(text: &str) -> Result<Self, DeviceError> {
        let index = |prefix: &str| text.strip_prefix(prefix).map(str::parse::<usize>);
        match text {
            "cpu" => Ok(Self::Cpu(0)),
            "cuda" => Ok(Self::Cuda(0)),
            _ => match (index("cpu:"), index("cuda:")) {
                (Some(Ok(i)), _) => Ok(Self::Cpu(i)),
                (_, Some(Ok(i))) => Ok(Self::Cuda(i)),
                _ => Err(DeviceError::Unknown(text.to_string())),
            },
        }
    }

    pub fn is_cuda(self) -> bool {
        matches!(self, Self::Cuda(_))
    }
}

/// `run.devices` as written: a list of devices or the word `"all"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DeviceList {
    Keyword(String),
    List(Vec<String>),
}

impl std::fmt::Display for DeviceList {
    /// As the TOML says it: `"all"`, `["cuda:0", "cuda:1"]`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Keyword(k) => write!(f, "{k:?}"),
            Self::List(l) => write!(f, "{l:?}"),
        }
    }
}

/// What `run.device` / `run.devices` ask for once parsed; `AllCuda` is resolved when the run
/// starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceRequest {
    List(Vec<DeviceSpec>),
    AllCuda,
}

impl DeviceRequest {
    /// The devices of a run: `devices` when set, else `[device]`.
    pub fn parse(device: &str, devices: Option<&DeviceList>) -> Result<Self, DeviceError> {
        let list = match devices {
            None => vec![device.to_string()],
            Some(DeviceList::Keyword(k)) if k == "all" => return Ok(Self::AllCuda),
            Some(DeviceList::Keyword(k)) if DeviceSpec::parse(k).is_ok() => vec![k.clone()],
            Some(DeviceList::Keyword(k)) => return Err(DeviceError::BadKeyword(k.clone())),
            Some(DeviceList::List(l)) => l.clone(),
        };
        if list.is_empty() {
            return Err(DeviceError::Empty);
        }
        let specs = list
            .iter()
            .map(|d| DeviceSpec::parse(d).map_err(|e| DeviceError::InList(Box::new(e))))
            .collect::<Result<Vec<_>, _>>()?;
        if specs.iter().any(|d| d.is_cuda()) && !specs.iter().all(|d| d.is_cuda()) {
            return Err(DeviceError::Mixed(list));
        }
        for (i, d) in specs.iter().enumerate() {
            if specs[..i].contains(d) {
                return Err(DeviceError::Twice(list[i].clone()));
            }
        }
        Ok(Self::List(specs))
    }

    /// The burn devices (`AllCuda` asks CUDA how many there are), and whether they are CUDA
    /// devices (so data-parallel ranks meet over NCCL).
    pub fn resolve(&self) -> Result<(Vec<Device>, bool), DeviceError> {
        let specs = match self {
            Self::List(specs) => specs.clone(),
            Self::AllCuda => all_cuda_devices()?,
        };
        let devices = specs
            .iter()
            .map(|s| make_device(*s))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((devices, specs.iter().any(|s| s.is_cuda())))
    }
}

/// The (non-autodiff) burn device of `spec`.
pub fn make_device(spec: DeviceSpec) -> Result<Device, DeviceError> {
    match spec {
        DeviceSpec::Cpu(_) => Ok(Device::flex()),
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(i) => {
            check_cuda(i)?;
            Ok(Device::cuda(i))
        }
        #[cfg(not(feature = "cuda"))]
        DeviceSpec::Cuda(i) => Err(DeviceError::NoCuda(format!("cuda:{i}"))),
    }
}

/// That `cuda:i` exists, asked of the driver before burn touches it (burn and cudarc panic
/// without a driver or with a bad index): a clear error instead.
#[cfg(feature = "cuda")]
fn check_cuda(i: usize) -> Result<(), DeviceError> {
    // SAFETY: only tries to dlopen the CUDA driver library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(DeviceError::Invalid(format!(
            "cuda:{i}: the CUDA driver library (libcuda.so.1) cannot be loaded on this machine: \
             is an NVIDIA driver installed (nvidia-smi)? Use run.device = \"cpu\" otherwise"
        )));
    }
    let count = cudarc::driver::CudaContext::device_count().map_err(|e| {
        DeviceError::Invalid(format!(
            "cuda:{i}: the CUDA driver is installed but does not initialise ({e:?}); check \
             nvidia-smi and CUDA_VISIBLE_DEVICES"
        ))
    })? as usize;
    if i >= count {
        return Err(DeviceError::Invalid(format!(
            "cuda:{i}: this machine has {count} visible CUDA device(s){}",
            if count > 0 {
                format!(", cuda:0..cuda:{}", count - 1)
            } else {
                String::new()
            }
        )));
    }
    Ok(())
}

/// Parses `run.device` (or a `--device` override) and makes its burn device.
pub fn parse_device(text: &str) -> Result<Device, DeviceError> {
    let spec =
        DeviceSpec::parse(text).map_err(|e| DeviceError::Invalid(format!("run.device = {e}")))?;
    make_device(spec)
}

#[cfg(feature = "cuda")]
fn all_cuda_devices() -> Result<Vec<DeviceSpec>, DeviceError> {
    // SAFETY: only tries to dlopen libcuda (what cubecl-cuda asks before counting).
    let count = if unsafe { cudarc::driver::sys::is_culib_present() } {
        cudarc::driver::CudaContext::device_count().unwrap_or(0) as usize
    } else {
        0
    };
    if count == 0 {
        return Err(DeviceError::Invalid(
            "run.devices = \"all\" found no CUDA device (no driver, or CUDA_VISIBLE_DEVICES is empty)"
                .into(),
        ));
    }
    Ok((0..count).map(DeviceSpec::Cuda).collect())
}

#[cfg(not(feature = "cuda"))]
fn all_cuda_devices() -> Result<Vec<DeviceSpec>, DeviceError> {
    Err(DeviceError::NoCuda("all (run.devices)".into()))
}

/// Makes burn's default device agree with a CPU run (`run.device` or every device of
/// `run.devices` on the CPU). burn places some state it loads itself (the optimizer record on
/// resume) on `Device::default()`, which is CUDA in a `cuda` build even when the run is on the
/// CPU (and panics without a driver). `BURN_DEVICE` is burn's override; call this before any
/// thread starts.
pub fn pin_default_device(request: &DeviceRequest) {
    let cpu = matches!(request, DeviceRequest::List(specs) if specs.iter().all(|s| !s.is_cuda()));
    if cpu && std::env::var_os("BURN_DEVICE").is_none() {
        // SAFETY: called at start-up, before the binary starts any thread.
        unsafe { std::env::set_var("BURN_DEVICE", "flex") };
    }
}
