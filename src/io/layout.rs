//! The one owner of the file layouts difftrain reads and writes besides the tensors: the names
//! of diffusers pipeline folders and their files, `model_index.json`, the tokenizer files, the
//! diffusers version written into configs, the safetensors metadata diffusers expects, and the
//! one hash used for fingerprints, cache keys and parameter ids.
//!
//! A diffusers pipeline folder (what `DiffusionPipeline.from_pretrained` reads):
//!
//! ```text
//! model_index.json                     {"_class_name": ..., "<component>": [library, class]}
//! unet/config.json                     unet/diffusion_pytorch_model[.fp16].safetensors
//! vae/config.json                      vae/diffusion_pytorch_model[.fp16].safetensors
//! text_encoder/config.json             text_encoder/model[.fp16].safetensors
//! tokenizer/{vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json,
//!            tokenizer.json}
//! scheduler/scheduler_config.json
//! ```
//!
//! The i-th component of one kind is `<kind>`, `<kind>_2`, `<kind>_3` (SDXL's `text_encoder_2`
//! and `tokenizer_2`): [`component_name`].

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::IoError;

/// The `_diffusers_version` difftrain writes into every config (the oldest diffusers release
/// whose loaders read everything difftrain writes).
pub const DIFFUSERS_VERSION: &str = "0.32.0";

/// `model_index.json`.
pub const MODEL_INDEX: &str = "model_index.json";
/// A component's config (`unet/config.json`, `text_encoder/config.json`).
pub const CONFIG: &str = "config.json";
/// The scheduler's config, relative to the pipeline folder.
pub const SCHEDULER_CONFIG: &str = "scheduler/scheduler_config.json";
/// The weights stem of diffusers models (`UNet2DModel`, `AutoencoderKL`, ...).
pub const DIFFUSERS_WEIGHTS: &str = "diffusion_pytorch_model";
/// The weights stem of transformers models (`CLIPTextModel`).
pub const TRANSFORMERS_WEIGHTS: &str = "model";
/// The files of a CLIP tokenizer folder, in the order they are copied.
pub const TOKENIZER_FILES: [&str; 5] = [
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "tokenizer_config.json",
    "tokenizer.json",
];

/// The name diffusers gives the `i`-th (0-based) pipeline component of `kind`: `kind`, then
/// `kind_2`, `kind_3`.
pub fn component_name(kind: &str, i: usize) -> String {
    match i {
        0 => kind.to_string(),
        i => format!("{kind}_{}", i + 1),
    }
}

/// `<dir>/<component>/<stem>.safetensors`: where a component's f32 weights are written.
pub fn weights_path(dir: &Path, component: &str, stem: &str) -> PathBuf {
    dir.join(component).join(format!("{stem}.safetensors"))
}

/// A component's weights file that is not there (and the PyTorch pickle found instead, which
/// is never read).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MissingWeights {
    #[error("{} (or {stem}.fp16.safetensors)", wanted.display())]
    Absent { wanted: PathBuf, stem: String },
    #[error(
        "{} (only {} is there: a PyTorch pickle, not read; get the .safetensors file)",
        wanted.display(),
        pickle.display()
    )]
    Pickle { wanted: PathBuf, pickle: PathBuf },
}

/// The weights file of a component that exists: `<stem>.safetensors`, else
/// `<stem>.fp16.safetensors` (diffusers' `variant="fp16"`).
pub fn existing_weights(dir: &Path, stem: &str) -> Result<PathBuf, MissingWeights> {
    for name in [
        format!("{stem}.safetensors"),
        format!("{stem}.fp16.safetensors"),
    ] {
        if dir.join(&name).is_file() {
            return Ok(dir.join(name));
        }
    }
    let wanted = dir.join(format!("{stem}.safetensors"));
    let pickle = dir.join(format!("{stem}.bin"));
    Err(if pickle.is_file() {
        MissingWeights::Pickle { wanted, pickle }
    } else {
        MissingWeights::Absent {
            wanted,
            stem: stem.to_string(),
        }
    })
}

/// The safetensors metadata diffusers and transformers expect of PyTorch weights
/// (`{"format": "pt"}`).
pub fn pt_metadata() -> HashMap<String, String> {
    HashMap::from([("format".to_string(), "pt".to_string())])
}

/// `model_index.json` of a pipeline `class_name` with `components`, each
/// `(name, library, class)`; `null_components` are written as `[null, null]` (diffusers'
/// spelling of an absent optional component, e.g. a safety checker).
pub fn model_index(
    class_name: &str,
    components: &[(&str, &str, &str)],
    null_components: &[&str],
    extra: &[(&str, serde_json::Value)],
) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    m.insert("_class_name".into(), class_name.into());
    m.insert("_diffusers_version".into(), DIFFUSERS_VERSION.into());
    for (name, library, class) in components {
        m.insert((*name).into(), serde_json::json!([library, class]));
    }
    for name in null_components {
        m.insert((*name).into(), serde_json::json!([null, null]));
    }
    for (k, v) in extra {
        m.insert((*k).into(), v.clone());
    }
    serde_json::Value::Object(m)
}

/// Copies the tokenizer files there are from `from` to `to` (atomically each).
pub fn copy_tokenizer(from: &Path, to: &Path) -> Result<(), IoError> {
    for f in TOKENIZER_FILES {
        let src = from.join(f);
        if src.is_file() {
            let bytes =
                std::fs::read(&src).map_err(|source| IoError::Read { path: src, source })?;
            super::write_atomic(&to.join(f), &bytes)?;
        }
    }
    Ok(())
}

/// FNV-1a (64 bits): the one hash behind parameter ids, cache keys and fingerprints of the
/// files a run depends on. Not cryptographic; stable across runs, platforms and versions (the
/// values are stored in checkpoints and cache folder names, so they must never change).
#[derive(Debug, Clone, Copy)]
pub struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    const PRIME: u64 = 0x0100_0000_01b3;

    /// Hashes `bytes` one byte at a time.
    pub fn bytes(mut self, bytes: &[u8]) -> Self {
        for b in bytes {
            self.0 = (self.0 ^ *b as u64).wrapping_mul(Self::PRIME);
        }
        self
    }

    /// Hashes `bytes` eight at a time (little-endian words, the last one zero-padded): eight
    /// times faster for the gigabytes of a pretrained model's weights.
    pub fn words(mut self, bytes: &[u8]) -> Self {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0 ^ u64::from_le_bytes(w)).wrapping_mul(Self::PRIME);
        }
        self
    }

    pub fn value(self) -> u64 {
        self.0
    }

    /// The value as 16 hex digits.
    pub fn hex(self) -> String {
        format!("{:016x}", self.0)
    }
}

/// A short stable hash (16 hex digits) of `parts`, each followed by a `0xff` separator: cache
/// keys and fingerprints of small files.
pub fn fingerprint(parts: &[&[u8]]) -> String {
    parts
        .iter()
        .fold(Fnv1a::default(), |h, p| h.bytes(p).bytes(&[0xff]))
        .hex()
}

/// The hash of the contents of `files` in order, streamed 1 MiB at a time in words
/// ([`Fnv1a::words`], per 1 MiB block): the fingerprint of a pretrained model's weights
/// (Stable Diffusion 1.5 is 4 GB).
pub fn fingerprint_files(files: &[PathBuf]) -> Result<String, IoError> {
    let mut h = Fnv1a::default();
    let mut buf = vec![0u8; 1 << 20];
    for path in files {
        let err = |source| IoError::Read {
            path: path.clone(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(err)?;
        loop {
            let n = file.read(&mut buf).map_err(err)?;
            if n == 0 {
                break;
            }
            h = h.words(&buf[..n]);
        }
    }
    Ok(h.hex())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_keep_their_values() {
        // The values difftrain has always written (checkpoint fingerprints, cache folders,
        // parameter ids): a change here would make every saved run look changed.
        assert_eq!(Fnv1a::default().bytes(b"").hex(), "cbf29ce484222325");
        assert_eq!(Fnv1a::default().bytes(b"a").hex(), "af63dc4c8601ec8c");
        assert_eq!(fingerprint(&[b"ab", b"c"]), fingerprint(&[b"ab", b"c"]));
        assert_ne!(fingerprint(&[b"ab", b"c"]), fingerprint(&[b"a", b"bc"]));
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("w");
        std::fs::write(&f, b"0123456789").unwrap();
        assert_eq!(
            fingerprint_files(&[f]).unwrap(),
            Fnv1a::default().words(b"0123456789").hex()
        );
    }

    #[test]
    fn components_are_named_as_diffusers_names_them() {
        assert_eq!(component_name("text_encoder", 0), "text_encoder");
        assert_eq!(component_name("text_encoder", 1), "text_encoder_2");
        assert_eq!(component_name("tokenizer", 1), "tokenizer_2");
    }
}
