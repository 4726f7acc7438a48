//! The whole text-to-image pipeline against diffusers' `StableDiffusionPipeline` on the tiny
//! fixture (tests/fixtures/sd/, scripts/gen_sd_reference.py): prompt "a red circle", negative
//! "blurry", CFG 7.5, 5 steps, 32x32, the same initial latents; and the single-file checkpoint
//! made from the fixture loads to the folder's weights.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use difftrain::diffusion::sampling::SamplerKind;
use difftrain::io::safetensors::{self as io, HostTensor};
use difftrain::pipelines::stable_diffusion::{self, Pretrained, PretrainedError};
use difftrain::pipelines::text_to_image::{TextToImage, encode_prompts, text_to_image};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/sd");

fn fixture(p: &str) -> PathBuf {
    Path::new(FIXTURES).join(p)
}

fn reference() -> BTreeMap<String, HostTensor> {
    io::load_safetensors(&fixture("reference.safetensors")).unwrap()
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

fn request(latents: Tensor<4>, sampler: SamplerKind) -> TextToImage {
    TextToImage {
        prompt: "a red circle".into(),
        negative_prompt: "blurry".into(),
        guidance_scale: 7.5,
        steps: 5,
        sampler: Some(sampler),
        seed: 0,
        width: 32,
        height: 32,
        num: 1,
        latents: Some(latents),
        clip_skip: 1,
    }
}

#[test]
fn text_to_image_matches_diffusers_for_ddim_dpmpp_and_euler() {
    let device = Device::flex();
    let sd = stable_diffusion::load(&Pretrained::Folder(fixture("tiny_sd")), &device).unwrap();
    assert_eq!(sd.vae_factor(), 2);
    assert_eq!(sd.default_size(), 64);
    let r = reference();
    let embeds = encode_prompts(&sd, &["a red circle", "blurry"], 1, &device).unwrap();
    let mut want = r["pipeline.prompt_embeds"].data.clone();
    want.extend(&r["pipeline.negative_prompt_embeds"].data);
    assert!(max_abs_diff(&host(embeds), &want) < 1e-4);
    let l = &r["pipeline.latents"];
    let latents = Tensor::<4>::from_data(TensorData::new(l.data.clone(), l.shape.clone()), &device);
    for (name, sampler) in [
        ("ddim", SamplerKind::Ddim),
        ("dpmpp_2m", SamplerKind::DpmSolverPP2M),
        ("euler", SamplerKind::Euler),
    ] {
        let image = text_to_image(&sd, &request(latents.clone(), sampler), &device).unwrap();
        // diffusers' output_type="np": (image / 2 + 0.5).clamp(0, 1).
        let ours = host(image.div_scalar(2.0).add_scalar(0.5).clamp(0.0, 1.0));
        let diff = max_abs_diff(&ours, &r[&format!("pipeline.{name}")].data);
        assert!(diff < 1e-3, "{name}: max |ours - diffusers| = {diff:e}");
    }
}

#[test]
fn single_file_checkpoint_loads_the_folders_weights() {
    let device = Device::flex();
    let folder = stable_diffusion::load(&Pretrained::Folder(fixture("tiny_sd")), &device).unwrap();
    let source =
        Pretrained::detect(&fixture("tiny_sd.safetensors"), Some(&fixture("tiny_sd"))).unwrap();
    let single = stable_diffusion::load(&source, &device).unwrap();
    assert_eq!(
        io::named_tensors(&single.unet),
        io::named_tensors(&folder.unet)
    );
    assert_eq!(
        io::named_tensors(&single.vae),
        io::named_tensors(&folder.vae)
    );
    assert_eq!(
        io::named_tensors(&single.text_encoder),
        io::named_tensors(&folder.text_encoder)
    );
}

#[test]
fn missing_parts_and_pickles_are_named_with_what_to_download() {
    let device = Device::flex();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("unet")).unwrap();
    std::fs::write(tmp.path().join("unet/diffusion_pytorch_model.bin"), b"x").unwrap();
    let err = stable_diffusion::load(&Pretrained::Folder(tmp.path().to_path_buf()), &device)
        .err()
        .unwrap()
        .to_string();
    for needle in [
        "vae/config.json",
        "text_encoder/config.json",
        "tokenizer",
        "scheduler/scheduler_config.json",
        "pickle",
        "stable-diffusion-v1-5",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
    let ckpt = tmp.path().join("v1-5.ckpt");
    std::fs::write(&ckpt, b"x").unwrap();
    assert!(matches!(
        Pretrained::detect(&ckpt, None),
        Err(PretrainedError::Pickle { .. })
    ));
    let single = Pretrained::detect(&fixture("tiny_sd.safetensors"), None).unwrap();
    let err = stable_diffusion::load(&single, &device)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("--config-from"), "{err}");
}
