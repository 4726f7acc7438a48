//! Data parallelism: one replica of the model per device, each computing the gradient of its
//! slice of the global batch; the gradients are summed once per optimizer step and every replica
//! applies the same update.
//!
//! The trainer talks to one [`Replica`] per device: [`Replica::all_reduce_sum`],
//! [`Replica::barrier`], [`Replica::is_main`] and [`Replica::shard`]. Only this module knows
//! ranks. The collective engine is NCCL on CUDA (burn's `all_reduce`, which cubecl-cuda runs
//! through cudarc's NCCL bindings) and a host reduction over shared memory for CPU worker
//! threads (Flex has no collectives). Both sit behind the same host-side [`Group`], which gives
//! every rank a barrier with a timeout and turns one rank's failure into a clear error on the
//! others instead of a hang (NCCL itself would wait forever).
//!
//! Across processes (torchrun / SLURM launches, [`launch`]) a [`ProcessGroup`] plays the
//! [`Group`]'s part over TCP connections to rank 0 ([`process`]), and the gradients go through
//! NCCL between processes ([`nccl`]) on CUDA, or through those connections on the CPU.

pub mod launch;
pub mod nccl;
pub mod process;
mod sockets;
mod wire;

pub use launch::LaunchEnv;
pub use process::ProcessGroup;

use std::any::Any;
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use burn::prelude::*;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SyncError {
    #[error("data-parallel rank {rank} failed: {message}")]
    PeerFailed { rank: usize, message: String },
    #[error(
        "rank {waiting} waited {seconds:.0} s at {what} for {missing}; raise run.sync_timeout_secs \
         if that work legitimately takes longer"
    )]
    Timeout {
        waiting: usize,
        what: String,
        missing: String,
        seconds: f64,
    },
    #[error("the ranks are out of step (a bug): {0}")]
    OutOfStep(String),
}

impl SyncError {
    /// Whether this error only reports another rank's failure (so it is not the root cause).
    pub fn is_secondary(&self) -> bool {
        matches!(self, Self::PeerFailed { .. })
    }
}

/// What one rank was last seen doing, for timeout messages.
#[derive(Clone)]
struct Seen {
    what: String,
    since: Instant,
}

impl Seen {
    fn now(what: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            since: Instant::now(),
        }
    }

    /// `last seen <what>, <N> s ago`.
    fn describe(&self) -> String {
        format!(
            "last seen {}, {:.0} s ago",
            self.what,
            self.since.elapsed().as_secs_f64()
        )
    }
}

struct State {
    /// Collectives completed so far.
    generation: u64,
    /// Each rank's label and contribution to the collective in progress.
    arrived: Vec<Option<(String, Vec<f32>)>>,
    /// The sum of the last completed collective.
    result: Arc<Vec<f32>>,
    seen: Vec<Seen>,
    failed: Option<SyncError>,
}

/// The host-side meeting point of the ranks of one process.
pub struct Group {
    world: usize,
    timeout: Duration,
    state: Mutex<State>,
    changed: Condvar,
}

impl Group {
    pub fn new(world: usize, timeout: Duration) -> Arc<Self> {
        let now = Instant::now();
        Arc::new(Self {
            world,
            timeout,
            state: Mutex::new(State {
                generation: 0,
                arrived: vec![None; world],
                result: Arc::new(Vec::new()),
                seen: vec![
                    Seen {
                        what: "starting".into(),
                        since: now,
                    };
                    world
                ],
                failed: None,
            }),
            changed: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A rank that panicked while holding the lock left consistent data (every update is a
        // single assignment), so the others may go on and report it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records what `rank` is doing; a rank that times out waiting names it.
    pub fn doing(&self, rank: usize, what: &str) {
        self.lock().seen[rank] = Seen::now(what);
    }

    /// Marks the group failed: every rank waiting now or later gets `PeerFailed`.
    pub fn fail(&self, rank: usize, message: String) {
        let mut st = self.lock();
        if st.failed.is_none() {
            st.failed = Some(SyncError::PeerFailed { rank, message });
        }
        drop(st);
        self.changed.notify_all();
    }

    /// Sums `data` over all ranks, in rank order (so the result is deterministic), once every
    /// rank has arrived with the same `what`; an empty `data` is a barrier.
    pub fn all_reduce(
        &self,
        rank: usize,
        what: &str,
        data: Vec<f32>,
    ) -> Result<Arc<Vec<f32>>, SyncError> {
        let mut st = self.lock();
        if let Some(e) = &st.failed {
            return Err(e.clone());
        }
        let generation = st.generation;
        st.seen[rank] = Seen::now(format!("waiting at {what}"));
        st.arrived[rank] = Some((what.to_string(), data));
        if st.arrived.iter().all(Option::is_some) {
            let parts: Vec<(String, Vec<f32>)> =
                st.arrived.iter_mut().map(|a| a.take().unwrap()).collect();
            if let Some((r, (other, _))) = parts
                .iter()
                .enumerate()
                .find(|(_, p)| p.0 != what || p.1.len() != parts[0].1.len())
            {
                let e = SyncError::OutOfStep(format!(
                    "rank {rank} is at {what} ({} values), rank {r} at {other} ({} values)",
                    parts[rank].1.len(),
                    parts[r].1.len()
                ));
                st.failed = Some(e.clone());
                drop(st);
                self.changed.notify_all();
                return Err(e);
            }
            let mut sum = parts[0].1.clone();
            for (_, p) in &parts[1..] {
                sum.iter_mut().zip(p).for_each(|(s, v)| *s += v);
            }
            st.result = Arc::new(sum);
            st.generation += 1;
            let result = st.result.clone();
            drop(st);
            self.changed.notify_all();
            return Ok(result);
        }
        let deadline = Instant::now() + self.timeout;
        loop {
            if st.generation > generation {
                return Ok(st.result.clone());
            }
            if let Some(e) = &st.failed {
                return Err(e.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<String> = (0..self.world)
                    .filter(|&r| st.arrived[r].is_none())
                    .map(|r| format!("rank {r} ({})", st.seen[r].describe()))
                    .collect();
                let e = SyncError::Timeout {
                    waiting: rank,
                    what: what.to_string(),
                    missing: missing.join(", "),
                    seconds: self.timeout.as_secs_f64(),
                };
                st.failed = Some(e.clone());
                drop(st);
                self.changed.notify_all();
                return Err(e);
            }
            st = self
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// How a replica's gradients travel.
#[derive(Clone)]
enum Engine {
    /// Through the host meeting point: CPU worker threads (shared memory) or CPU processes
    /// (the connections to rank 0, a test engine).
    Host,
    /// NCCL through burn's `all_reduce` over these devices (all ranks' devices, in rank order).
    Nccl(Vec<Device>),
    /// NCCL between processes, through the host (`nccl`): this process's CUDA ordinal.
    NcclProcess(usize),
}

/// Where the ranks meet on the host: threads of this process, or processes.
#[derive(Clone)]
enum Meet {
    Threads(Arc<Group>),
    Processes(Arc<ProcessGroup>),
}

impl Meet {
    fn all_reduce(&self, rank: usize, what: &str, data: Vec<f32>) -> Result<Vec<f32>, SyncError> {
        match self {
            Meet::Threads(g) => g.all_reduce(rank, what, data).map(|s| s.to_vec()),
            Meet::Processes(p) => p.all_reduce(what, data),
        }
    }
}

/// One rank's handle on the data-parallel group; the only thing the trainer sees of it.
pub struct Replica {
    rank: usize,
    world: usize,
    group: Option<Meet>,
    engine: Engine,
    /// Gradient all-reduces this rank has taken part in.
    all_reduces: usize,
}

impl Replica {
    /// The only replica of a single-device run.
    pub fn single() -> Self {
        Self {
            rank: 0,
            world: 1,
            group: None,
            engine: Engine::Host,
            all_reduces: 0,
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world
    }

    /// Rank 0: the one that writes logs, samples, checkpoints and the export.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// The first rank in this process: every rank of a multi-process launch, rank 0 among
    /// in-process worker threads (which share the process's allocator).
    pub fn first_in_process(&self) -> bool {
        matches!(self.group, Some(Meet::Processes(_))) || self.rank == 0
    }

    pub fn all_reduces(&self) -> usize {
        self.all_reduces
    }

    /// This rank's slots of a global batch of `global` samples: a contiguous, disjoint range;
    /// together the ranks cover the batch exactly.
    pub fn shard(&self, global: usize) -> Range<usize> {
        let per = global / self.world;
        self.rank * per..(self.rank + 1) * per
    }

    /// The replica of this process in a multi-process launch: NCCL between the processes when
    /// it trains on CUDA device `cuda_ordinal`, the connections to rank 0 on the CPU.
    pub fn process(group: Arc<ProcessGroup>, cuda_ordinal: Option<usize>) -> Self {
        let engine = match cuda_ordinal {
            Some(ordinal) => Engine::NcclProcess(ordinal),
            None => Engine::Host,
        };
        Self {
            rank: group.rank(),
            world: group.world(),
            group: Some(Meet::Processes(group)),
            engine,
            all_reduces: 0,
        }
    }

    /// Says what this rank is about to do (shown by a rank that times out waiting for it).
    pub fn doing(&self, what: &str) {
        match &self.group {
            Some(Meet::Threads(g)) => g.doing(self.rank, what),
            Some(Meet::Processes(p)) => p.doing(what),
            None => {}
        }
    }

    /// Sums `flat` over the ranks; every rank gets the sum.
    pub fn all_reduce_sum(&mut self, flat: Tensor<1>, what: &str) -> Result<Tensor<1>, SyncError> {
        self.all_reduces += 1;
        let Some(group) = &self.group else {
            return Ok(flat);
        };
        match &self.engine {
            Engine::Host => {
                let (device, n) = (flat.device(), flat.dims()[0]);
                let sum = group.all_reduce(self.rank, what, host_values(flat))?;
                Ok(Tensor::from_data(TensorData::new(sum, [n]), &device))
            }
            Engine::NcclProcess(ordinal) => {
                let ordinal = *ordinal;
                self.barrier(what)?;
                let (device, n) = (flat.device(), flat.dims()[0]);
                let data = host_values(flat);
                let Some(Meet::Processes(p)) = &self.group else {
                    unreachable!("NCCL between processes has a process group")
                };
                let sum = nccl::all_reduce_sum(ordinal, self.rank, self.world, p.nccl_id(), &data)
                    .map_err(|e| {
                        let message = e.0;
                        p.fail(&message);
                        SyncError::PeerFailed {
                            rank: self.rank,
                            message,
                        }
                    })?;
                Ok(Tensor::from_data(TensorData::new(sum, [n]), &device))
            }
            Engine::Nccl(devices) => {
                // Meet on the host first: NCCL has no timeout and would wait forever for a
                // rank that died, so every rank arrives here before any enters the collective.
                self.barrier(what)?;
                Ok(burn::tensor::distributed::all_reduce(
                    flat,
                    burn::tensor::distributed::ReduceOperation::Sum,
                    devices.clone(),
                )
                .resolve())
            }
        }
    }

    /// Waits until every rank reaches the barrier named `what` (or fails after the timeout).
    pub fn barrier(&self, what: &str) -> Result<(), SyncError> {
        match &self.group {
            Some(g) => g.all_reduce(self.rank, what, Vec::new()).map(|_| ()),
            None => Ok(()),
        }
    }
}

/// A flat buffer's values on the host, as f32.
fn host_values(flat: Tensor<1>) -> Vec<f32> {
    flat.into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32 after convert")
}

/// Runs `work` once per device, with that rank's input, on its own thread (NCCL between them
/// when `nccl`, else the host), rank = position in `devices`, and returns
/// every rank's result in rank order. A rank that returns an error or panics fails the group,
/// so the others stop at their next collective or barrier with [`SyncError::PeerFailed`].
pub fn run_ranks<I: Send, T: Send, E: Send + std::error::Error + 'static>(
    devices: &[Device],
    nccl: bool,
    timeout: Duration,
    inputs: Vec<I>,
    work: impl Fn(Replica, &Device, I) -> Result<T, E> + Sync,
) -> Vec<Result<T, RankFailure<E>>> {
    assert_eq!(inputs.len(), devices.len(), "one input per rank");
    let world = devices.len();
    let group = Group::new(world, timeout);
    let engine = if nccl {
        Engine::Nccl(devices.to_vec())
    } else {
        Engine::Host
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = devices
            .iter()
            .zip(inputs)
            .enumerate()
            .map(|(rank, (device, input))| {
                let replica = Replica {
                    rank,
                    world,
                    group: Some(Meet::Threads(group.clone())),
                    engine: engine.clone(),
                    all_reduces: 0,
                };
                let (group, work) = (group.clone(), &work);
                std::thread::Builder::new()
                    .name(format!("difftrain-rank-{rank}"))
                    .spawn_scoped(s, move || {
                        let outcome =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                work(replica, device, input)
                            }));
                        match outcome {
                            Ok(Ok(v)) => Ok(v),
                            Ok(Err(e)) => {
                                group.fail(rank, crate::error::chain(&e));
                                Err(RankFailure::Error(e))
                            }
                            Err(payload) => {
                                let message = panic_message(payload.as_ref());
                                group.fail(rank, format!("panicked: {message}"));
                                Err(RankFailure::Panic(message))
                            }
                        }
                    })
                    .expect("cannot spawn a rank thread")
            })
            .collect();
        crate::threads::help_pool_until(|| handles.iter().all(|h| h.is_finished()));
        handles
            .into_iter()
            .map(|h| h.join().expect("rank threads catch their panics"))
            .collect()
    })
}

/// Why a rank ended without a result.
#[derive(Debug)]
pub enum RankFailure<E> {
    Error(E),
    Panic(String),
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_reduce_sums_in_rank_order_every_round() {
        let group = Group::new(3, Duration::from_secs(10));
        let results: Vec<Vec<Vec<f32>>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|rank| {
                    let group = group.clone();
                    s.spawn(move || {
                        (0..50)
                            .map(|round| {
                                let data = vec![rank as f32 + round as f32, 1.0];
                                group
                                    .all_reduce(rank, &format!("round {round}"), data)
                                    .unwrap()
                                    .to_vec()
                            })
                            .collect()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for per_rank in &results {
            for (round, sum) in per_rank.iter().enumerate() {
                assert_eq!(sum, &vec![3.0 + 3.0 * round as f32, 3.0]);
            }
        }
    }

    #[test]
    fn a_missing_rank_times_out_with_its_name_and_last_activity() {
        let group = Group::new(2, Duration::from_millis(300));
        group.doing(1, "writing checkpoint-40");
        let started = Instant::now();
        let err = group
            .all_reduce(0, "all-reduce of step 41", vec![1.0])
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        let text = err.to_string();
        assert!(
            text.contains("rank 0 waited 0 s at all-reduce of step 41"),
            "{text}"
        );
        assert!(
            text.contains("rank 1 (last seen writing checkpoint-40"),
            "{text}"
        );
        // The late rank learns of it instead of waiting in turn.
        assert!(matches!(
            group.all_reduce(1, "all-reduce of step 41", vec![1.0]),
            Err(SyncError::Timeout { .. })
        ));
    }

    #[test]
    fn a_failed_rank_releases_the_waiting_ones() {
        let group = Group::new(3, Duration::from_secs(30));
        let started = Instant::now();
        let errors: Vec<SyncError> = std::thread::scope(|s| {
            let waiting: Vec<_> = (0..2)
                .map(|rank| {
                    let group = group.clone();
                    s.spawn(move || group.all_reduce(rank, "barrier", Vec::new()).unwrap_err())
                })
                .collect();
            std::thread::sleep(Duration::from_millis(50));
            group.fail(2, "cannot decode images/7.png".into());
            waiting.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(started.elapsed() < Duration::from_secs(5));
        for e in errors {
            assert_eq!(
                e.to_string(),
                "data-parallel rank 2 failed: cannot decode images/7.png"
            );
            assert!(e.is_secondary());
        }
    }

    #[test]
    fn ranks_at_different_collectives_are_reported() {
        let group = Group::new(2, Duration::from_secs(10));
        let errs: Vec<SyncError> = std::thread::scope(|s| {
            let a = {
                let g = group.clone();
                s.spawn(move || {
                    g.all_reduce(0, "all-reduce of step 3", vec![0.0; 4])
                        .unwrap_err()
                })
            };
            let b = {
                let g = group.clone();
                s.spawn(move || {
                    g.all_reduce(1, "barrier after checkpoint-2", Vec::new())
                        .unwrap_err()
                })
            };
            vec![a.join().unwrap(), b.join().unwrap()]
        });
        assert!(
            errs.iter().all(|e| matches!(e, SyncError::OutOfStep(_))),
            "{errs:?}"
        );
    }

    #[test]
    fn shards_are_disjoint_and_cover_the_batch() {
        for world in [1, 2, 4] {
            let mut slots = Vec::new();
            for rank in 0..world {
                let r = Replica {
                    rank,
                    world,
                    group: None,
                    engine: Engine::Host,
                    all_reduces: 0,
                };
                slots.extend(r.shard(8));
            }
            assert_eq!(slots, (0..8).collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_panicking_rank_fails_the_run_with_its_message() {
        let devices = vec![Device::flex(); 2];
        let results = run_ranks(
            &devices,
            false,
            Duration::from_secs(30),
            vec![(); 2],
            |replica, _, ()| -> Result<(), SyncError> {
                if replica.rank() == 1 {
                    panic!("out of memory");
                }
                replica.barrier("the end")
            },
        );
        match &results[0] {
            Err(RankFailure::Error(e)) => {
                assert_eq!(
                    e.to_string(),
                    "data-parallel rank 1 failed: panicked: out of memory"
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(&results[1], Err(RankFailure::Panic(m)) if m == "out of memory"));
    }
}
