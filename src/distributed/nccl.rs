//! NCCL between processes (one CUDA device each): the unique id rank 0 mints at the rendezvous,
//! and the gradient all-reduce through cudarc's `Comm::from_rank`.
//!
//! burn 0.22.1 builds NCCL communicators only within one process (cubecl-cuda mints the id in a
//! private map) and does not expose a tensor's device buffer, so the buffer goes device -> host
//! -> NCCL buffer -> host -> device: two extra PCIe copies of the gradients per optimizer step,
//! counted in `scripts/cost_model.py`. Unverified on a GPU in this version (docs/distributed.md).

/// What NCCL (or its absence) said; cudarc's errors are only `Debug`, so they arrive as text.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct NcclError(pub String);

#[cfg(feature = "cuda")]
mod imp {
    use super::NcclError;
    use std::cell::RefCell;

    use cudarc::driver::CudaContext;
    use cudarc::nccl::{Comm, Id, ReduceOp};

    pub fn mint_id() -> Result<Vec<u8>, NcclError> {
        let id = Id::new().map_err(|e| {
            NcclError(format!(
                "rank 0 cannot create an NCCL unique id ({e:?}): is the NCCL library (libnccl.so.2) \
                 installed and on the library path?"
            ))
        })?;
        Ok(id.internal().iter().map(|&c| c as u8).collect())
    }

    thread_local! {
        // `Comm` is not `Send`: one communicator per rank thread, made at the first all-reduce.
        static COMM: RefCell<Option<Comm>> = const { RefCell::new(None) };
    }

    pub fn all_reduce_sum(
        ordinal: usize,
        rank: usize,
        world: usize,
        id: &[u8],
        data: &[f32],
    ) -> Result<Vec<f32>, NcclError> {
        let fail = |what: &str, e: &dyn std::fmt::Debug| {
            NcclError(format!(
                "NCCL {what} on cuda:{ordinal} (rank {rank} of {world}): {e:?}"
            ))
        };
        COMM.with(|cell| {
            let mut cell = cell.borrow_mut();
            if cell.is_none() {
                let ctx = CudaContext::new(ordinal).map_err(|e| fail("context", &e))?;
                let stream = ctx.new_stream().map_err(|e| fail("stream", &e))?;
                let mut internal = [0 as std::ffi::c_char; 128];
                if id.len() != internal.len() {
                    return Err(NcclError(format!(
                        "the NCCL id from rank 0 has {} bytes, not 128",
                        id.len()
                    )));
                }
                internal
                    .iter_mut()
                    .zip(id)
                    .for_each(|(c, &b)| *c = b as std::ffi::c_char);
                let comm = Comm::from_rank(stream, rank, world, Id::uninit(internal))
                    .map_err(|e| fail("communicator", &e))?;
                *cell = Some(comm);
            }
            let comm = cell.as_ref().expect("made above");
            let stream = comm.stream();
            let mut buf = stream.clone_htod(data).map_err(|e| fail("upload", &e))?;
            comm.all_reduce_in_place(&mut buf, &ReduceOp::Sum)
                .map_err(|e| fail("all-reduce", &e))?;
            stream.clone_dtoh(&buf).map_err(|e| fail("download", &e))
        })
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use super::NcclError;

    pub fn mint_id() -> Result<Vec<u8>, NcclError> {
        Err(NcclError(
            "a CUDA multi-process launch needs the `cuda` cargo feature".into(),
        ))
    }

    pub fn all_reduce_sum(
        _ordinal: usize,
        _rank: usize,
        _world: usize,
        _id: &[u8],
        _data: &[f32],
    ) -> Result<Vec<f32>, NcclError> {
        Err(NcclError("NCCL needs the `cuda` cargo feature".into()))
    }
}

pub use imp::{all_reduce_sum, mint_id};
