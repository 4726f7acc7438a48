//! LoRA files as the inference tools write and read them (see `docs/lora.md`):
//!
//! - **diffusers** (`pytorch_lora_weights.safetensors`, what `StableDiffusionPipeline.
//!   save_lora_weights` writes): `unet.<module>.lora.down.weight` `[r, in]` and
//!   `unet.<module>.lora.up.weight` `[out, r]`, `text_encoder.<module>...` for CLIP. diffusers
//!   reads no alpha from such a file (it uses scale 1), so `alpha / r` is folded into `up`.
//!   The text encoder's factors are `text_encoder.<module>.lora_linear_layer.{down,up}.weight`,
//!   the spelling diffusers' own `save_lora_weights` uses (its loader does not infer the format
//!   of `text_encoder.*.lora.down.weight`).
//! - **kohya** (A1111, ComfyUI, diffusers): `lora_unet_<module with _ for .>.lora_down.weight`,
//!   `.lora_up.weight`, `.alpha` (0-dim), `lora_te_...` for CLIP, `ss_*` metadata.
//!
//! Reading accepts both, PEFT's `lora_A`/`lora_B` spelling (with diffusers'
//! `lora_adapter_metadata` alpha), raw PEFT `base_model.model.` keys and diffusers' old
//! attention-processor keys (`attn1.processor.to_q_lora.down.weight`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use burn::tensor::TensorData;
use sha2::{Digest, Sha256};

use super::IoError;
use super::base_model::BaseModel;
use super::safetensors::{HostTensor, SafetensorsFile, tensors_bytes};

/// Which network a LoRA module belongs to: the U-Net, or the i-th text encoder (0-based, in
/// the pipeline's order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    Unet,
    TextEncoder(usize),
}

impl Component {
    /// diffusers' component name: `unet`, `text_encoder`, `text_encoder_2`...
    pub fn diffusers_prefix(self) -> String {
        match self {
            Self::Unet => "unet".into(),
            Self::TextEncoder(i) => super::layout::component_name("text_encoder", i),
        }
    }

    /// kohya's key prefix: `lora_unet_`, and `lora_te_` when the model has one text encoder,
    /// `lora_te1_`, `lora_te2_` when it has two (SDXL).
    fn kohya_prefix(self, text_encoders: usize) -> String {
        match self {
            Self::Unet => "lora_unet_".into(),
            Self::TextEncoder(_) if text_encoders <= 1 => "lora_te_".into(),
            Self::TextEncoder(i) => format!("lora_te{}_", i + 1),
        }
    }

    /// The component a diffusers/PEFT key prefix names (`unet.`, `text_encoder.`,
    /// `text_encoder_2.`), with the rest of the key.
    fn from_diffusers_key(key: &str) -> Option<(Self, &str)> {
        if let Some(r) = key.strip_prefix("unet.") {
            return Some((Self::Unet, r));
        }
        let r = key.strip_prefix("text_encoder")?;
        let (index, rest) = r.split_once('.')?;
        let i = match index {
            "" => 0,
            n => n.strip_prefix('_')?.parse::<usize>().ok()?.checked_sub(1)?,
        };
        Some((Self::TextEncoder(i), rest))
    }

    /// The component a kohya key prefix names, with the rest of the key.
    fn from_kohya_key(key: &str) -> Option<(Self, &str)> {
        if let Some(r) = key.strip_prefix("lora_unet_") {
            return Some((Self::Unet, r));
        }
        if let Some(r) = key.strip_prefix("lora_te_") {
            return Some((Self::TextEncoder(0), r));
        }
        let r = key.strip_prefix("lora_te")?;
        let (n, rest) = r.split_once('_')?;
        let i = n.parse::<usize>().ok()?.checked_sub(1)?;
        Some((Self::TextEncoder(i), rest))
    }
}

/// One adapted layer: `delta W = scale · up · down`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraModule {
    pub down: HostTensor,
    pub up: HostTensor,
    pub scale: f64,
}

/// How a layer is named in a file: its module path, or (kohya) the path with every `.`
/// turned into `_`, resolved against the model's layers when applied.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ModuleName {
    Path(String),
    Underscored(String),
}

impl ModuleName {
    pub fn underscored(&self) -> String {
        match self {
            Self::Path(p) => p.replace('.', "_"),
            Self::Underscored(u) => u.clone(),
        }
    }
}

/// A LoRA file read into memory.
#[derive(Debug, Clone)]
pub struct LoraFile {
    pub path: PathBuf,
    pub modules: BTreeMap<(Component, ModuleName), LoraModule>,
    /// `"diffusers"`, `"peft"` or `"kohya"`.
    pub format: &'static str,
}

impl LoraFile {
    /// The file's modules of `component` keyed by the model's layer path, given every layer
    /// path the model has, and the names that name no layer. kohya names a layer by its path
    /// with each `.` as `_` (`down_blocks_0_attentions_0_..._to_q`), which is resolved here
    /// against the model's own paths (the one place that undoes kohya's renaming).
    pub fn modules_by_path<'a>(
        &'a self,
        component: Component,
        layer_paths: &[String],
    ) -> (HashMap<String, &'a LoraModule>, Vec<String>) {
        let by_underscored: HashMap<String, &String> = layer_paths
            .iter()
            .map(|p| (p.replace('.', "_"), p))
            .collect();
        let known: std::collections::HashSet<&String> = layer_paths.iter().collect();
        let (mut found, mut unmatched) = (HashMap::new(), Vec::new());
        for ((comp, name), m) in &self.modules {
            if *comp != component {
                continue;
            }
            let path = match name {
                ModuleName::Path(p) => known.contains(p).then(|| p.clone()),
                ModuleName::Underscored(u) => by_underscored.get(u).map(|p| (*p).clone()),
            };
            match path {
                Some(p) => {
                    found.insert(p, m);
                }
                None => unmatched.push(match name {
                    ModuleName::Path(p) => p.clone(),
                    ModuleName::Underscored(u) => u.clone(),
                }),
            }
        }
        (found, unmatched)
    }

    /// The components the file has modules for.
    pub fn components(&self) -> Vec<Component> {
        let mut c: Vec<Component> = self.modules.keys().map(|(c, _)| *c).collect();
        c.dedup();
        c
    }
}

fn tensor_error(path: &Path, source: super::safetensors::TensorError) -> IoError {
    IoError::Tensor {
        path: path.to_path_buf(),
        source,
    }
}

fn bad(path: &Path, message: String) -> IoError {
    IoError::Content {
        path: path.to_path_buf(),
        message,
    }
}

/// The LyCORIS (or other) adapter kind a file's keys show, when it is not plain LoRA on linear
/// layers: its name and a key that shows it.
fn other_kind(tensors: &BTreeMap<String, HostTensor>) -> Option<(&'static str, &str)> {
    let kinds: [(&str, &str); 8] = [
        ("hada_w1", "LoHa"),
        ("lokr_w1", "LoKr"),
        ("dora_scale", "DoRA"),
        ("oft_blocks", "OFT/BOFT"),
        ("oft_diag", "OFT/BOFT"),
        (".lora_mid.", "LoCon (with a CP-decomposed mid factor)"),
        (".a1.weight", "GLoRA"),
        (".diff", "LyCORIS full (diff)"),
    ];
    for (k, t) in tensors {
        if let Some((_, name)) = kinds.iter().find(|(pat, _)| k.contains(pat)) {
            return Some((name, k));
        }
        // A 4-D down factor is a convolution's: LoCon.
        let down = k.ends_with(".lora_down.weight") || k.ends_with(".lora_A.weight");
        if down && t.shape.len() == 4 {
            return Some(("LoCon (LoRA on convolutions)", k));
        }
    }
    None
}

/// Reads a LoRA file in any of the supported layouts. Every tensor must be finite.
pub fn read(path: &Path) -> Result<LoraFile, IoError> {
    let file = SafetensorsFile::open(path)?;
    let tensors = file.to_host()?;
    let meta = file.metadata();
    if tensors.is_empty() {
        return Err(bad(path, "holds no tensors".into()));
    }
    if let Some((kind, key)) = other_kind(&tensors) {
        return Err(bad(
            path,
            format!(
                "a {kind} file (key {key}); difftrain reads plain LoRA on linear layers \
                 (diffusers, PEFT or kohya layout) only"
            ),
        ));
    }
    if let Some((key, _)) = tensors
        .iter()
        .find(|(_, t)| t.data.iter().any(|v| !v.is_finite()))
    {
        return Err(IoError::NotFinite {
            path: path.to_path_buf(),
            key: key.clone(),
        });
    }
    let kohya = tensors
        .keys()
        .all(|k| Component::from_kohya_key(k).is_some());
    if kohya {
        return read_kohya(path, &tensors);
    }
    read_diffusers(path, &tensors, &meta)
}

fn read_kohya(path: &Path, tensors: &BTreeMap<String, HostTensor>) -> Result<LoraFile, IoError> {
    let mut parts: BTreeMap<(Component, String), [Option<&HostTensor>; 3]> = BTreeMap::new();
    let mut unknown = Vec::new();
    for (k, t) in tensors {
        let Some((comp, rest)) = Component::from_kohya_key(k) else {
            unknown.push(k.clone());
            continue;
        };
        let (stem, slot) = if let Some(s) = rest.strip_suffix(".lora_down.weight") {
            (s, 0)
        } else if let Some(s) = rest.strip_suffix(".lora_up.weight") {
            (s, 1)
        } else if let Some(s) = rest.strip_suffix(".alpha") {
            (s, 2)
        } else {
            unknown.push(k.clone());
            continue;
        };
        parts.entry((comp, stem.to_string())).or_default()[slot] = Some(t);
    }
    if !unknown.is_empty() {
        return Err(bad(
            path,
            format!(
                "kohya LoRA keys difftrain does not read (only `.lora_down.weight`, \
                 `.lora_up.weight` and `.alpha` of linear layers): {}",
                first_keys(&unknown)
            ),
        ));
    }
    let mut modules = BTreeMap::new();
    for ((comp, stem), [down, up, alpha]) in parts {
        let (Some(down), Some(up)) = (down, up) else {
            return Err(bad(
                path,
                format!("{stem}: needs both lora_down and lora_up"),
            ));
        };
        let rank = check_pair(path, &stem, down, up)?;
        // kohya: scale = alpha / rank; no alpha means alpha = rank (ComfyUI uses 1.0 too).
        let scale = alpha.map_or(1.0, |a| a.data[0] as f64 / rank as f64);
        modules.insert(
            (comp, ModuleName::Underscored(stem)),
            LoraModule {
                down: down.clone(),
                up: up.clone(),
                scale,
            },
        );
    }
    Ok(LoraFile {
        path: path.to_path_buf(),
        modules,
        format: "kohya",
    })
}

/// The first five of `keys`, for an error message.
fn first_keys(keys: &[String]) -> String {
    keys.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
}

fn check_pair(
    path: &Path,
    name: &str,
    down: &HostTensor,
    up: &HostTensor,
) -> Result<usize, IoError> {
    if down.shape.len() != 2 || up.shape.len() != 2 || down.shape[0] != up.shape[1] {
        return Err(bad(
            path,
            format!(
                "{name}: down {:?} and up {:?} are not a LoRA pair of a linear layer ([r, in] \
                 and [out, r])",
                down.shape, up.shape
            ),
        ));
    }
    Ok(down.shape[0])
}

fn read_diffusers(
    path: &Path,
    tensors: &BTreeMap<String, HostTensor>,
    meta: &HashMap<String, String>,
) -> Result<LoraFile, IoError> {
    // diffusers' `lora_adapter_metadata`: {"unet.r": .., "unet.lora_alpha": .., ...} (peft's
    // LoraConfig per component, flattened with the component as prefix).
    let adapter_meta: Option<serde_json::Value> = meta
        .get("lora_adapter_metadata")
        .and_then(|m| serde_json::from_str(m).ok());
    let meta_scale = |comp: Component| -> Option<f64> {
        let m = adapter_meta.as_ref()?;
        let p = comp.diffusers_prefix();
        let r = m.get(format!("{p}.r"))?.as_f64()?;
        let a = m.get(format!("{p}.lora_alpha"))?.as_f64()?;
        Some(a / r)
    };
    let mut parts: BTreeMap<(Component, String), [Option<&HostTensor>; 3]> = BTreeMap::new();
    let mut peft = false;
    let mut unknown = Vec::new();
    for (k, t) in tensors {
        let (comp, rest) = match Component::from_diffusers_key(k) {
            Some(found) => found,
            None => match k.strip_prefix("base_model.model.") {
                Some(r) => (Component::Unet, r),
                None => {
                    unknown.push(k.clone());
                    continue;
                }
            },
        };
        // diffusers' old attention-processor spelling.
        let rest = rest
            .replace(".processor.to_out_lora.", ".to_out.0.lora.")
            .replace(".processor.to_q_lora.", ".to_q.lora.")
            .replace(".processor.to_k_lora.", ".to_k.lora.")
            .replace(".processor.to_v_lora.", ".to_v.lora.");
        let found = [
            (".lora.down.weight", 0, false),
            (".lora.up.weight", 1, false),
            (".lora_linear_layer.down.weight", 0, false),
            (".lora_linear_layer.up.weight", 1, false),
            (".lora_A.weight", 0, true),
            (".lora_B.weight", 1, true),
            (".lora_A.default.weight", 0, true),
            (".lora_B.default.weight", 1, true),
            (".alpha", 2, false),
        ]
        .iter()
        .find_map(|(suffix, slot, is_peft)| {
            rest.strip_suffix(suffix)
                .map(|s| (s.to_string(), *slot, *is_peft))
        });
        match found {
            Some((stem, slot, is_peft)) => {
                peft |= is_peft;
                // transformers 5 saves CLIPTextModel without its `text_model.` level.
                let text = matches!(comp, Component::TextEncoder(_));
                let stem = if text && !stem.starts_with("text_model.") {
                    format!("text_model.{stem}")
                } else {
                    stem
                };
                parts.entry((comp, stem)).or_default()[slot] = Some(t);
            }
            None => unknown.push(k.clone()),
        }
    }
    if !unknown.is_empty() {
        return Err(bad(
            path,
            format!(
                "not a LoRA file difftrain reads: keys {} are neither diffusers/PEFT \
                 (`unet.<module>.lora.down.weight`, `unet.<module>.lora_A.weight`) nor kohya \
                 (`lora_unet_<module>.lora_down.weight`)",
                first_keys(&unknown)
            ),
        ));
    }
    let mut modules = BTreeMap::new();
    for ((comp, stem), [down, up, alpha]) in parts {
        let (Some(down), Some(up)) = (down, up) else {
            return Err(bad(
                path,
                format!("{stem}: needs both the down (A) and up (B) factor"),
            ));
        };
        let rank = check_pair(path, &stem, down, up)?;
        // diffusers' converted kohya files keep `<module>.alpha` (network alphas).
        let scale = match alpha {
            Some(a) => a.data[0] as f64 / rank as f64,
            None => meta_scale(comp).unwrap_or(1.0),
        };
        modules.insert(
            (comp, ModuleName::Path(stem)),
            LoraModule {
                down: down.clone(),
                up: up.clone(),
                scale,
            },
        );
    }
    Ok(LoraFile {
        path: path.to_path_buf(),
        modules,
        format: if peft { "peft" } else { "diffusers" },
    })
}

fn data(t: &HostTensor) -> TensorData {
    TensorData::new(t.data.clone(), t.shape.clone())
}

/// Writes `modules` (module paths) in diffusers' layout, `alpha / r` folded into `up`.
pub fn write_diffusers(
    path: &Path,
    modules: &BTreeMap<(Component, String), LoraModule>,
) -> Result<(), IoError> {
    let mut tensors = BTreeMap::new();
    for ((comp, module), m) in modules {
        let p = comp.diffusers_prefix();
        let up = HostTensor {
            shape: m.up.shape.clone(),
            data: m
                .up
                .data
                .iter()
                .map(|v| (*v as f64 * m.scale) as f32)
                .collect(),
        };
        // diffusers writes (and reads back) a text encoder's factors as `lora_linear_layer`.
        let factor = match comp {
            Component::Unet => "lora",
            Component::TextEncoder(_) => "lora_linear_layer",
        };
        tensors.insert(format!("{p}.{module}.{factor}.down.weight"), data(&m.down));
        tensors.insert(format!("{p}.{module}.{factor}.up.weight"), data(&up));
    }
    write(path, &tensors, &super::layout::pt_metadata())
}

fn write(
    path: &Path,
    tensors: &BTreeMap<String, TensorData>,
    meta: &HashMap<String, String>,
) -> Result<(), IoError> {
    let bytes = tensors_bytes(tensors, meta).map_err(|source| tensor_error(path, source))?;
    super::write_atomic(path, &bytes)
}

/// What a kohya file's metadata says about the training.
pub struct KohyaInfo {
    pub rank: usize,
    pub alpha: f64,
    /// The model the LoRA is for (`ss_base_model_version`, `modelspec.architecture`, the text
    /// encoders' key prefixes).
    pub base_model: BaseModel,
    pub output_name: String,
    /// Anything else (`ss_*` training settings).
    pub extra: Vec<(String, String)>,
}

/// Writes `modules` in kohya's layout with its `ss_*` metadata and model hashes.
pub fn write_kohya(
    path: &Path,
    modules: &BTreeMap<(Component, String), LoraModule>,
    info: &KohyaInfo,
) -> Result<(), IoError> {
    let mut tensors = BTreeMap::new();
    for ((comp, module), m) in modules {
        let prefix = comp.kohya_prefix(info.base_model.text_encoders());
        let stem = format!("{prefix}{}", module.replace('.', "_"));
        let rank = m.down.shape[0] as f64;
        tensors.insert(format!("{stem}.lora_down.weight"), data(&m.down));
        tensors.insert(format!("{stem}.lora_up.weight"), data(&m.up));
        let alpha = (m.scale * rank) as f32;
        tensors.insert(
            format!("{stem}.alpha"),
            TensorData::new(vec![alpha], Vec::<usize>::new()),
        );
    }
    let v2 = info.base_model.is_v2();
    let mut ss: HashMap<String, String> = [
        ("ss_network_module", "networks.lora".to_string()),
        ("ss_network_dim", info.rank.to_string()),
        ("ss_network_alpha", format!("{}", info.alpha)),
        (
            "ss_base_model_version",
            info.base_model.kohya_version().to_string(),
        ),
        ("ss_v2", if v2 { "True" } else { "False" }.to_string()),
        ("ss_output_name", info.output_name.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    ss.extend(info.extra.iter().cloned());
    // kohya's `precalculate_safetensors_hashes`: the file as saved with only `ss_` metadata.
    let ss_only: HashMap<String, String> = ss
        .iter()
        .filter(|(k, _)| k.starts_with("ss_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let bytes = tensors_bytes(&tensors, &ss_only).map_err(|source| tensor_error(path, source))?;
    let (model_hash, legacy_hash) = kohya_hashes(&bytes);
    let mut meta = ss;
    meta.insert("sshs_model_hash".into(), model_hash);
    meta.insert("sshs_legacy_hash".into(), legacy_hash);
    meta.insert(
        "modelspec.architecture".into(),
        info.base_model.modelspec_lora_architecture().into(),
    );
    meta.insert("modelspec.sai_model_spec".into(), "1.0.0".into());
    meta.insert(
        "modelspec.implementation".into(),
        "https://github.com/Stability-AI/generative-models".into(),
    );
    meta.insert("modelspec.title".into(), info.output_name.clone());
    write(path, &tensors, &meta)
}

/// kohya's `addnet_hash_safetensors` (sha256 of everything after the header) and
/// `addnet_hash_legacy` (the first 8 hex digits of sha256 of 64 KiB at offset 1 MiB).
pub fn kohya_hashes(bytes: &[u8]) -> (String, String) {
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let model = hex(&Sha256::digest(&bytes[(8 + n).min(bytes.len())..]));
    let start = 0x100000.min(bytes.len());
    let end = (start + 0x10000).min(bytes.len());
    let legacy = hex(&Sha256::digest(&bytes[start..end]))[..8].to_string();
    (model, legacy)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
