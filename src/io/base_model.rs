//! Which family of pretrained model a pipeline is, and the facts each file format records about
//! it: kohya's `ss_base_model_version`, the Stability AI model spec's `modelspec.architecture`,
//! how many text encoders LoRA files name (`lora_te_` for one, `lora_te1_`/`lora_te2_` for
//! two), and whether an original-layout single file can hold its text encoder.
//!
//! The value is read once from a loaded pipeline's configs (`pipelines::stable_diffusion`); code
//! asks it instead of comparing widths or strings.

/// A pretrained model family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseModel {
    /// Stable Diffusion 1.x: CLIP ViT-L/14 text encoder (768 wide, `quick_gelu`), and every
    /// model of that layout (the latent diffusion quickstart's small export included).
    Sd1,
    /// Stable Diffusion 2.x: OpenCLIP ViT-H/14 text encoder (1024 wide, `gelu`).
    Sd2,
}

impl BaseModel {
    /// kohya's `ss_base_model_version`.
    pub fn kohya_version(self) -> &'static str {
        match self {
            Self::Sd1 => "sd_v1",
            Self::Sd2 => "sd_v2",
        }
    }

    /// kohya's `ss_v2`.
    pub fn is_v2(self) -> bool {
        self == Self::Sd2
    }

    /// `modelspec.architecture` of a LoRA for this base (kohya's `sai_model_spec`).
    pub fn modelspec_lora_architecture(self) -> &'static str {
        match self {
            Self::Sd1 => "stable-diffusion-v1/lora",
            Self::Sd2 => "stable-diffusion-v2-512/lora",
        }
    }

    /// Text encoders the pipeline conditions on.
    pub fn text_encoders(self) -> usize {
        match self {
            Self::Sd1 | Self::Sd2 => 1,
        }
    }

    /// Whether difftrain writes this model's text encoder in the original single-file layout
    /// (SD 1.x's `cond_stage_model.transformer.*`; SD 2.x's OpenCLIP layout with fused q/k/v is
    /// read but not written).
    pub fn writes_single_file(self) -> bool {
        self == Self::Sd1
    }

    /// A name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sd1 => "Stable Diffusion 1.x",
            Self::Sd2 => "Stable Diffusion 2.x",
        }
    }
}
