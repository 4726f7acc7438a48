//! Folding low-rank updates into weights, `W += scale · up · down`: a LoRA file's modules into a
//! model (`sample --lora`, `merge`, sampling a LoRA run), and collecting a trained model's
//! adapters for export. Which file key names which layer is `io::lora`'s business; this file
//! sees module paths only.

use std::collections::BTreeMap;

use burn::module::Param;
use burn::prelude::*;

use super::LoraError;
use super::targets::{Linears, linear_paths};
use crate::io::lora::{Component, LoraFile, LoraModule};
use crate::io::safetensors::HostTensor;
use crate::nn::{Linear, to_host};

/// The one fold: `weight += scale · up · down`, computed in f32 and added in the weight's dtype.
pub fn fold(layer: &mut Linear, up: &HostTensor, down: &HostTensor, scale: f64) {
    let device = layer.weight.val().device();
    let tensor = |t: &HostTensor| {
        Tensor::<2>::from_data(TensorData::new(t.data.clone(), t.shape.clone()), &device)
    };
    let w = layer.weight.val();
    let delta = tensor(up)
        .matmul(tensor(down))
        .mul_scalar(scale)
        .cast(w.dtype());
    layer.weight = Param::initialized(layer.weight.id, w + delta);
}

/// Folds every module of `file` into the model's `components` at `scale` (times each
/// module's own `alpha / rank`). Every module of the file must name a linear layer of the
/// matching component, with fitting shapes; otherwise nothing is reported as applied and the
/// error lists the first misfits. Returns the number of layers changed.
pub fn apply_file(
    file: &LoraFile,
    scale: f64,
    components: &mut [(Component, &mut dyn Linears)],
) -> Result<usize, LoraError> {
    let mut applied = 0;
    let mut problems = Vec::new();
    let mut overflow = None;
    for wanted in file.components() {
        let Some((_, model)) = components.iter_mut().find(|(c, _)| *c == wanted) else {
            let n = file.modules.keys().filter(|(c, _)| *c == wanted).count();
            problems.push(format!(
                "{} modules ({n}): this model has no {}",
                wanted.diffusers_prefix(),
                wanted.diffusers_prefix()
            ));
            continue;
        };
        let paths = linear_paths(&mut **model);
        let (modules, unmatched) = file.modules_by_path(wanted, &paths);
        model.linears("", &mut |p, l| {
            let Some(m) = modules.get(p) else {
                return;
            };
            let [out, inp] = l.weight.dims();
            if m.up.shape[0] != out || m.down.shape[1] != inp {
                problems.push(format!(
                    "{p}: LoRA up {:?} / down {:?} do not fit the layer's weight [{out}, {inp}]",
                    m.up.shape, m.down.shape
                ));
                return;
            }
            fold(l, &m.up, &m.down, scale * m.scale);
            // NaN/Inf anywhere makes the sum NaN (0 · x is 0 for every finite x).
            let check = l.weight.val().mul_scalar(0.0).sum().into_scalar::<f32>();
            if !check.is_finite() && overflow.is_none() {
                overflow = Some(p.to_string());
            }
            applied += 1;
        });
        for k in unmatched {
            problems.push(format!(
                "{} module {k} is not a linear layer of this model",
                wanted.diffusers_prefix()
            ));
        }
    }
    if let Some(layer) = overflow {
        return Err(LoraError::NotFinite {
            path: file.path.clone(),
            scale,
            layer,
        });
    }
    if !problems.is_empty() {
        problems.sort();
        return Err(LoraError::DoesNotFit {
            path: file.path.clone(),
            total: file.modules.len(),
            problems,
        });
    }
    Ok(applied)
}

/// Every adapter of the model's `components` by component and module path, on the host.
pub fn collect_adapters(
    components: &mut [(Component, &mut dyn Linears)],
) -> BTreeMap<(Component, String), LoraModule> {
    let mut out = BTreeMap::new();
    for (comp, model) in components.iter_mut() {
        model.linears("", &mut |p, l| {
            if let Some(a) = &l.lora {
                let host = |t: Tensor<2>| HostTensor {
                    shape: t.dims().to_vec(),
                    data: to_host(t),
                };
                out.insert(
                    (*comp, p.to_string()),
                    LoraModule {
                        down: host(a.down.weight.val()),
                        up: host(a.up.weight.val()),
                        scale: a.scale,
                    },
                );
            }
        });
    }
    out
}
