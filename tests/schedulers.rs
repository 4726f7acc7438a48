//! DDIM, DDPM, Euler, Euler ancestral and DPM-Solver++(2M) against diffusers' schedulers of the
//! same name, configured from their `scheduler_config` (SD's scaled-linear schedule,
//! steps_offset 1, leading/linspace/trailing spacing, epsilon and v-prediction): the real
//! sampling loop runs on recorded model outputs (and recorded noise), and every model input,
//! timestep and the final sample must match (tests/fixtures/sd/schedulers.*, made by
//! scripts/gen_sd_reference.py).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::Path;

use burn::prelude::*;
use difftrain::diffusion::sampling::{self, Denoiser, SamplerKind};
use difftrain::diffusion::scheduler_config::SchedulerConfig;
use difftrain::io::safetensors::{self as io, HostTensor};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/sd");

fn tensor(t: &HostTensor, device: &Device) -> Tensor<4> {
    Tensor::from_data(TensorData::new(t.data.clone(), t.shape.clone()), device)
}

fn host(t: Tensor<4>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
        / scale
}

/// Returns the recorded model outputs in order and remembers what it was asked.
struct Replay<'a> {
    outputs: Vec<Tensor<4>>,
    seen: RefCell<Vec<(Tensor<4>, f64)>>,
    _t: std::marker::PhantomData<&'a ()>,
}

impl Denoiser for Replay<'_> {
    fn predict(&self, x: Tensor<4>, t: f64) -> Tensor<4> {
        let mut seen = self.seen.borrow_mut();
        let i = seen.len();
        seen.push((x, t));
        self.outputs[i].clone()
    }
}

fn class_of(case: &str) -> &'static str {
    match case.split('_').next().unwrap() {
        "ddim" => "DDIMScheduler",
        "ddpm" => "DDPMScheduler",
        "dpmpp" => "DPMSolverMultistepScheduler",
        _ if case.starts_with("euler_a_") => "EulerAncestralDiscreteScheduler",
        _ => "EulerDiscreteScheduler",
    }
}

#[test]
fn every_sampler_matches_its_diffusers_scheduler() {
    let device = Device::flex();
    let tensors: BTreeMap<String, HostTensor> =
        io::load_safetensors(&Path::new(FIXTURES).join("schedulers.safetensors")).unwrap();
    let meta: BTreeMap<String, serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(Path::new(FIXTURES).join("schedulers.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(meta.len(), 8);
    let mut seen_kinds = std::collections::BTreeSet::new();
    for (name, case) in &meta {
        let mut config = case["config"].clone();
        config["_class_name"] = class_of(name).into();
        let sc = SchedulerConfig::from_diffusers_json(&config).unwrap();
        seen_kinds.insert(format!("{:?}", sc.kind));
        let want_ts: Vec<f64> = serde_json::from_value(case["timesteps"].clone()).unwrap();
        let n = want_ts.len();
        let opts = sc.sampler_options(None, n);
        let init = case["init_noise_sigma"].as_f64().unwrap();
        let initial = tensor(&tensors[&format!("{name}.initial")], &device);
        let replay = Replay {
            outputs: (0..n)
                .map(|i| tensor(&tensors[&format!("{name}.model_output.{i}")], &device))
                .collect(),
            seen: RefCell::new(Vec::new()),
            _t: std::marker::PhantomData,
        };
        let noises = case["noises"].as_u64().unwrap() as usize;
        let mut k = 0;
        let mut randn = || {
            let t = tensor(&tensors[&format!("{name}.noise.{k}")], &device);
            k += 1;
            t
        };
        // The fixture's initial sample is already scaled by init_noise_sigma; sample() scales.
        let out = sampling::sample(
            &replay,
            &sc.schedule(),
            &opts,
            initial.clone().div_scalar(init),
            &mut randn,
        );
        assert_eq!(k, noises, "{name}: noise draws");
        let seen = replay.seen.into_inner();
        let ts: Vec<f64> = seen.iter().map(|(_, t)| *t).collect();
        for (a, b) in ts.iter().zip(&want_ts) {
            assert!(
                (a - b).abs() < 1e-3,
                "{name}: timesteps {ts:?} vs {want_ts:?}"
            );
        }
        let scales: Vec<f64> = serde_json::from_value(case["scales"].clone()).unwrap();
        for (i, (x, _)) in seen.into_iter().enumerate() {
            let prev = if i == 0 {
                host(initial.clone())
            } else {
                tensors[&format!("{name}.sample.{}", i - 1)].data.clone()
            };
            let want: Vec<f32> = prev.iter().map(|v| v * scales[i] as f32).collect();
            let d = max_rel_diff(&host(x), &want);
            assert!(d < 1e-4, "{name}: model input {i} differs by {d:e}");
        }
        let d = max_rel_diff(
            &host(out),
            &tensors[&format!("{name}.sample.{}", n - 1)].data,
        );
        assert!(d < 1e-4, "{name}: final sample differs by {d:e} (relative)");
    }
    assert_eq!(seen_kinds.len(), 5, "{seen_kinds:?}");
    let _ = SamplerKind::Ddim;
}
