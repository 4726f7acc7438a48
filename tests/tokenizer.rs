//! The CLIP tokenizer against transformers' `CLIPTokenizer` on 33 prompts (punctuation, digits,
//! unicode, extra spaces, special tokens, more than 77 tokens), from both folder layouts: SD
//! 1.5's vocab.json + merges.txt and transformers 5's tokenizer.json. Reference ids from
//! scripts/gen_sd_reference.py.

use std::path::Path;

use difftrain::tokenizer::ClipTokenizer;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/sd");

fn reference() -> serde_json::Value {
    let text = std::fs::read_to_string(Path::new(FIXTURES).join("tokenizer_ids.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<Vec<u32>> {
    serde_json::from_value(v.clone()).unwrap()
}

fn check(dir: &str, key: &str) {
    let tok = ClipTokenizer::from_dir(&Path::new(FIXTURES).join(dir)).unwrap();
    let r = reference();
    let prompts: Vec<String> = serde_json::from_value(r["prompts"].clone()).unwrap();
    assert!(prompts.len() >= 30);
    let mut failures = Vec::new();
    for (prompt, want) in prompts.iter().zip(ids(&r[key])) {
        let got = tok.encode(prompt).unwrap();
        if got != want {
            failures.push(format!("{prompt:?}:\n  ours {got:?}\n  want {want:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn vocab_and_merges_give_transformers_ids() {
    check("tokenizer", "ids");
}

#[test]
fn tokenizer_json_gives_transformers_ids() {
    check("tiny_sd/tokenizer", "ids");
}

#[test]
fn sd2_pad_token_is_read_from_the_special_tokens_map() {
    check("tokenizer_pad_bang", "ids_pad_bang");
    let tok = ClipTokenizer::from_dir(&Path::new(FIXTURES).join("tokenizer_pad_bang")).unwrap();
    assert_ne!(tok.pad, tok.eos);
}

#[test]
fn long_prompts_keep_bos_and_eos() {
    let tok = ClipTokenizer::from_dir(&Path::new(FIXTURES).join("tokenizer")).unwrap();
    let r = reference();
    let unpadded = ids(&r["unpadded"]);
    let long = &unpadded[21];
    assert!(long.len() > 77, "the fixture has a prompt over 77 tokens");
    let prompt = r["prompts"][21].as_str().unwrap();
    let ids = tok.encode(prompt).unwrap();
    assert_eq!(ids.len(), 77);
    assert_eq!((ids[0], ids[76]), (tok.bos, tok.eos));
    assert_eq!(&ids[..76], &long[..76]);
}

#[test]
fn a_folder_without_a_tokenizer_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let err = ClipTokenizer::from_dir(tmp.path())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("vocab.json") && err.contains(&tmp.path().display().to_string()),
        "{err}"
    );
}
