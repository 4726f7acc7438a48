//! The state of a run between optimizer steps, exactly what a checkpoint stores: fresh from
//! `run.seed`, rebuilt from a verified checkpoint (refusing config changes that break resume),
//! and written as one.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use burn::module::{Module, ParamId};
use burn::optim::AdamWConfig;
use burn::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::TrainError;
use super::objective::Objective;
use crate::checkpoint;
use crate::config::{Config, TrainConfig};
use crate::data::LoaderPosition;
use crate::io;
use crate::io::safetensors::SafetensorsFile;
use crate::optim::ema::Ema;
use crate::optim::grad;
use crate::optim::groups::ParamGroups;
use crate::optim::precision::{GradScaler, MixedPrecision, ScalerStep};
use burn::optim::GradientsParams;

/// What one optimizer step did.
pub struct Update {
    /// False when the step was skipped (non-finite, or an fp16 overflow).
    pub applied: bool,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// EMA's decay this step, when EMA is on and the step applied.
    pub ema_decay: Option<f64>,
}

/// The mutable state of a run between optimizer steps.
pub struct RunState<M> {
    pub model: M,
    pub optim: burn::optim::ModuleOptimizer,
    pub ema: Option<Ema<M>>,
    pub rng: ChaCha8Rng,
    pub step: usize,
    pub position: LoaderPosition,
    pub skipped: usize,
    pub last_loss: f64,
    /// The loss scaler of an fp16 run.
    pub scaler: Option<GradScaler>,
}

/// The loss scaler an fp16 run starts with (torch's `GradScaler()` defaults unless
/// `train.fp16_*` says otherwise); none otherwise.
fn fresh_scaler(cfg: &Config) -> Option<GradScaler> {
    let t = &cfg.train;
    (t.mixed_precision == MixedPrecision::Fp16).then(|| GradScaler {
        growth_interval: t.fp16_growth_interval,
        ..GradScaler::new(t.fp16_init_scale)
    })
}

/// AdamW with the config's hyperparameters (PyTorch's defaults unless set).
pub fn adamw(t: &TrainConfig) -> burn::optim::ModuleOptimizer {
    AdamWConfig::new()
        .with_beta_1(t.adam_beta1 as f32)
        .with_beta_2(t.adam_beta2 as f32)
        .with_epsilon(t.adam_epsilon as f32)
        .with_weight_decay(t.adam_weight_decay as f32)
        .init()
}

fn rng_state(rng: &ChaCha8Rng) -> checkpoint::RngState {
    checkpoint::RngState {
        seed: rng.get_seed().iter().map(|b| format!("{b:02x}")).collect(),
        stream: rng.get_stream(),
        word_pos: rng.get_word_pos().to_string(),
    }
}

fn restore_rng(s: &checkpoint::RngState) -> Option<ChaCha8Rng> {
    let mut seed = [0u8; 32];
    if s.seed.len() != 64 {
        return None;
    }
    for (i, b) in seed.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.seed.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    let mut rng = ChaCha8Rng::from_seed(seed);
    rng.set_stream(s.stream);
    rng.set_word_pos(s.word_pos.parse().ok()?);
    Some(rng)
}

impl<M: Module> RunState<M> {
    /// A fresh run: weights from `run.seed`, EMA shadow copied from them.
    pub fn fresh<O: Objective<Model = M>>(
        objective: &O,
        cfg: &Config,
        device: &Device,
    ) -> Result<Self, TrainError> {
        crate::nn::seed_init(cfg.run.seed);
        let model = io::safetensors::stable_param_ids(objective.build(device)?);
        let ema = cfg.ema.enabled.then(|| {
            let mut ema = Ema::new(model.valid(), cfg.ema.clone());
            ema.trainable = crate::optim::grad::trainable_ids(&model);
            ema
        });
        Ok(Self {
            model,
            optim: adamw(&cfg.train),
            ema,
            rng: ChaCha8Rng::seed_from_u64(cfg.run.seed),
            step: 0,
            position: LoaderPosition::default(),
            skipped: 0,
            last_loss: f64::NAN,
            scaler: fresh_scaler(cfg),
        })
    }

    /// The state a run starts from: fresh, or rebuilt from `start`'s checkpoint. A checkpoint
    /// that passed its checksums but does not decode is, with `checkpoint.resume = "latest"`,
    /// answered like any other corruption: the newest older one that does is used (and
    /// `start` updated to it), with a warning. Only the first replica of a process looks for
    /// one (`first_in_process`); the others then start from what it chose.
    // What choosing a start needs: the objective, config, checkpoint, folder, data size,
    // device and two flags; called from one place.
    #[allow(clippy::too_many_arguments)]
    pub fn start<O: Objective<Model = M>>(
        objective: &O,
        cfg: &Config,
        start: &mut checkpoint::Start,
        out: &Path,
        dataset_len: usize,
        device: &Device,
        first_in_process: bool,
        quiet: bool,
    ) -> Result<Self, TrainError> {
        let Some(ck) = &start.checkpoint else {
            return Self::fresh(objective, cfg, device);
        };
        let mut resumed = Self::resumed(objective, cfg, ck, dataset_len, device, quiet);
        while let Err(TrainError::Undecodable { dir, why }) = &resumed {
            if cfg.checkpoint.resume != crate::config::Resume::Latest || !first_in_process {
                break;
            }
            let step = checkpoint::parse_step_of(dir).unwrap_or(0);
            let older = checkpoint::list(out)
                .into_iter()
                .rev()
                .filter(|(s, _)| *s < step)
                .find_map(|(_, p)| checkpoint::read_verified(&p).ok());
            let Some(older) = older else { break };
            eprintln!(
                "warning: cannot resume from {}: {why}; resuming from the older {} (work after \
                 step {} is redone)",
                dir.display(),
                older.dir.display(),
                checkpoint::parse_step_of(&older.dir).unwrap_or(0)
            );
            resumed = Self::resumed(objective, cfg, &older, dataset_len, device, quiet);
            start.checkpoint = Some(older);
        }
        let st = resumed?;
        if !quiet {
            let ck = start
                .checkpoint
                .as_ref()
                .expect("resuming from a checkpoint");
            eprintln!(
                "resuming from {} (step {}, epoch {}, batch {} of the epoch)",
                ck.dir.display(),
                st.step,
                st.position.epoch,
                st.position.batch_in_epoch
            );
        }
        Ok(st)
    }

    /// Rebuilds the run state from a verified checkpoint, refusing config changes that break
    /// it.
    pub fn resumed<O: Objective<Model = M>>(
        objective: &O,
        cfg: &Config,
        ck: &checkpoint::Loaded,
        dataset_len: usize,
        device: &Device,
        quiet: bool,
    ) -> Result<Self, TrainError> {
        let dir = &ck.dir;
        let s = &ck.state;
        // Frozen networks first: a changed one also changes what is derived from it (a latent
        // scale in the config), and this names the cause.
        for (name, now) in objective.fingerprints() {
            if let Some(then) = s.fingerprints.get(&name)
                && *then != now
            {
                return Err(TrainError::Resume {
                    dir: dir.clone(),
                    why: format!(
                        "its {name} has changed since the checkpoint (hash {then} then, {now} now); \
                         resume with the same {name}, or start a new run in another \
                         run.output_dir"
                    ),
                });
            }
        }
        let (breaking, allowed) = checkpoint::compare_configs(&ck.config()?, cfg);
        if !breaking.is_empty() {
            return Err(TrainError::Resume {
                dir: dir.clone(),
                why: format!(
                    "the config changed in ways that break resume:\n  {}\n\
                     Undo these changes, or start a new run in another run.output_dir",
                    breaking.join("\n  ")
                ),
            });
        }
        if s.dataset_len != dataset_len {
            return Err(TrainError::Resume {
                dir: dir.clone(),
                why: format!(
                    "it was trained on {} images, the dataset now has {dataset_len}; the data \
                     order would differ",
                    s.dataset_len
                ),
            });
        }
        if !quiet {
            for line in &allowed {
                eprintln!("note: changed since the checkpoint: {line}");
            }
        }
        let mut state = Self::fresh(objective, cfg, device)?;
        let weights = |name: &str| -> Result<(SafetensorsFile<'_>, PathBuf), TrainError> {
            let path = dir.join(name);
            Ok((SafetensorsFile::from_bytes(ck.file(name)?, &path)?, path))
        };
        // From here on a failure is a checkpoint whose files pass their checksums but do not
        // decode: `Undecodable`, which `--resume latest` answers with an older checkpoint.
        let undecodable = |why: String| TrainError::Undecodable {
            dir: dir.clone(),
            why,
        };
        let only = objective.param_groups(&state.model).checkpointed();
        let (file, path) =
            weights(checkpoint::MODEL_FILE).map_err(|e| undecodable(crate::error::chain(&e)))?;
        state.model = io::safetensors::load_into_only(state.model, &file, &path, only.as_ref())
            .map_err(|e| undecodable(crate::error::chain(&e)))?;
        let optim_bytes =
            burn::tensor::Bytes::from_bytes_vec(ck.file(checkpoint::OPTIMIZER_FILE)?.to_vec());
        state.optim = state.optim.from_bytes(optim_bytes).map_err(|e| {
            undecodable(format!(
                "{} does not decode as the optimizer state of this model ({})",
                checkpoint::OPTIMIZER_FILE,
                format!("{e:?}").chars().take(200).collect::<String>()
            ))
        })?;
        if let Some(ema) = &mut state.ema {
            match (
                ck.files.contains_key(checkpoint::EMA_FILE),
                s.ema_optimization_step,
            ) {
                (true, Some(n)) => {
                    let (file, path) = weights(checkpoint::EMA_FILE)
                        .map_err(|e| undecodable(crate::error::chain(&e)))?;
                    ema.shadow = io::safetensors::load_into_only(
                        state.model.valid(),
                        &file,
                        &path,
                        only.as_ref(),
                    )
                    .map_err(|e| undecodable(crate::error::chain(&e)))?;
                    ema.optimization_step = n;
                }
                _ => {
                    ema.shadow = state.model.valid();
                    eprintln!(
                        "warning: {} has no EMA weights; EMA starts from the resumed weights",
                        dir.display()
                    );
                }
            }
        } else if s.ema_optimization_step.is_some() && !quiet {
            eprintln!("note: ema.enabled = false: the checkpoint's EMA weights are not used");
        }
        state.rng = restore_rng(&s.rng).ok_or_else(|| {
            undecodable(format!("{}: malformed rng state", checkpoint::STATE_FILE))
        })?;
        state.step = s.step;
        state.position = LoaderPosition {
            epoch: s.epoch,
            batch_in_epoch: s.batch_in_epoch,
        };
        state.skipped = s.skipped_steps;
        state.last_loss = s.last_loss;
        // An fp16 run continues with its scale; one that was not fp16 before starts afresh.
        // The interval is the config's (changing it on resume is allowed).
        state.scaler = fresh_scaler(cfg).map(|fresh| match s.grad_scaler {
            Some(saved) => GradScaler {
                growth_interval: fresh.growth_interval,
                ..saved
            },
            None => fresh,
        });
        Ok(state)
    }

    /// Writes `checkpoint-<step>/` from the state between steps, then rotates.
    pub fn save_checkpoint(
        &self,
        cfg: &Config,
        dataset_len: usize,
        lr_next: f64,
        fingerprints: Vec<(String, String)>,
        only: Option<&HashSet<ParamId>>,
        out: &Path,
    ) -> Result<PathBuf, TrainError> {
        let meta = io::layout::pt_metadata();
        let safetensors = |m: &M, name: &str| {
            let bytes = match only {
                None => io::safetensors::module_bytes(m, &meta),
                Some(ids) => {
                    io::safetensors::tensors_bytes(&io::safetensors::tensors_of(m, ids), &meta)
                }
            };
            bytes.map_err(|source| {
                TrainError::Io(io::IoError::Tensor {
                    path: out.join(name),
                    source,
                })
            })
        };
        let mut files = vec![(
            checkpoint::MODEL_FILE,
            safetensors(&self.model, checkpoint::MODEL_FILE)?,
        )];
        if let Some(ema) = &self.ema {
            files.push((
                checkpoint::EMA_FILE,
                safetensors(&ema.shadow, checkpoint::EMA_FILE)?,
            ));
        }
        let optim = self.optim.into_bytes().map_err(|e| TrainError::Resume {
            dir: out.to_path_buf(),
            why: format!("cannot serialise the optimizer state: {e:?}"),
        })?;
        files.push((checkpoint::OPTIMIZER_FILE, optim.to_vec()));
        files.push((checkpoint::CONFIG_FILE, cfg.to_toml().into_bytes()));
        let (crate_version, git_revision) = checkpoint::provenance();
        let mut state = checkpoint::TrainState {
            format_version: checkpoint::FORMAT_VERSION,
            step: self.step,
            epoch: self.position.epoch,
            batch_in_epoch: self.position.batch_in_epoch,
            data_seed: cfg.run.seed,
            dataset_len,
            rng: rng_state(&self.rng),
            ema_optimization_step: self.ema.as_ref().map(|e| e.optimization_step),
            skipped_steps: self.skipped,
            last_loss: self.last_loss,
            lr_schedule: format!("{:?}", cfg.train.lr_scheduler),
            lr_next,
            crate_version,
            git_revision,
            saved_unix_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            files: Default::default(),
            fingerprints: fingerprints.into_iter().collect(),
            grad_scaler: self.scaler,
        };
        let dir = checkpoint::write(out, &mut state, &files)?;
        checkpoint::rotate(out, cfg.checkpoint.keep_last, self.step)?;
        Ok(dir)
    }

    /// One optimizer step from the summed gradients: unscaled (fp16's loss scale, after the
    /// all-reduce and before clipping, as `GradScaler.unscale_` is used), clipped, checked
    /// (the fp16 scaler skips an overflow whatever `on_nonfinite` says; otherwise that
    /// policy), then the optimizer step by parameter group and the EMA. `step` is the 1-based
    /// step being taken.
    // One optimizer step's inputs (gradients, loss, rate, scale, groups, settings, step);
    // called from one place.
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        mut self,
        mut grads: GradientsParams,
        loss: f64,
        lr: f64,
        loss_scale: f64,
        groups: &ParamGroups,
        t: &TrainConfig,
        step: usize,
    ) -> Result<(Self, Update), TrainError> {
        if loss_scale != 1.0 {
            grad::scale_all(&self.model, &mut grads, 1.0 / loss_scale);
        }
        let grad_norm = grad::clip_global_norm(&self.model, &mut grads, t.max_grad_norm);
        let applied = match self.scaler.as_mut() {
            Some(scaler) => {
                let finite = loss.is_finite() && grad_norm.is_finite();
                scaler.update(finite) == ScalerStep::Apply
            }
            None => super::check_finite(step, loss, grad_norm, t.on_nonfinite)?,
        };
        let mut ema_decay = None;
        if applied {
            // Groups at their own rate step apart: steps of the one optimizer over disjoint
            // parameters (AdamW keeps its moments and step count per parameter), so this is
            // one step at several rates.
            let separate: Vec<_> = groups
                .separate_rates()
                .into_iter()
                .map(|(ids, factor)| (grad::take(&self.model, &mut grads, ids), factor))
                .collect();
            self.model = self.optim.step(lr, self.model, grads);
            for (group, factor) in separate {
                self.model = self.optim.step(lr * factor, self.model, group);
            }
            if let Some(ema) = &mut self.ema {
                ema_decay = Some(ema.step(&self.model.valid()));
            }
        } else {
            self.skipped += 1;
        }
        Ok((
            self,
            Update {
                applied,
                grad_norm,
                ema_decay,
            },
        ))
    }

    /// The weights sampling and export use: the EMA shadow when EMA is on.
    pub fn sampling_weights(&self) -> M {
        match &self.ema {
            Some(ema) => ema.shadow.clone(),
            None => self.model.valid(),
        }
    }
}
