//! f32 <-> f16/bf16 conversions of Flex tensors' values (parallel, vectorised), and Flex
//! tensors from a kernel's f32 results in the dtype of the input they answer for.

use burn::backend::flex::FlexTensor;
use burn::tensor::{DType, TensorData, bf16, f16};
use rayon::prelude::*;

/// Values this many at a time per thread when converting between f32 and half.
pub(crate) const CONVERT_CHUNK: usize = 1 << 14;

/// A Flex tensor's stored values of type `$h` (`f16` or `bf16`), contiguous: a borrowed
/// `Cow` when they already are. (A macro: `as_slice` wants `bytemuck::Pod`, which this crate
/// does not depend on.)
macro_rules! stored {
    ($t:expr, $h:ty) => {{
        let t: &FlexTensor = $t;
        match t.as_slice::<$h>() {
            Some(s) => std::borrow::Cow::Borrowed(s),
            None => std::borrow::Cow::Owned(
                t.to_contiguous()
                    .into_data()
                    .try_into_vec::<$h>()
                    .expect("a contiguous tensor of its own dtype"),
            ),
        }
    }};
}

/// `convert` applied chunk by chunk over `src` into a fresh vector, in parallel. `convert`
/// writes every element of its output chunk, so the vector is not zeroed first (the conversions
/// are memory-bound: a zeroing pass would cost as much).
pub(crate) fn convert_par<S: Sync, D: Send>(
    src: &[S],
    convert: impl Fn(&[S], &mut [std::mem::MaybeUninit<D>]) + Sync,
) -> Vec<D> {
    let mut out: Vec<D> = Vec::with_capacity(src.len());
    out.spare_capacity_mut()[..src.len()]
        .par_chunks_mut(CONVERT_CHUNK)
        .zip(src.par_chunks(CONVERT_CHUNK))
        .for_each(|(o, s)| convert(s, o));
    // SAFETY: the chunks above cover 0..src.len() and `convert` wrote every element of each.
    unsafe { out.set_len(src.len()) };
    out
}

/// A slice conversion of the `half` crate (f16, with F16C where the CPU has it) as a
/// [`convert_par`] chunk conversion: through a small stack buffer into the uninitialised output.
pub(crate) fn staged<S, D: Copy + Default>(
    convert: impl Fn(&[S], &mut [D]) + Sync,
) -> impl Fn(&[S], &mut [std::mem::MaybeUninit<D>]) + Sync {
    const STAGE: usize = 512;
    move |s, o| {
        let mut buf = [D::default(); STAGE];
        for (oc, sc) in o.chunks_mut(STAGE).zip(s.chunks(STAGE)) {
            let b = &mut buf[..sc.len()];
            convert(sc, b);
            for (slot, v) in oc.iter_mut().zip(b.iter()) {
                slot.write(*v);
            }
        }
    }
}

/// bf16 values as f32 (exact: a bf16 is the upper half of an f32; a signalling NaN comes out
/// quiet), `half::bf16::to_f32` bit for bit, vectorised for the CPU (the `half` crate's slice
/// conversion runs 4 values at a time).
pub(crate) fn widen_bf16(src: &[bf16], out: &mut [std::mem::MaybeUninit<f32>]) {
    multiversion!((src: &[bf16], out: &mut [std::mem::MaybeUninit<f32>]) => {
        for (o, s) in out.iter_mut().zip(src) {
            let h = s.to_bits() as u32;
            let quiet = if h & 0x7FFF > 0x7F80 { 0x40 } else { 0 };
            o.write(f32::from_bits((h | quiet) << 16));
        }
    })
}

/// f32 values rounded to bf16 to nearest even, NaN kept quiet: `half::bf16::from_f32` bit for
/// bit, vectorised for the CPU.
pub(crate) fn narrow_bf16(src: &[f32], out: &mut [std::mem::MaybeUninit<bf16>]) {
    multiversion!((src: &[f32], out: &mut [std::mem::MaybeUninit<bf16>]) => {
        for (o, s) in out.iter_mut().zip(src) {
            let x = s.to_bits();
            let bits = if x & 0x7FFF_FFFF > 0x7F80_0000 {
                (x >> 16) | 0x40
            } else {
                (x + 0x7FFF + ((x >> 16) & 1)) >> 16
            };
            o.write(bf16::from_bits(bits as u16));
        }
    })
}

/// The contiguous `f32` values of a Flex tensor: borrowed when it is f32, widened (in parallel)
/// when it is f16 or bf16, so the kernels compute half-precision calls in f32 while the autodiff
/// graph keeps the half tensors; `None` for other dtypes (those keep burn's path).
pub(crate) fn f32_values(t: &FlexTensor) -> Option<std::borrow::Cow<'_, [f32]>> {
    match t.dtype() {
        DType::F32 => match t.as_slice::<f32>() {
            Some(s) => Some(std::borrow::Cow::Borrowed(s)),
            // One copy into a fresh contiguous buffer, then moved out without another.
            None => t
                .to_contiguous()
                .into_data()
                .try_into_vec::<f32>()
                .ok()
                .map(std::borrow::Cow::Owned),
        },
        DType::F16 => {
            use half::slice::HalfFloatSliceExt;
            let convert = staged(|h: &[f16], o: &mut [f32]| h.convert_to_f32_slice(o));
            Some(std::borrow::Cow::Owned(convert_par(
                &stored!(t, f16),
                convert,
            )))
        }
        DType::BF16 => Some(std::borrow::Cow::Owned(convert_par(
            &stored!(t, bf16),
            widen_bf16,
        ))),
        _ => None,
    }
}

pub(crate) fn narrow_f16(values: &[f32]) -> Vec<f16> {
    use half::slice::HalfFloatSliceExt;
    convert_par(
        values,
        staged(|v: &[f32], h: &mut [f16]| h.convert_from_f32_slice(v)),
    )
}

pub(crate) fn flex_tensor(values: Vec<f32>, shape: &[usize]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape.to_vec()))
}

/// A kernel's f32 result as a Flex tensor of `dtype` (the dtype of the input it answers for),
/// rounded in parallel when that is half.
pub(crate) fn flex_tensor_in(values: Vec<f32>, shape: &[usize], dtype: DType) -> FlexTensor {
    let shape = shape.to_vec();
    match dtype {
        DType::F16 => FlexTensor::from_data(TensorData::new(narrow_f16(&values), shape)),
        DType::BF16 => {
            FlexTensor::from_data(TensorData::new(convert_par(&values, narrow_bf16), shape))
        }
        _ => FlexTensor::from_data(TensorData::new(values, shape)),
    }
}
