//! The Stable Diffusion models against diffusers/transformers on the tiny fixtures of
//! `scripts/gen_sd_reference.py` (tests/fixtures/sd/; weights stored as float16, references
//! computed in float32 from the same weights).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use difftrain::io::safetensors::{self as io, HostTensor};
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
