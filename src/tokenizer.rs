//! The CLIP tokenizer of Stable Diffusion, giving exactly transformers' `CLIPTokenizer` ids.
//!
//! Built on the `tokenizers` crate, either from a `tokenizer.json` (what transformers 5's
//! `save_pretrained` writes) or from `vocab.json` + `merges.txt` (what the SD 1.5 repository
//! ships), assembled as transformers' `CLIPTokenizer` does (`tokenization_clip.py`): normaliser
//! NFC + whitespace runs to one space + lowercase; pre-tokeniser CLIP's split regex, then
//! byte-level; BPE with the `</w>` end-of-word suffix. Encoding for a model is
//! `tokenizer(text, max_length=77, padding="max_length", truncation=True)`: BOS, the text's
//! tokens truncated to `max_length - 2`, EOS, then the pad token (`<|endoftext|>` in SD 1.x,
//! `!` in SD 2.x, read from `special_tokens_map.json` / `tokenizer_config.json`).

use std::path::{Path, PathBuf};

use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as NormSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(
        "{dir} has no tokenizer: expected tokenizer.json, or vocab.json and merges.txt \
         (the `tokenizer/` folder of a Stable Diffusion model)"
    )]
    Missing { dir: PathBuf },
    #[error("cannot load the tokenizer from {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("the tokenizer in {dir} has no token {token:?} ({what})")]
    NoToken {
        dir: PathBuf,
        token: String,
        what: &'static str,
    },
    #[error("cannot tokenize {text:?}: {message}")]
    Encode { text: String, message: String },
}

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";
/// CLIP's pre-tokeniser pattern (transformers' `CLIPTokenizer`).
const PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A loaded CLIP tokenizer and the ids it frames and pads with.
#[derive(Clone)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    pub bos: u32,
    pub eos: u32,
    pub pad: u32,
    /// `model_max_length` (77 for every Stable Diffusion text encoder).
    pub max_length: usize,
}

/// A special token as `special_tokens_map.json` / `tokenizer_config.json` write it: a string or
/// `{"content": ...}`.
fn token_text(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn read_json(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

impl ClipTokenizer {
    /// Ids in use (the vocabulary and added tokens): the text encoder's `vocab_size`.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Loads the tokenizer of a Stable Diffusion `tokenizer/` folder.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let load = |path: &Path, e: &dyn std::fmt::Display| TokenizerError::Load {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let json = dir.join("tokenizer.json");
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        let tokenizer = if json.is_file() {
            Tokenizer::from_file(&json).map_err(|e| load(&json, &e))?
        } else if vocab.is_file() && merges.is_file() {
            let to_str = |p: &Path| p.to_string_lossy().into_owned();
            let bpe = BPE::from_file(&to_str(&vocab), &to_str(&merges))
                .unk_token(EOS.into())
                .continuing_subword_prefix(String::new())
                .end_of_word_suffix("</w>".into())
                .fuse_unk(false)
                .build()
                .map_err(|e| load(&vocab, &e))?;
            let mut t = Tokenizer::new(bpe);
            t.with_normalizer(Some(clip_normalizer().map_err(|e| load(&vocab, &e))?));
            t.with_pre_tokenizer(Some(clip_pre_tokenizer().map_err(|e| load(&vocab, &e))?));
            t
        } else {
            return Err(TokenizerError::Missing {
                dir: dir.to_path_buf(),
            });
        };
        // The pad token and length: special_tokens_map.json, else tokenizer_config.json.
        let config = read_json(&dir.join("tokenizer_config.json"));
        let special = read_json(&dir.join("special_tokens_map.json"));
        let pad_text = [&special, &config]
            .into_iter()
            .flatten()
            .find_map(|v| v.get("pad_token").and_then(token_text))
            .unwrap_or_else(|| EOS.to_string());
        let max_length = config
            .as_ref()
            .and_then(|c| c.get("model_max_length")?.as_u64())
            .filter(|&n| n > 2 && n < 1 << 20)
            .unwrap_or(77) as usize;
        // transformers registers every special token (bos, eos, unk, pad) as an added token,
        // so each is matched whole in the text before BPE; SD 2.x's pad token "!" therefore
        // splits a prompt at every "!" (a quirk of theirs that ids must reproduce).
        let mut tokenizer = tokenizer;
        tokenizer.add_special_tokens(&[
            AddedToken::from(BOS, true),
            AddedToken::from(EOS, true),
            AddedToken::from(pad_text.clone(), true),
        ]);
        let id = |token: &str, what| {
            tokenizer
                .token_to_id(token)
                .ok_or_else(|| TokenizerError::NoToken {
                    dir: dir.to_path_buf(),
                    token: token.to_string(),
                    what,
                })
        };
        Ok(Self {
            bos: id(BOS, "beginning of text")?,
            eos: id(EOS, "end of text")?,
            pad: id(&pad_text, "padding")?,
            tokenizer,
            max_length,
        })
    }

    /// The text's tokens, without BOS/EOS and untruncated.
    pub fn tokens(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| TokenizerError::Encode {
                text: text.to_string(),
                message: e.to_string(),
            })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// `BOS + tokens[..max_length - 2] + EOS`, padded to `max_length` with the pad token.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos);
        let tokens = self.tokens(text)?;
        ids.extend(tokens.iter().take(self.max_length - 2));
        ids.push(self.eos);
        ids.resize(self.max_length, self.pad);
        Ok(ids)
    }
}

/// NFC, runs of whitespace to one space, lowercase (transformers' `CLIPTokenizer`).
fn clip_normalizer() -> tokenizers::Result<NormSequence> {
    let pattern = tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into());
    Ok(NormSequence::new(vec![
        NFC.into(),
        Replace::new(pattern, " ")?.into(),
        Lowercase.into(),
    ]))
}

/// CLIP's split regex, then byte-level (transformers' `CLIPTokenizer`).
fn clip_pre_tokenizer() -> tokenizers::Result<PreSequence> {
    let split = Split::new(
        SplitPattern::Regex(PATTERN.into()),
        SplitDelimiterBehavior::Removed,
        true,
    )?;
    Ok(PreSequence::new(vec![
        split.into(),
        ByteLevel::default().add_prefix_space(false).into(),
    ]))
}

/// GPT-2's / CLIP's reversible byte -> printable character map, in CLIP's vocabulary order.
fn byte_symbols() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xa1..=0xac)
        .chain(0xae..=0xff)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    cs.into_iter()
        .map(|c| char::from_u32(c).expect("valid code points"))
        .collect()
}

/// BPE merges in rank order, each the pair of tokens it joins.
pub type Merges = Vec<(String, String)>;

/// A CLIP BPE vocabulary learned from `texts` (SD 1.x's structure at a small size): the 256
/// byte symbols, the same with the end-of-word suffix `</w>`, up to `vocab_size - 514` merges
/// of the most frequent adjacent pair (ties: the lexicographically last pair), then
/// `<|startoftext|>` and `<|endoftext|>`. Deterministic.
pub fn learn_bpe(
    texts: &[&str],
    vocab_size: usize,
) -> Result<(Vec<String>, Merges), TokenizerError> {
    use std::collections::{BTreeMap, HashMap};
    use tokenizers::{
        NormalizedString, Normalizer, OffsetReferential, OffsetType, PreTokenizedString,
        PreTokenizer,
    };
    let fail = |e: tokenizers::Error| TokenizerError::Encode {
        text: "(the captions)".into(),
        message: e.to_string(),
    };
    let (norm, pre) = (
        clip_normalizer().map_err(fail)?,
        clip_pre_tokenizer().map_err(fail)?,
    );
    let mut words: BTreeMap<Vec<String>, usize> = BTreeMap::new();
    for text in texts {
        let mut n = NormalizedString::from(*text);
        norm.normalize(&mut n).map_err(fail)?;
        let mut p = PreTokenizedString::from(n);
        pre.pre_tokenize(&mut p).map_err(fail)?;
        for (piece, _, _) in p.get_splits(OffsetReferential::Original, OffsetType::Byte) {
            let chars: Vec<String> = piece.chars().map(String::from).collect();
            if let Some((last, rest)) = chars.split_last() {
                let mut symbols = rest.to_vec();
                symbols.push(format!("{last}</w>"));
                *words.entry(symbols).or_default() += 1;
            }
        }
    }
    let base: Vec<String> = byte_symbols().into_iter().map(String::from).collect();
    let mut vocab: Vec<String> = base.clone();
    vocab.extend(base.iter().map(|b| format!("{b}</w>")));
    let mut merges = Vec::new();
    while vocab.len() + 2 < vocab_size {
        let mut pairs: HashMap<(&str, &str), usize> = HashMap::new();
        for (w, c) in &words {
            for p in w.windows(2) {
                *pairs.entry((&p[0], &p[1])).or_default() += c;
            }
        }
        let Some((best, _)) = pairs
            .into_iter()
            .max_by(|(pa, ca), (pb, cb)| ca.cmp(cb).then(pa.cmp(pb)))
        else {
            break;
        };
        let best = (best.0.to_string(), best.1.to_string());
        let joined = format!("{}{}", best.0, best.1);
        words = words
            .into_iter()
            .map(|(w, c)| {
                let mut out = Vec::with_capacity(w.len());
                let mut i = 0;
                while i < w.len() {
                    if i + 1 < w.len() && w[i] == best.0 && w[i + 1] == best.1 {
                        out.push(joined.clone());
                        i += 2;
                    } else {
                        out.push(w[i].clone());
                        i += 1;
                    }
                }
                (out, c)
            })
            .fold(BTreeMap::new(), |mut m, (w, c)| {
                *m.entry(w).or_default() += c;
                m
            });
        vocab.push(joined);
        merges.push(best);
    }
    vocab.push(BOS.into());
    vocab.push(EOS.into());
    Ok((vocab, merges))
}

/// Writes a tokenizer folder as the SD 1.5 repository ships one (vocab.json, merges.txt,
/// special_tokens_map.json, tokenizer_config.json), which transformers' `CLIPTokenizer` and
/// [`ClipTokenizer::from_dir`] load.
pub fn write_tokenizer_dir(
    dir: &Path,
    vocab: &[String],
    merges: &[(String, String)],
    max_length: usize,
) -> Result<(), crate::io::IoError> {
    let ids: serde_json::Map<String, serde_json::Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i.into()))
        .collect();
    crate::io::write_atomic(
        &dir.join("vocab.json"),
        serde_json::to_string(&ids)
            .expect("strings serialise")
            .as_bytes(),
    )?;
    let mut text = String::from("#version: 0.2\n");
    for (a, b) in merges {
        text.push_str(&format!("{a} {b}\n"));
    }
    crate::io::write_atomic(&dir.join("merges.txt"), text.as_bytes())?;
    crate::io::write_json(
        &dir.join("special_tokens_map.json"),
        &serde_json::json!({"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}),
    )?;
    crate::io::write_json(
        &dir.join("tokenizer_config.json"),
        &serde_json::json!({
            "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length,
            "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS,
            "do_lower_case": true, "add_prefix_space": false, "errors": "replace",
        }),
    )
}
