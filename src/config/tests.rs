//! Parsing, overrides, cross-field problems and the older spellings of configs.

use super::*;

fn parse(text: &str, overrides: &[&str]) -> Result<Config, ConfigError> {
    let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    Config::parse(Path::new("test.toml"), text, &o)
}

#[test]
fn typo_names_line_column_and_accepted_keys() {
    let err = parse("[train]\nmax_steps = 3\nlerning_rate = 1e-3\n", &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("test.toml"), "{err}");
    assert!(err.contains("line 3, column 1"), "{err}");
    assert!(
        err.contains("lerning_rate") && err.contains("learning_rate"),
        "{err}"
    );
}

#[test]
fn wrong_variant_lists_accepted_ones() {
    let err = parse("[diffusion]\nbeta_schedule = \"cosine\"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("squaredcos_cap_v2") && err.contains("line 2"),
        "{err}"
    );
}

#[test]
fn overrides_are_typed_and_validated() {
    let c = parse(
        "[train]\nmax_steps = 3\n",
        &["train.max_steps=7", "run.device=cuda:1"],
    )
    .unwrap();
    assert_eq!(c.train.max_steps, 7);
    assert_eq!(
        DeviceSpec::parse(&c.run.device).ok(),
        Some(DeviceSpec::Cuda(1))
    );
    let err = parse("", &["train.max_step=7"]).unwrap_err().to_string();
    assert!(
        err.contains("--set train.max_step=7") && err.contains("max_steps"),
        "{err}"
    );
    let err = parse("", &["train.max_steps=many"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("--set train.max_steps=many"), "{err}");
}

#[test]
fn cross_field_problems_are_reported_together() {
    let mut c = Config::default();
    c.data.resolution = 30;
    c.train.batch_size = 0;
    c.run.device = "tpu".into();
    let p = c.problems();
    assert!(p.iter().any(|m| m.contains("sample_size")), "{p:?}");
    assert!(p.iter().any(|m| m.contains("batch_size")), "{p:?}");
    assert!(p.iter().any(|m| m.contains("run.device")), "{p:?}");
}

#[test]
fn the_older_unet_section_reads_as_the_backbone_and_both_are_refused() {
    let old = "[model]\narchitecture = \"latent_diffusion\"\n[model.ldm.unet]\n\
               block_out_channels = [32, 64]\ncross_attention_dim = 48\n";
    let new = "[model]\narchitecture = \"latent_diffusion\"\n[model.ldm.backbone]\n\
               type = \"unet_2d_condition\"\nblock_out_channels = [32, 64]\n\
               cross_attention_dim = 48\n";
    let (a, b) = (parse(old, &[]).unwrap(), parse(new, &[]).unwrap());
    assert_eq!(a, b);
    let unet = a.model.ldm.backbone.as_unet().unwrap();
    assert_eq!(
        (unet.cross_attention_dim, unet.block_out_channels.len()),
        (48, 2)
    );
    // Written back in the new spelling only.
    let text = a.to_toml();
    assert!(text.contains("[model.ldm.backbone]") && !text.contains("[model.ldm.unet]"));
    // An override in the old spelling on a new file names the new one.
    let err = crate::error::chain(&parse(new, &["model.ldm.unet.sample_size=16"]).unwrap_err());
    assert!(
        err.contains("[model.ldm.backbone]") && err.contains("unet_2d_condition"),
        "{err}"
    );
    let err = parse("[model.ldm.backbone]\ntype = \"dit\"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("unet_2d_condition"), "{err}");
}

#[test]
fn resolved_config_round_trips() {
    let c = Config::default();
    let back: Config = toml::from_str(&c.to_toml()).unwrap();
    assert_eq!(back, c);
}
