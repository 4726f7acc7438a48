//! Numerics against diffusers. Fixtures come from `scripts/gen_reference.py` (diffusers 0.42.1,
//! torch 2.15, f32 CPU); regenerate them with that script, never by hand.

use std::path::Path;

use burn::prelude::*;
use difftrain::diffusion::sampling::{self, SamplerKind, SamplerOptions, TimestepSpacing};
use difftrain::diffusion::schedule::{BetaSchedule, NoiseSchedule, PredictionType};
use difftrain::io::safetensors::{self as io, HostTensor};
use difftrain::models::unet_2d::UNet2DConfig;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn tensor(t: &HostTensor, device: &Device) -> Tensor<4> {
    let s = &t.shape;
    Tensor::from_data(
        TensorData::new(t.data.clone(), [s[0], s[1], s[2], s[3]]),
        device,
    )
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn host(t: Tensor<4>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

#[test]
fn beta_schedules_match_diffusers() {
    let text = std::fs::read_to_string(Path::new(FIXTURES).join("schedules.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let idx: Vec<usize> = serde_json::from_value(v["indices"].clone()).unwrap();
    for (name, kind, b0, b1) in [
        ("linear", BetaSchedule::Linear, 1e-4, 0.02),
        ("scaled_linear", BetaSchedule::ScaledLinear, 0.00085, 0.012),
        (
            "squaredcos_cap_v2",
            BetaSchedule::SquaredcosCapV2,
            1e-4,
            0.02,
        ),
    ] {
        let s = NoiseSchedule::new(kind, 1000, b0, b1);
        let want: Vec<f64> = serde_json::from_value(v[name].clone()).unwrap();
        for (&i, w) in idx.iter().zip(want) {
            let rel = (s.alphas_cumprod[i] - w).abs() / w;
            // diffusers accumulates the product in f32: ~1e-7 per step, compounding.
            assert!(
                rel < 2e-4,
                "{name}[{i}]: ours {} diffusers {w} (rel {rel:e})",
                s.alphas_cumprod[i]
            );
        }
    }
}

#[test]
fn samplers_match_diffusers_step_by_step() {
    let device = Device::flex();
    let tensors = io::load_safetensors(&Path::new(FIXTURES).join("samplers.safetensors")).unwrap();
    let text = std::fs::read_to_string(Path::new(FIXTURES).join("samplers.json")).unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    assert_eq!(cases.len(), 5);
    let schedule = NoiseSchedule::new(BetaSchedule::Linear, 1000, 1e-4, 0.02);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let opts = SamplerOptions {
            kind: serde_json::from_value(case["cls"].clone()).unwrap(),
            num_inference_steps: case["steps"].as_u64().unwrap() as usize,
            prediction: serde_json::from_value::<PredictionType>(case["prediction"].clone())
                .unwrap(),
            spacing: serde_json::from_value::<TimestepSpacing>(case["spacing"].clone()).unwrap(),
            eta: case["eta"].as_f64().unwrap(),
            clip_sample: case["clip"].as_bool().unwrap().then_some(1.0),
            set_alpha_to_one: true,
            steps_offset: 0,
        };
        let want_ts: Vec<usize> = serde_json::from_value(case["timesteps"].clone()).unwrap();
        let ts = sampling::inference_timesteps(1000, opts.num_inference_steps, opts.spacing, 0);
        assert_eq!(ts, want_ts, "{name}: timesteps");
        let mut x = tensor(&tensors[&format!("{name}.initial")], &device);
        for (i, &t) in ts.iter().enumerate() {
            let out = tensor(&tensors[&format!("{name}.model_output.{i}")], &device);
            let noise = Some(tensor(&tensors[&format!("{name}.noise.{i}")], &device));
            x = match opts.kind {
                SamplerKind::Ddpm => sampling::ddpm_step(&schedule, &opts, out, t, x, noise),
                SamplerKind::Ddim => sampling::ddim_step(&schedule, &opts, out, t, x, noise),
                other => panic!("the fixture has only DDPM and DDIM cases, not {other:?}"),
            };
            let want = &tensors[&format!("{name}.sample.{i}")].data;
            let diff = max_abs_diff(&host(x.clone()), want);
            assert!(
                diff < 2e-4,
                "{name} step {i} (t = {t}): max |ours - diffusers| = {diff:e}"
            );
        }
    }
}

#[test]
fn unet2d_forward_matches_diffusers() {
    let device = Device::flex();
    let dir = Path::new(FIXTURES).join("tiny_unet2d");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let cfg = UNet2DConfig::from_diffusers_json(&json).unwrap();
    assert!(cfg.problems().is_empty(), "{:?}", cfg.problems());
    let weights = dir.join("diffusion_pytorch_model.safetensors");
    let model = io::load_into(
        cfg.init(&device),
        &io::load_safetensors(&weights).unwrap(),
        &weights,
    )
    .expect("every diffusers key maps onto the model and back");
    let ioset = io::load_safetensors(&dir.join("io.safetensors")).unwrap();
    let x = tensor(&ioset["input"], &device);
    let t = Tensor::<1>::from_data(
        TensorData::new(ioset["timesteps"].data.clone(), [2]),
        &device,
    );
    let y = host(model.forward(x, t));
    let diff = max_abs_diff(&y, &ioset["output"].data);
    assert!(diff < 1e-4, "max |ours - diffusers| = {diff:e}");
}

#[test]
fn strict_loading_reports_every_problem_sorted() {
    let device = Device::flex();
    let dir = Path::new(FIXTURES).join("tiny_unet2d");
    let weights = dir.join("diffusion_pytorch_model.safetensors");
    let mut tensors = io::load_safetensors(&weights).unwrap();
    tensors.remove("conv_in.bias");
    tensors.insert(
        "extra.weight".into(),
        HostTensor {
            shape: vec![1],
            data: vec![0.0],
        },
    );
    tensors.get_mut("conv_out.weight").unwrap().shape = vec![3, 16, 9, 1];
    let cfg = UNet2DConfig::from_diffusers_json(
        &serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap(),
    )
    .unwrap();
    let err = io::load_into(cfg.init(&device), &tensors, &weights)
        .unwrap_err()
        .to_string();
    assert!(err.contains("diffusion_pytorch_model.safetensors"), "{err}");
    assert!(err.contains("missing key conv_in.bias"), "{err}");
    assert!(err.contains("unexpected key extra.weight"), "{err}");
    assert!(err.contains("shape mismatch for conv_out.weight"), "{err}");
}

#[test]
fn unsupported_diffusers_options_are_refused() {
    let json = serde_json::json!({"_class_name": "UNet2DModel", "time_embedding_type": "fourier"});
    let err = UNet2DConfig::from_diffusers_json(&json)
        .unwrap_err()
        .to_string();
    assert!(err.contains("time_embedding_type"), "{err}");
}
