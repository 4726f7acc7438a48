//! LoRA fine-tuning of Stable Diffusion: files written by diffusers/PEFT and converted to
//! kohya's layout apply like diffusers applies them (scripts/gen_lora_reference.py); the
//! factored adapter forward equals it too; a LoRA run on the tiny diffusers fixture trains
//! adapters only, exports both formats (which fold in identically), resumes bitwise after a
//! SIGKILL and refuses a changed base; bad targets are named.

mod common;

use common::{copy_dir, kill_after_checkpoint};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use burn::prelude::*;
use difftrain::config::Config;
use difftrain::io::lora::{self as lora_io, Component, ModuleName};
use difftrain::io::safetensors::{HostTensor, load_safetensors};
use difftrain::lora::{Linears, LoraConfig, Targets, attach};
use difftrain::models::Architecture;
use difftrain::optim::precision::MixedPrecision;
use difftrain::pipelines::lora::apply_file;
use difftrain::pipelines::stable_diffusion::{self, Pretrained, StableDiffusion};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn tiny_sd(device: &Device) -> StableDiffusion {
    stable_diffusion::load(&Pretrained::Folder(fixtures().join("sd/tiny_sd")), device).unwrap()
}

fn tensor<const D: usize>(t: &HostTensor, device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(t.data.clone(), t.shape.clone()), device)
}

fn max_diff<const D: usize>(a: Tensor<D>, b: &HostTensor) -> f32 {
    let a = difftrain::nn::to_host(a);
    assert_eq!(a.len(), b.data.len());
    a.iter()
        .zip(&b.data)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

struct Reference {
    r: BTreeMap<String, HostTensor>,
}

impl Reference {
    fn load() -> Self {
        Self {
            r: load_safetensors(&fixtures().join("lora/reference.safetensors")).unwrap(),
        }
    }
    fn ids(&self, device: &Device) -> Tensor<2, Int> {
        let t = &self.r["ids"];
        let v: Vec<i64> = t.data.iter().map(|&x| x as i64).collect();
        Tensor::from_data(TensorData::new(v, t.shape.clone()), device)
    }
    /// U-Net output on the fixture's inputs and `context`.
    fn unet(&self, sd: &StableDiffusion, context: &Tensor<3>, device: &Device) -> Tensor<4> {
        let x = tensor::<4>(&self.r["x"], device);
        let t = tensor::<1>(&self.r["t"], device);
        sd.unet.forward(x, t, context, None)
    }
}

#[test]
fn lora_files_written_by_diffusers_apply_as_diffusers_applies_them() {
    let device = Device::flex();
    let reference = Reference::load();
    let r = &reference.r;
    // The base first: the fixture's inputs give the fixture's outputs.
    let sd = tiny_sd(&device);
    let context = sd.text_encoders[0].model.forward(reference.ids(&device), 1);
    assert!(max_diff(context.clone(), &r["context_base"]) < 1e-4);
    assert!(max_diff(reference.unet(&sd, &context, &device), &r["out_base"]) < 1e-4);
    for (file, format) in [
        ("diffusers_lora.safetensors", "diffusers"),
        ("kohya_lora.safetensors", "kohya"),
    ] {
        let lora = lora_io::read(&fixtures().join("lora").join(file)).unwrap();
        assert!(
            lora.format == format || (format == "diffusers" && lora.format == "peft"),
            "{file}: {}",
            lora.format
        );
        let mut sd = tiny_sd(&device);
        let n = apply_file(
            &lora,
            1.0,
            &mut sd.unet,
            &mut [&mut sd.text_encoders[0].model],
        )
        .unwrap();
        assert_eq!(n, lora.modules.len());
        assert!(
            lora.modules
                .keys()
                .any(|(c, _)| *c == Component::TextEncoder(0)),
            "{file}"
        );
        let context = sd.text_encoders[0].model.forward(reference.ids(&device), 1);
        let d = max_diff(context.clone(), &r["context_lora"]);
        assert!(d < 1e-4, "{file}: text encoder differs by {d}");
        let d = max_diff(reference.unet(&sd, &context, &device), &r["out_lora"]);
        assert!(d < 1e-4, "{file}: U-Net differs by {d}");
        // And at half strength (the U-Net's LoRA at 0.5, the text encoder's base context).
        let mut sd = tiny_sd(&device);
        let mut te = sd.text_encoders[0].model.clone();
        let half = lora_io::LoraFile {
            modules: lora
                .modules
                .clone()
                .into_iter()
                .filter(|((c, _), _)| *c == Component::Unet)
                .collect(),
            ..lora.clone()
        };
        apply_file(&half, 0.5, &mut sd.unet, &mut [&mut te]).unwrap();
        let context = tensor::<3>(&r["context_base"], &device);
        let d = max_diff(
            reference.unet(&sd, &context, &device),
            &r["out_lora_half_unet"],
        );
        assert!(d < 1e-4, "{file} at 0.5: U-Net differs by {d}");
    }
}

/// The adapters as training computes them (factored, unmerged) give diffusers' output too.
#[test]
fn factored_adapters_match_diffusers() {
    let device = Device::flex();
    let reference = Reference::load();
    let lora = lora_io::read(&fixtures().join("lora/diffusers_lora.safetensors")).unwrap();
    let sd = tiny_sd(&device);
    let cfg = LoraConfig {
        rank: 4,
        ..LoraConfig::default()
    };
    let (mut unet, adapted) =
        attach(sd.unet.clone(), &cfg, &cfg.target_modules, "unet", &device).unwrap();
    let (mut te, _) = attach(
        sd.text_encoders[0].model.clone(),
        &cfg,
        &cfg.text_encoder_target_modules,
        "te",
        &device,
    )
    .unwrap();
    let unet_modules = lora
        .modules
        .keys()
        .filter(|(c, _)| *c == Component::Unet)
        .count();
    assert_eq!(adapted.len(), unet_modules);
    let set = |comp: Component, p: &str, l: &mut difftrain::nn::Linear| {
        let m = &lora.modules[&(comp, ModuleName::Path(p.to_string()))];
        let a = l.lora.as_mut().unwrap();
        a.down.weight = burn::module::Param::from_tensor(tensor::<2>(&m.down, &device));
        a.up.weight = burn::module::Param::from_tensor(tensor::<2>(&m.up, &device));
        a.scale = m.scale;
    };
    unet.linears("", &mut |p, l| {
        if l.lora.is_some() {
            set(Component::Unet, p, l)
        }
    });
    te.linears("", &mut |p, l| {
        if l.lora.is_some() {
            set(Component::TextEncoder(0), p, l)
        }
    });
    let mut sd = StableDiffusion { unet, ..sd };
    sd.text_encoders[0].model = te;
    let context = sd.text_encoders[0].model.forward(reference.ids(&device), 1);
    assert!(max_diff(context.clone(), &reference.r["context_lora"]) < 1e-4);
    let d = max_diff(
        reference.unet(&sd, &context, &device),
        &reference.r["out_lora"],
    );
    assert!(d < 1e-4, "factored U-Net differs by {d}");
}

// ------------------------------------------------------------------------------- training

/// Two 32x32 images captioned "mountain" (a sky, a grey triangle, green ground).
fn mountain_dataset(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut meta = String::new();
    for i in 0..2u32 {
        let img = image::RgbImage::from_fn(32, 32, |x, y| {
            let peak = (16i32 - x as i32).abs() + 6 + i as i32;
            if y > 24 {
                image::Rgb([40, 160, 60])
            } else if y as i32 >= peak {
                image::Rgb([90, 90, 100])
            } else {
                image::Rgb([110, 160, 230])
            }
        });
        img.save(dir.join(format!("{i}.png"))).unwrap();
        meta.push_str(&format!(
            "{{\"file_name\": \"{i}.png\", \"text\": \"mountain\"}}\n"
        ));
    }
    std::fs::write(dir.join("metadata.jsonl"), meta).unwrap();
}

/// The mountain dataset and a copy of the tiny SD fixture (a run may write next to its base)
/// under `dir`: `(data, base)`.
fn mountain_and_base(dir: &Path) -> (PathBuf, PathBuf) {
    let (data, base) = (dir.join("data"), dir.join("base"));
    mountain_dataset(&data);
    copy_dir(&fixtures().join("sd/tiny_sd"), &base);
    (data, base)
}

fn lora_config(base: &Path, data: &Path, out: &Path) -> Config {
    let mut c = Config::default();
    c.run.name = "mountain_test".into();
    c.run.output_dir = Some(out.to_path_buf());
    c.data.path = data.to_path_buf();
    c.data.resolution = 32;
    c.data.color = difftrain::data::ColorMode::Rgb;
    c.data.random_flip = false;
    c.model.architecture = Architecture::SdLora;
    c.model.pretrained = Some(base.to_path_buf());
    c.lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.1,
        text_encoder: true,
        text_encoder_lr: Some(5e-4),
        ..LoraConfig::default()
    };
    c.diffusion.noise_offset = 0.1;
    c.diffusion.snr_gamma = Some(5.0);
    c.ema.enabled = true;
    c.train.max_steps = 12;
    c.train.batch_size = 2;
    c.train.learning_rate = 1e-3;
    c.train.max_grad_norm = 1.0;
    c.checkpoint.every_steps = 4;
    c.checkpoint.keep_last = 0;
    c.logging.log_every = 1;
    c.sample.num_images = 2;
    c.sample.num_inference_steps = 2;
    c.sample.prompts = vec!["mountain".into()];
    c
}

fn write(c: &Config, path: &Path) -> PathBuf {
    std::fs::write(path, c.to_toml()).unwrap();
    path.to_path_buf()
}

fn train(cfg: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_train"));
    cmd.arg("--config").arg(cfg).args(extra);
    cmd
}

fn output(cmd: &mut Command) -> (bool, String) {
    let r = cmd.output().unwrap();
    (
        r.status.success(),
        String::from_utf8_lossy(&r.stderr).into_owned(),
    )
}

#[test]
fn lora_run_trains_adapters_exports_both_formats_and_resumes_bitwise_after_sigkill() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, base) = mountain_and_base(tmp.path());

    // Uninterrupted.
    let a_out = tmp.path().join("a");
    let a = write(
        &lora_config(&base, &data, &a_out),
        &tmp.path().join("a.toml"),
    );
    let (ok, err) = output(&mut train(&a, &[]));
    assert!(ok, "{err}");

    // The checkpoint holds the adapters (U-Net and text encoder) and nothing else.
    let ck = load_safetensors(&a_out.join("checkpoint-12/model.safetensors")).unwrap();
    assert!(
        ck.keys()
            .all(|k| k.contains(".lora.down.weight") || k.contains(".lora.up.weight")),
        "{:?}",
        ck.keys().next()
    );
    assert!(
        ck.keys()
            .any(|k| k.starts_with("unet.") && k.ends_with("attn2.to_k.lora.up.weight"))
    );
    assert!(
        ck.keys().any(
            |k| k.starts_with("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora")
        )
    );
    assert!(ck.values().any(|t| t.data.iter().any(|v| *v != 0.0)));
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a_out.join("checkpoint-12/state.json")).unwrap())
            .unwrap();
    assert!(state["fingerprints"]["base model"].is_string(), "{state}");

    // Both exported files fold into the base identically; the kohya one carries its metadata.
    let export = a_out.join("export");
    let device = Device::flex();
    let merged = |file: &str| {
        let f = lora_io::read(&export.join(file)).unwrap();
        let mut sd = tiny_sd(&device);
        apply_file(&f, 1.0, &mut sd.unet, &mut [&mut sd.text_encoders[0].model]).unwrap();
        (
            f,
            difftrain::io::safetensors::named_tensors(&sd.unet),
            difftrain::io::safetensors::named_tensors(&sd.text_encoders[0].model),
        )
    };
    let (fd, ud, td) = merged("pytorch_lora_weights.safetensors");
    let (fk, uk, tk) = merged("mountain_test.safetensors");
    assert_eq!((fd.format, fk.format), ("diffusers", "kohya"));
    for (a, b) in [(&ud, &uk), (&td, &tk)] {
        let d = a
            .iter()
            .flat_map(|(k, t)| t.data.iter().zip(&b[k].data).map(|(x, y)| (x - y).abs()))
            .fold(0.0f32, f32::max);
        assert!(
            d < 1e-6,
            "diffusers and kohya exports fold in differently: {d}"
        );
    }
    let base_unet = difftrain::io::safetensors::named_tensors(&tiny_sd(&device).unet);
    let key = base_unet
        .keys()
        .find(|k| k.ends_with("attn1.to_q.weight"))
        .unwrap()
        .clone();
    let moved = base_unet[&key]
        .data
        .iter()
        .zip(&ud[&key].data)
        .any(|(x, y)| x != y);
    assert!(moved, "the LoRA changes nothing");
    let kohya = difftrain::io::safetensors::SafetensorsFile::open(
        &export.join("mountain_test.safetensors"),
    )
    .unwrap();
    let meta = kohya.metadata();
    assert_eq!(meta["ss_network_dim"], "4");
    assert_eq!(meta["ss_network_alpha"], "8");
    assert_eq!(meta["ss_base_model_version"], "sd_v1");
    assert_eq!(meta["sshs_model_hash"].len(), 64);
    assert!(
        kohya
            .keys()
            .iter()
            .any(|k| k.starts_with("lora_te_text_model_encoder_layers_0_self_attn_q_proj"))
    );
    assert!(
        kohya
            .keys()
            .iter()
            .all(|k| k.starts_with("lora_unet_") || k.starts_with("lora_te_"))
    );
    // diffusers only infers its own text encoder spelling (scripts/check_lora_export.py).
    let dk = difftrain::io::safetensors::SafetensorsFile::open(
        &export.join("pytorch_lora_weights.safetensors"),
    )
    .unwrap();
    assert!(
        dk.keys()
            .iter()
            .any(|k| k.starts_with("text_encoder.text_model.")
                && k.ends_with(".lora_linear_layer.down.weight"))
    );

    // Sampling the run (its export: base + diffusers file) and the base with `--lora` (the
    // kohya file) give the same image.
    let sample = |name: &str, args: &[&str]| {
        let dir = tmp.path().join(name);
        let r = Command::new(env!("CARGO_BIN_EXE_sample"))
            .args(args)
            .args([
                "--prompt",
                "mountain",
                "--num",
                "1",
                "--steps",
                "3",
                "--guidance-scale",
                "7.5",
            ])
            .args([
                "--width",
                "32",
                "--height",
                "32",
                "--sampler",
                "ddim",
                "--out",
            ])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        image::open(dir.join("0000.png"))
            .unwrap()
            .to_rgb8()
            .into_raw()
    };
    let kohya_arg = format!("{}:1.0", export.join("mountain_test.safetensors").display());
    let from_base = sample(
        "base",
        &["--checkpoint", base.to_str().unwrap(), "--lora", &kohya_arg],
    );
    let from_run = sample("run", &["--checkpoint", a_out.to_str().unwrap()]);
    let plain = sample("plain", &["--checkpoint", base.to_str().unwrap()]);
    let diff = |a: &[u8], b: &[u8]| a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
    assert!(
        diff(&from_base, &from_run) <= 1,
        "{}",
        diff(&from_base, &from_run)
    );
    assert!(diff(&from_base, &plain) > 1, "--lora changed nothing");

    // Interrupted: killed after checkpoint-4, resumed to 12: bitwise identical.
    let b_out = tmp.path().join("b");
    let b = write(
        &lora_config(&base, &data, &b_out),
        &tmp.path().join("b.toml"),
    );
    let child = train(&b, &["--set", "train.max_steps=1000"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let killed_at = kill_after_checkpoint(child, &b_out, 4);
    assert!(killed_at < 12, "killed too late: {killed_at}");
    let (ok, err) = output(&mut train(&b, &["--resume", "latest"]));
    assert!(ok, "{err}");
    // (The optimizer file is a serialised map whose order may differ; its moments enter the
    // weights, which are compared.)
    for f in ["model.safetensors", "ema.safetensors"] {
        let same = std::fs::read(a_out.join("checkpoint-12").join(f)).unwrap()
            == std::fs::read(b_out.join("checkpoint-12").join(f)).unwrap();
        assert!(
            same,
            "{f} differs after SIGKILL + resume (killed at {killed_at})"
        );
    }

    // A changed adapter scale or shape is refused by name before anything is loaded (it used to
    // train silently with the new scale, or fail as "undecodable" and walk back through every
    // older checkpoint as if they were corrupt).
    for (set, key, why) in [
        ("lora.alpha=16.0", "lora.alpha: 8.0 -> 16.0", "scale"),
        ("lora.rank=8", "lora.rank: 4 -> 8", "shape"),
    ] {
        let (ok, err) = output(&mut train(
            &b,
            &[
                "--resume",
                "latest",
                "--set",
                "train.max_steps=16",
                "--set",
                set,
            ],
        ));
        assert!(
            !ok && err.contains(key) && err.contains(why),
            "{set}: {err}"
        );
        assert!(
            !err.contains("undecodable") && !err.contains("older"),
            "{set}: {err}"
        );
    }

    // A different base is refused, naming both hashes.
    let vae = base.join("vae/diffusion_pytorch_model.fp16.safetensors");
    let mut bytes = std::fs::read(&vae).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 1;
    std::fs::write(&vae, bytes).unwrap();
    let (ok, err) = output(&mut train(
        &b,
        &["--resume", "latest", "--set", "train.max_steps=16"],
    ));
    assert!(
        !ok && err.contains("base model has changed") && err.contains("hash"),
        "{err}"
    );
}

#[test]
fn lora_targets_that_match_nothing_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    mountain_dataset(&data);
    let mut c = lora_config(
        &fixtures().join("sd/tiny_sd"),
        &data,
        &tmp.path().join("out"),
    );
    c.lora.target_modules = Targets::Names(vec!["to_q".into(), "to_z".into()]);
    let (ok, err) = output(&mut train(&write(&c, &tmp.path().join("c.toml")), &[]));
    assert!(
        !ok && err.contains("[\"to_z\"] match no layer") && err.contains("to_out.0"),
        "{err}"
    );
    c.lora.target_modules = Targets::Regex(r".*\.attn3\.to_q".into());
    let (ok, err) = output(&mut train(&write(&c, &tmp.path().join("c.toml")), &[]));
    assert!(!ok && err.contains("matches no layer"), "{err}");
    // No base model at all: the error says what to download and where it goes.
    c.lora.target_modules = LoraConfig::default().target_modules;
    c.model.pretrained = Some(tmp.path().join("models/stable-diffusion-v1-5"));
    let (ok, err) = output(&mut train(&write(&c, &tmp.path().join("c.toml")), &[]));
    assert!(
        !ok && err.contains("stable-diffusion-v1-5") && err.contains("model_index.json"),
        "{err}"
    );
}

// ------------------------------------------------------------------------------- learning

const BASE_COLOURS: [(&str, [u8; 3]); 4] = [
    ("red", [210, 40, 40]),
    ("green", [40, 170, 60]),
    ("blue", [60, 110, 230]),
    ("grey", [100, 100, 110]),
];

/// The base model's data: 8x8 images, one colour over another ("red over green").
fn two_colour_dataset(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut meta = String::new();
    let mut i = 0;
    for (top, a) in BASE_COLOURS {
        for (bottom, b) in BASE_COLOURS {
            if top == bottom {
                continue;
            }
            for j in 0..4 {
                let split = 3 + j % 3;
                let img = image::RgbImage::from_fn(8, 8, |x, y| {
                    let c = if (y as usize) < split { a } else { b };
                    let n = ((i * 7 + x as usize * 3 + y as usize * 5) % 9) as i32 - 4;
                    image::Rgb(c.map(|v| (v as i32 + 3 * n).clamp(0, 255) as u8))
                });
                img.save(dir.join(format!("{i:03}.png"))).unwrap();
                meta.push_str(&format!(
                    "{{\"file_name\": \"{i:03}.png\", \"text\": \"{top} over {bottom}\"}}\n"
                ));
                i += 1;
            }
        }
    }
    std::fs::write(dir.join("metadata.jsonl"), meta).unwrap();
}

/// The LoRA's one image: sky, a grey peak, green ground, at 8x8.
fn mountain_8(dir: &Path) -> Vec<f32> {
    std::fs::create_dir_all(dir).unwrap();
    let img = image::RgbImage::from_fn(8, 8, |x, y| {
        let peak = (x as i32 - 4).abs() + 1;
        if y >= 6 {
            image::Rgb([40, 170, 60])
        } else if y as i32 >= peak {
            image::Rgb([100, 100, 110])
        } else {
            image::Rgb([150, 190, 240])
        }
    });
    img.save(dir.join("mountain.png")).unwrap();
    std::fs::write(
        dir.join("metadata.jsonl"),
        "{\"file_name\": \"mountain.png\", \"text\": \"mountain\"}\n",
    )
    .unwrap();
    img.into_raw().iter().map(|&v| v as f32).collect()
}

/// Mean absolute difference (0-255) between each generated image and `target` (HWC bytes).
fn distance(dir: &Path, target: &[f32]) -> f32 {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let d: Vec<f32> = files
        .iter()
        .map(|f| {
            let img = image::open(f).unwrap().to_rgb8().into_raw();
            img.iter()
                .zip(target)
                .map(|(a, b)| (*a as f32 - b).abs())
                .sum::<f32>()
                / target.len() as f32
        })
        .collect();
    d.iter().sum::<f32>() / d.len() as f32
}

/// The mountain_tiny recipe in miniature: a small text-to-image model of Stable Diffusion's
/// architecture is trained (stages 1 and 2) on two-colour images, then LoRA on one "mountain"
/// image must move the samples for "mountain" toward it.
#[test]
fn lora_moves_samples_toward_the_training_image() {
    use difftrain::models::autoencoder_kl::{
        AutoencoderKLConfig, VaeDownBlockType, VaeUpBlockType,
    };
    use difftrain::models::latent_diffusion::ConditioningKind;
    use difftrain::models::unet_2d_condition::{CondDownBlockType, CondUpBlockType, PerBlock};
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("base_data");
    two_colour_dataset(&data);
    // Stage 1.
    let mut v = Config::default();
    v.run.name = "vae".into();
    v.run.output_dir = Some(tmp.path().join("vae"));
    v.data.path = data.clone();
    v.data.resolution = 8;
    v.data.color = difftrain::data::ColorMode::Rgb;
    v.data.random_flip = false;
    v.model.architecture = Architecture::AutoencoderKl;
    v.model.autoencoder.vae = AutoencoderKLConfig {
        block_out_channels: vec![16, 16],
        down_block_types: vec![VaeDownBlockType::DownEncoderBlock2D; 2],
        up_block_types: vec![VaeUpBlockType::UpDecoderBlock2D; 2],
        layers_per_block: 1,
        latent_channels: 4,
        norm_num_groups: 8,
        sample_size: 8,
        mid_block_add_attention: false,
        ..AutoencoderKLConfig::default()
    };
    v.train.max_steps = 150;
    v.train.batch_size = 16;
    v.train.learning_rate = 3e-3;
    v.checkpoint.every_steps = 0;
    v.logging.log_every = 1000;
    let v_path = write(&v, &tmp.path().join("vae.toml"));
    // Stage 2: the base model.
    let mut b = v.clone();
    b.run.name = "base".into();
    b.run.output_dir = Some(tmp.path().join("base"));
    b.model.architecture = Architecture::LatentDiffusion;
    b.model.ldm.first_stage = tmp.path().join("vae");
    b.model.ldm.first_stage_config = Some(v_path);
    let u = b.model.ldm.backbone.as_unet_mut().unwrap();
    u.in_channels = 4;
    u.out_channels = 4;
    u.block_out_channels = vec![32, 32];
    u.down_block_types = vec![CondDownBlockType::CrossAttnDownBlock2D; 2];
    u.up_block_types = vec![CondUpBlockType::CrossAttnUpBlock2D; 2];
    u.layers_per_block = 1;
    u.norm_num_groups = 8;
    u.cross_attention_dim = 32;
    u.attention_head_dim = PerBlock::All(4);
    let cond = &mut b.model.conditioning;
    cond.kind = ConditioningKind::Text;
    cond.vocab_size = 540;
    cond.max_length = 6;
    cond.clip.hidden_size = 32;
    cond.clip.intermediate_size = 64;
    cond.clip.num_hidden_layers = 1;
    cond.clip.num_attention_heads = 2;
    b.diffusion.beta_schedule = difftrain::diffusion::schedule::BetaSchedule::SquaredcosCapV2;
    b.diffusion.prediction_type = difftrain::diffusion::schedule::PredictionType::VPrediction;
    b.train.max_steps = 200;
    b.train.batch_size = 16;
    b.train.learning_rate = 2e-3;
    b.sample.num_images = 2;
    b.sample.num_inference_steps = 5;
    let b_path = write(&b, &tmp.path().join("base.toml"));
    // The LoRA run trains the base first (model.pretrained_train_config), like mountain_tiny.
    let mountain = tmp.path().join("mountain");
    let target = mountain_8(&mountain);
    let mut l = lora_config(
        &tmp.path().join("base/export"),
        &mountain,
        &tmp.path().join("lora"),
    );
    l.model.pretrained_train_config = Some(b_path);
    l.data.resolution = 8;
    l.lora = LoraConfig {
        rank: 8,
        alpha: 8.0,
        ..LoraConfig::default()
    };
    l.model.conditioning.cond_drop_prob = 0.0;
    l.ema.enabled = false;
    l.train.batch_size = 1;
    l.train.max_steps = 200;
    l.checkpoint.every_steps = 0;
    l.logging.log_every = 1000;
    let l_path = write(&l, &tmp.path().join("lora.toml"));
    let (ok, err) = output(&mut train(&l_path, &[]));
    assert!(ok, "{err}");
    assert!(err.contains("training it from"), "{err}");
    let sample = |name: &str, checkpoint: &Path| {
        let dir = tmp.path().join(name);
        let r = Command::new(env!("CARGO_BIN_EXE_sample"))
            .arg("--checkpoint")
            .arg(checkpoint)
            .args([
                "--prompt",
                "mountain",
                "--num",
                "8",
                "--steps",
                "20",
                "--guidance-scale",
                "3",
            ])
            .args(["--sampler", "ddim", "--out"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        distance(&dir, &target)
    };
    let base = sample("from_base", &tmp.path().join("base/export"));
    let adapted = sample("from_lora", &tmp.path().join("lora"));
    eprintln!("mean |sample - mountain|: base {base:.1}, with the LoRA {adapted:.1}");
    assert!(
        adapted < 0.7 * base,
        "the LoRA did not move the samples: base {base:.1}, LoRA {adapted:.1}"
    );
}

/// LoRA under data parallelism: 2 worker threads equal 1 device (float summation order aside:
/// only the adapters cross ranks) and 2 processes (a torchrun-style launch) equal 2 threads
/// bitwise.
#[test]
fn lora_trains_data_parallel_on_threads_and_processes() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, base) = mountain_and_base(tmp.path());
    let run = |name: &str, devices: usize, processes: usize| -> PathBuf {
        let out = tmp.path().join(name);
        let mut c = lora_config(&base, &data, &out);
        c.train.max_steps = 4;
        c.sample.num_images = 1;
        if devices > 1 {
            c.run.devices = Some(difftrain::device::DeviceList::List(
                (0..devices).map(|i| format!("cpu:{i}")).collect(),
            ));
        }
        let path = write(&c, &tmp.path().join(format!("{name}.toml")));
        let outs = if processes == 1 {
            vec![train(&path, &[]).output().unwrap()]
        } else {
            common::finish(common::launch(&path, processes, &[], |_| Vec::new()))
        };
        for (rank, o) in outs.iter().enumerate() {
            assert!(
                o.status.success(),
                "{name} rank {rank}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        out
    };
    let weights =
        |out: &Path| load_safetensors(&out.join("checkpoint-4/model.safetensors")).unwrap();
    let diff = |a: &BTreeMap<String, HostTensor>, b: &BTreeMap<String, HostTensor>| {
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        a.iter()
            .flat_map(|(k, t)| t.data.iter().zip(&b[k].data).map(|(x, y)| (x - y).abs()))
            .fold(0.0f32, f32::max)
    };
    let one = weights(&run("one", 1, 1));
    let threads = weights(&run("threads", 2, 1));
    let procs = weights(&run("procs", 1, 2));
    let d = diff(&threads, &one);
    assert!(d < 1e-4, "2 threads vs 1 device: {d:e}");
    let d = diff(&procs, &threads);
    assert_eq!(d, 0.0, "2 processes vs 2 threads: {d:e}");
}

/// bf16 and fp16 LoRA runs (adapters on the U-Net and the text encoder, min-SNR weighting,
/// LoRA dropout) follow the f32 run: the frozen base, VAE and text encoder are held in half, the
/// adapters train in f32. Tolerance: each step's loss (same data and noise) within 5% of f32's.
#[test]
fn lora_trains_in_bf16_and_fp16_like_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, base) = mountain_and_base(tmp.path());
    let opts = difftrain::train::TrainOptions {
        write_outputs: true,
        quiet: true,
        overflow_at_step: None,
        overrides: Vec::new(),
    };
    let run = |p: MixedPrecision| {
        let mut c = lora_config(&base, &data, &tmp.path().join(format!("{p:?}")));
        c.train.mixed_precision = p;
        let s = difftrain::pipelines::train(&c, &opts).unwrap();
        // Grids through the half base with f32 adapters, and the LoRA files.
        assert!(s.sample_grid.as_ref().is_some_and(|g| g.is_file()), "{p:?}");
        let export = s.export_dir.clone().unwrap();
        assert!(
            export.join("pytorch_lora_weights.safetensors").is_file(),
            "{p:?}"
        );
        s
    };
    let reference = run(MixedPrecision::No);
    for p in [MixedPrecision::Bf16, MixedPrecision::Fp16] {
        let s = run(p);
        common::assert_losses_close(&format!("{p:?}"), &s.losses, &reference.losses, 0.05);
        assert_eq!(s.skipped_steps, 0, "{p:?}");
    }
}

/// `merge` writes a diffusers folder, or one original-layout file with exactly the keys and
/// shapes diffusers' own conversion gave the fixture's single file, which loads back to the same
/// merged weights.
#[test]
fn merge_writes_a_folder_or_an_original_layout_single_file() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixtures().join("sd/tiny_sd");
    let lora = format!(
        "{}:0.7",
        fixtures().join("lora/kohya_lora.safetensors").display()
    );
    let merge = |out: &Path| {
        let o = Command::new(env!("CARGO_BIN_EXE_merge"))
            .arg("--base")
            .arg(&base)
            .args(["--lora", &lora, "--out"])
            .arg(out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let folder = tmp.path().join("merged");
    let file = tmp.path().join("merged.safetensors");
    merge(&folder);
    merge(&file);

    // The keys and shapes of diffusers' conversion (scripts/gen_sd_reference.py), but
    // position_ids (a buffer, not a weight).
    let theirs = difftrain::io::safetensors::SafetensorsFile::open(
        &fixtures().join("sd/tiny_sd.safetensors"),
    )
    .unwrap();
    let ours = difftrain::io::safetensors::SafetensorsFile::open(&file).unwrap();
    let shapes = |f: &difftrain::io::safetensors::SafetensorsFile| -> BTreeMap<String, Vec<usize>> {
        f.keys()
            .into_iter()
            .filter(|k| !k.ends_with("position_ids"))
            .map(|k| {
                let s = f.shape(&k).unwrap();
                (k, s)
            })
            .collect()
    };
    let (a, b) = (shapes(&ours), shapes(&theirs));
    let only_ours: Vec<_> = a.keys().filter(|k| !b.contains_key(*k)).collect();
    let only_theirs: Vec<_> = b.keys().filter(|k| !a.contains_key(*k)).collect();
    assert!(
        only_ours.is_empty() && only_theirs.is_empty(),
        "ours only: {only_ours:?}\ntheirs only: {only_theirs:?}"
    );
    assert_eq!(a, b, "shapes differ");

    // Both load back to the same merged weights, which differ from the base.
    let device = Device::flex();
    let from_folder =
        stable_diffusion::load(&Pretrained::detect(&folder, None).unwrap(), &device).unwrap();
    let from_file =
        stable_diffusion::load(&Pretrained::detect(&file, Some(&base)).unwrap(), &device).unwrap();
    use difftrain::io::safetensors::named_tensors as named;
    for (x, y) in [
        (named(&from_folder.unet), named(&from_file.unet)),
        (named(&from_folder.vae), named(&from_file.vae)),
        (
            named(&from_folder.text_encoders[0].model),
            named(&from_file.text_encoders[0].model),
        ),
    ] {
        assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>());
        for (k, t) in &x {
            assert_eq!(t.data, y[k].data, "{k}");
        }
    }
    let base_unet = named(&tiny_sd(&device).unet);
    let merged_unet = named(&from_file.unet);
    assert!(
        base_unet.iter().any(|(k, t)| t.data != merged_unet[k].data),
        "the merge changed nothing"
    );
}
