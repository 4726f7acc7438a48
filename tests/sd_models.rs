//! The Stable Diffusion models against diffusers/transformers on the tiny fixtures of
//! `scripts/gen_sd_reference.py` (tests/fixtures/sd/; weights stored as float16, references
//! computed in float32 from the same weights).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use difftrain::io::keys::{self, View};
use difftrain::io::safetensors::{self as io, HostTensor};
use difftrain::models::autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig};
use difftrain::models::clip::CLIPTextConfig;
use difftrain::models::unet_2d_condition::UNet2DConditionConfig;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/sd");

fn fixture(path: &str) -> PathBuf {
    Path::new(FIXTURES).join(path)
}

fn reference() -> BTreeMap<String, HostTensor> {
    io::load_safetensors(&fixture("reference.safetensors")).unwrap()
}

fn tensor<const D: usize>(t: &HostTensor, device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(t.data.clone(), t.shape.clone()), device)
}

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn check_unet(dir: &str, key: &str, labels: bool) {
    let device = Device::flex();
    let cfg = UNet2DConditionConfig::from_diffusers_json(&read_json(&fixture(&format!(
        "{dir}/config.json"
    ))))
    .unwrap();
    assert!(
        cfg.problems("unet").is_empty(),
        "{:?}",
        cfg.problems("unet")
    );
    let model = io::load_file(
        cfg.init(&device),
        &fixture(&format!("{dir}/diffusion_pytorch_model.fp16.safetensors")),
    )
    .expect("every diffusers key maps onto the model");
    let r = reference();
    let labels = labels.then(|| {
        let l: Vec<i64> = r[&format!("{key}.class_labels")]
            .data
            .iter()
            .map(|&v| v as i64)
            .collect();
        Tensor::<1, Int>::from_data(TensorData::new(l, [2]), &device)
    });
    let y = model.forward(
        tensor(&r[&format!("{key}.sample")], &device),
        tensor(&r[&format!("{key}.timesteps")], &device),
        &tensor(&r[&format!("{key}.encoder_hidden_states")], &device),
        labels,
    );
    let diff = max_abs_diff(&host(y), &r[&format!("{key}.output")].data);
    assert!(diff < 1e-4, "{key}: max |ours - diffusers| = {diff:e}");
}

#[test]
fn unet_2d_condition_matches_diffusers() {
    check_unet("tiny_sd/unet", "unet", false);
}

#[test]
fn unet_with_class_labels_matches_diffusers() {
    check_unet("unet_class", "unet_class", true);
}

#[test]
fn unet_with_linear_projection_and_per_block_heads_matches_diffusers() {
    check_unet("unet_linear", "unet_linear", false);
}

fn tiny_vae(device: &Device) -> (AutoencoderKLConfig, AutoencoderKL) {
    let cfg =
        AutoencoderKLConfig::from_diffusers_json(&read_json(&fixture("tiny_sd/vae/config.json")))
            .unwrap();
    assert!(cfg.problems("vae").is_empty(), "{:?}", cfg.problems("vae"));
    let path = fixture("tiny_sd/vae/diffusion_pytorch_model.fp16.safetensors");
    (cfg.clone(), io::load_file(cfg.init(device), &path).unwrap())
}

#[test]
fn vae_posterior_kl_and_decoder_match_diffusers() {
    let device = Device::flex();
    let (cfg, vae) = tiny_vae(&device);
    assert_eq!(cfg.downsampling(), 2);
    let r = reference();
    let post = vae.encode(tensor(&r["vae.image"], &device));
    for (name, ours) in [
        ("vae.mean", host(post.mean.clone())),
        ("vae.logvar", host(post.logvar.clone())),
        ("vae.kl", host(post.kl())),
        (
            "vae.decoded",
            host(vae.decode(tensor(&r["vae.latents"], &device))),
        ),
    ] {
        let want = &r[name].data;
        // KL sums 1024 terms of order 1: compare relative to its size.
        let tol = 1e-4 * want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        let diff = max_abs_diff(&ours, want);
        assert!(diff < tol, "{name}: max |ours - diffusers| = {diff:e}");
    }
    // sample = mean + std * noise, mode = mean.
    let noise = Tensor::<4>::ones(post.mean.dims(), &device);
    let sample = host(post.sample(noise));
    let expect: Vec<f32> = host(post.mean.clone())
        .iter()
        .zip(host(post.std()))
        .map(|(m, s)| m + s)
        .collect();
    assert!(max_abs_diff(&sample, &expect) < 1e-6);
    assert_eq!(host(post.mode()), host(post.mean));
}

#[test]
fn vae_with_legacy_attention_names_loads_the_same_weights() {
    let device = Device::flex();
    let (cfg, vae) = tiny_vae(&device);
    let mut legacy = BTreeMap::new();
    for (k, v) in io::named_tensors(&vae) {
        let k = k
            .replace("attentions.0.to_q.", "attentions.0.query.")
            .replace("attentions.0.to_k.", "attentions.0.key.")
            .replace("attentions.0.to_v.", "attentions.0.value.")
            .replace("attentions.0.to_out.0.", "attentions.0.proj_attn.");
        legacy.insert(k, v);
    }
    assert!(legacy.contains_key("encoder.mid_block.attentions.0.query.weight"));
    let view = View::renamed(&legacy, keys::vae_legacy_attention, |_| false);
    let loaded = io::load_into(cfg.init(&device), &view, Path::new("legacy")).unwrap();
    assert_eq!(io::named_tensors(&loaded), io::named_tensors(&vae));
}

#[test]
fn clip_text_model_matches_transformers_with_clip_skip() {
    let device = Device::flex();
    let cfg = CLIPTextConfig::from_transformers_json(&read_json(&fixture(
        "tiny_sd/text_encoder/config.json",
    )))
    .unwrap();
    let path = fixture("tiny_sd/text_encoder/model.fp16.safetensors");
    let file = io::SafetensorsFile::open(&path).unwrap();
    // transformers 5 saves without the `text_model.` level.
    let view = View::renamed(&file, keys::clip_text_model_prefix, keys::clip_buffer);
    let model = io::load_into(cfg.init(&device), &view, &path).unwrap();
    let r = reference();
    let ids: Vec<i64> = r["clip.input_ids"].data.iter().map(|&v| v as i64).collect();
    let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [2, 77]), &device);
    for (skip, key) in [(1, "clip.last_hidden_state"), (2, "clip.skip2")] {
        let diff = max_abs_diff(&host(model.forward(ids.clone(), skip)), &r[key].data);
        assert!(diff < 1e-4, "{key}: max |ours - transformers| = {diff:e}");
    }
}
