//! Data parallelism across processes: the connections between the processes of one launch.
//!
//! Rank 0 listens on `MASTER_ADDR:MASTER_PORT`; every other process connects to it once, at
//! start-up (the rendezvous, [`ProcessGroup::rendezvous`]), and keeps that connection for the
//! whole run, every training stage of it included. The topology is a star: each collective is
//! each rank sending its contribution to rank 0, and rank 0 answering with the sum (summed in rank
//! order, so the result is bitwise what the in-process [`super::Group`] computes). Barriers,
//! failures ("rank R failed: ...") and what rank 0 is doing (for timeout messages) travel over
//! the same connections. A reader thread per connection turns every message, and the connection
//! closing, into an event, so a process that dies is noticed at the next collective, not after
//! a timeout.
//!
//! On CUDA only barriers cross these connections; the gradients go through NCCL
//! (`super::nccl`). On the CPU the gradients themselves travel here: a test engine (loopback
//! only) that exercises the whole multi-process path in CI.

use std::io::{BufReader, BufWriter, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::sockets::{FIRST_ANSWER, accept_until, connect_until, listen, refuse_latecomers};
use super::wire::{Msg, decode, encode, send};
use super::{Seen, SyncError};

/// What a reader thread reports about one peer.
enum Event {
    Msg(Msg),
    /// The connection ended: the peer exited (or was killed), or the network failed.
    Closed(String),
}

/// The reader thread of the connection to `peer`: every message becomes an event.
fn spawn_reader(peer: usize, stream: TcpStream, events: Sender<(usize, Event)>) {
    std::thread::Builder::new()
        .name(format!("difftrain-link-{peer}"))
        .spawn(move || {
            let mut r = BufReader::with_capacity(1 << 20, stream);
            loop {
                match decode(&mut r) {
                    Ok(m) => {
                        if events.send((peer, Event::Msg(m))).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let why =
                            why_closed(&e).unwrap_or_else(|| format!("its connection failed: {e}"));
                        let _ = events.send((peer, Event::Closed(why)));
                        return;
                    }
                }
            }
        })
        .expect("cannot spawn a connection reader thread");
}

/// Why a connection ended, from the error its read or write gave. A killed process's socket
/// reads as an end of file, or as a reset when data it had not read was still queued for it; a
/// write to it fails with a broken pipe or a reset. All of these mean the process is gone.
fn why_closed(e: &std::io::Error) -> Option<String> {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    let gone = "its connection closed: the process exited or was killed";
    match e.kind() {
        UnexpectedEof => Some(gone.to_string()),
        ConnectionReset | ConnectionAborted | BrokenPipe => Some(format!("{gone} ({e})")),
        _ => None,
    }
}

struct Inner {
    /// Writers to the peers this process talks to: every other rank on rank 0, rank 0 elsewhere.
    links: Vec<Option<BufWriter<TcpStream>>>,
    events: Receiver<(usize, Event)>,
    seen: Vec<Seen>,
    failed: Option<SyncError>,
}

/// This process's place in a multi-process launch, and its connections.
pub struct ProcessGroup {
    rank: usize,
    world: usize,
    timeout: Duration,
    nccl_id: Vec<u8>,
    inner: Mutex<Inner>,
    /// Rank 0: set when the group ends, to stop the thread refusing late joiners.
    closed: Arc<AtomicBool>,
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Relaxed);
    }
}

/// Who this process is and where rank 0 listens.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendezvous {
    pub rank: usize,
    pub world: usize,
    /// `host:port` of rank 0.
    pub master: String,
    /// How long to wait for the others, here and at every collective.
    pub timeout: Duration,
}

/// Why the processes of a launch did not meet.
#[derive(Debug, thiserror::Error)]
pub enum RendezvousError {
    #[error("rank 0 cannot listen on {bind} (MASTER_ADDR/MASTER_PORT {master})")]
    Listen {
        bind: SocketAddr,
        master: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot resolve MASTER_ADDR:MASTER_PORT = {master}")]
    Resolve {
        master: String,
        #[source]
        source: std::io::Error,
    },
    #[error("MASTER_ADDR:MASTER_PORT = {0} resolves to no address")]
    NoAddress(String),
    #[error(
        "rank 0 waited {seconds:.0} s at {master} for the other {others} process(es) to join; \
         joined so far: [{joined}]. Start every rank with the same MASTER_ADDR, MASTER_PORT and \
         WORLD_SIZE, or raise run.sync_timeout_secs"
    )]
    JoinTimeout {
        seconds: f64,
        master: String,
        others: usize,
        joined: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "rank {rank} reached {master}, but what listens there is not a difftrain rank 0 ({why}); \
         another program may hold MASTER_PORT: pick a free port for every rank"
    )]
    Foreign {
        rank: usize,
        master: String,
        why: String,
    },
    #[error(
        "rank {rank} could not reach rank 0 at {master} within {seconds:.0} s; is rank 0 \
         running, and MASTER_ADDR/MASTER_PORT the same everywhere?"
    )]
    Unreachable {
        rank: usize,
        master: String,
        seconds: f64,
        #[source]
        source: std::io::Error,
    },
    /// Rank 0 refused the launch (or this is rank 0 refusing it), with every reason.
    #[error("{0}")]
    Refused(String),
    #[error("rank {rank} {what} at the rendezvous")]
    Connection {
        rank: usize,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("rank 0 answered {0} at the rendezvous")]
    Unexpected(String),
    #[error(transparent)]
    Nccl(#[from] super::nccl::NcclError),
}

impl ProcessGroup {
    /// Meets the other processes: rank 0 accepts `world - 1` connections and checks that every
    /// process runs the same version on the same resolved `config` (refusing the launch by
    /// rank and key otherwise), then sends each the NCCL id `mint_nccl_id` gives (CUDA runs).
    pub fn rendezvous(
        rv: &Rendezvous,
        config: &str,
        mint_nccl_id: impl FnOnce() -> Result<Vec<u8>, super::nccl::NcclError>,
    ) -> Result<Arc<Self>, RendezvousError> {
        let conn = |rank: usize, what: &'static str| {
            move |source: std::io::Error| RendezvousError::Connection { rank, what, source }
        };
        let deadline = Instant::now() + rv.timeout;
        let (tx, rx) = channel();
        let mut links: Vec<Option<BufWriter<TcpStream>>> = (0..rv.world).map(|_| None).collect();
        let version = env!("CARGO_PKG_VERSION").to_string();
        let closed = Arc::new(AtomicBool::new(false));
        let nccl_id = if rv.rank == 0 {
            let listener = listen(&rv.master)?;
            let mut hellos: Vec<(usize, String, String, BufReader<TcpStream>)> = Vec::new();
            let mut problems = Vec::new();
            let started = Instant::now();
            while hellos.len() + problems.len() < rv.world - 1 {
                let joined_now: Vec<usize> = hellos.iter().map(|h| h.0).collect();
                let waiting = || {
                    eprintln!(
                        "rank 0: waiting at {} for {} more process(es) to join (joined: [{}]; \
                         {:.0} s of run.sync_timeout_secs = {:.0})",
                        rv.master,
                        rv.world - 1 - joined_now.len(),
                        joined_now
                            .iter()
                            .map(|r| r.to_string())
                            .collect::<Vec<_>>()
                            .join(", "),
                        started.elapsed().as_secs_f64(),
                        rv.timeout.as_secs_f64()
                    )
                };
                let stream = accept_until(&listener, deadline, &waiting).map_err(|source| {
                    let joined: Vec<String> = hellos.iter().map(|h| h.0.to_string()).collect();
                    RendezvousError::JoinTimeout {
                        seconds: rv.timeout.as_secs_f64(),
                        master: rv.master.clone(),
                        others: rv.world - 1,
                        joined: joined.join(", "),
                        source,
                    }
                })?;
                let mut reader = BufReader::new(
                    stream
                        .try_clone()
                        .map_err(conn(0, "could not keep a link"))?,
                );
                stream
                    .set_read_timeout(Some(rv.timeout))
                    .map_err(conn(0, "could not set a timeout"))?;
                match decode(&mut reader) {
                    Ok(Msg::Hello {
                        rank,
                        world,
                        version: v,
                        config: c,
                    }) => {
                        let rank = rank as usize;
                        if world as usize != rv.world {
                            problems.push(format!(
                                "rank {rank} has WORLD_SIZE={world}, rank 0 has {}",
                                rv.world
                            ));
                        } else if rank == 0 || rank >= rv.world {
                            problems.push(format!(
                                "a process joined with RANK={rank}; expected 1..{}",
                                rv.world - 1
                            ));
                        } else if links[rank].is_some() {
                            problems.push(format!("two processes joined with RANK={rank}"));
                        }
                        let ok = problems.is_empty() || rank < rv.world && links[rank].is_none();
                        if ok && rank > 0 && rank < rv.world {
                            // Said at once, so the process knows it reached a difftrain rank 0.
                            let mut w = BufWriter::new(stream);
                            send(
                                &mut w,
                                &Msg::Doing {
                                    what: "waiting for the others to join".into(),
                                },
                            )
                            .map_err(conn(0, "could not answer a process"))?;
                            links[rank] = Some(w);
                            hellos.push((rank, v, c, reader));
                        } else {
                            let mut w = BufWriter::new(stream);
                            let _ = send(
                                &mut w,
                                &Msg::Refuse {
                                    message: problems.last().cloned().unwrap_or_default(),
                                },
                            );
                        }
                    }
                    Ok(other) => {
                        problems.push(format!("a process sent {other:?} instead of a greeting"))
                    }
                    Err(e) => problems.push(format!(
                        "a connection to rank 0 failed before greeting: {e}"
                    )),
                }
            }
            for (rank, v, c, _) in &hellos {
                if *v != version {
                    problems.push(format!(
                        "rank {rank} runs difftrain {v}, rank 0 runs {version}"
                    ));
                } else if *c != config {
                    problems.push(format!(
                        "rank {rank}'s resolved config differs from rank 0's: {}",
                        config_diff(config, c)
                    ));
                }
            }
            if !problems.is_empty() {
                let message = format!(
                    "launch refused at the rendezvous: {}. Start every process with the same \
                     binary, config and --set options",
                    problems.join("; ")
                );
                for w in links.iter_mut().flatten() {
                    let _ = send(
                        w,
                        &Msg::Refuse {
                            message: message.clone(),
                        },
                    );
                }
                return Err(RendezvousError::Refused(message));
            }
            let id = match mint_nccl_id() {
                Ok(id) => id,
                Err(e) => {
                    for w in links.iter_mut().flatten() {
                        let _ = send(
                            w,
                            &Msg::Refuse {
                                message: e.to_string(),
                            },
                        );
                    }
                    return Err(RendezvousError::Nccl(e));
                }
            };
            for w in links.iter_mut().flatten() {
                send(
                    w,
                    &Msg::Welcome {
                        nccl_id: id.clone(),
                    },
                )
                .map_err(conn(0, "could not answer a process"))?;
            }
            for (rank, _, _, reader) in hellos {
                let stream = reader.into_inner();
                stream
                    .set_read_timeout(None)
                    .map_err(conn(0, "could not clear a timeout"))?;
                spawn_reader(rank, stream, tx.clone());
            }
            refuse_latecomers(listener, rv.clone(), closed.clone());
            id
        } else {
            let stream = connect_until(&rv.master, deadline).map_err(|source| {
                RendezvousError::Unreachable {
                    rank: rv.rank,
                    master: rv.master.clone(),
                    seconds: rv.timeout.as_secs_f64(),
                    source,
                }
            })?;
            let mut w = BufWriter::new(
                stream
                    .try_clone()
                    .map_err(conn(rv.rank, "could not keep a link"))?,
            );
            send(
                &mut w,
                &Msg::Hello {
                    rank: rv.rank as u32,
                    world: rv.world as u32,
                    version,
                    config: config.to_string(),
                },
            )
            .map_err(conn(rv.rank, "could not greet rank 0"))?;
            // A difftrain rank 0 answers the greeting at once (Doing, or Refuse); what stays
            // silent, or answers something else, is another program on the port.
            let first_answer = rv.timeout.min(FIRST_ANSWER);
            stream
                .set_read_timeout(Some(first_answer))
                .map_err(conn(rv.rank, "could not set a timeout"))?;
            let mut reader = BufReader::new(stream);
            let foreign = |why: String| RendezvousError::Foreign {
                rank: rv.rank,
                master: rv.master.clone(),
                why,
            };
            let mut greeted = false;
            let id = loop {
                match decode(&mut reader) {
                    Ok(Msg::Welcome { nccl_id }) => break nccl_id,
                    Ok(Msg::Refuse { message }) => return Err(RendezvousError::Refused(message)),
                    Ok(Msg::Doing { .. }) if !greeted => {
                        greeted = true;
                        reader
                            .get_ref()
                            .set_read_timeout(Some(
                                deadline
                                    .saturating_duration_since(Instant::now())
                                    .max(Duration::from_secs(1)),
                            ))
                            .map_err(conn(rv.rank, "could not set a timeout"))?;
                    }
                    Ok(other) if greeted => {
                        return Err(RendezvousError::Unexpected(format!("{other:?}")));
                    }
                    Ok(other) => return Err(foreign(format!("it answered {other:?}"))),
                    Err(e) if !greeted => {
                        let why = match e.kind() {
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                                format!(
                                    "no answer to the greeting within {:.0} s",
                                    first_answer.as_secs_f64()
                                )
                            }
                            std::io::ErrorKind::UnexpectedEof => {
                                "it closed the connection without answering".to_string()
                            }
                            _ => format!("its answer is not difftrain's: {e}"),
                        };
                        return Err(foreign(why));
                    }
                    Err(source) => {
                        return Err(RendezvousError::Connection {
                            rank: rv.rank,
                            what: "lost rank 0",
                            source: std::io::Error::other(source),
                        });
                    }
                }
            };
            let stream = reader.into_inner();
            stream
                .set_read_timeout(None)
                .map_err(conn(rv.rank, "could not clear a timeout"))?;
            links[0] = Some(w);
            spawn_reader(0, stream, tx.clone());
            id
        };
        Ok(Arc::new(Self {
            rank: rv.rank,
            world: rv.world,
            timeout: rv.timeout,
            nccl_id,
            closed,
            inner: Mutex::new(Inner {
                links,
                events: rx,
                seen: vec![Seen::now("training"); rv.world],
                failed: None,
            }),
        }))
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// The NCCL unique id rank 0 minted (empty on the CPU).
    pub fn nccl_id(&self) -> &[u8] {
        &self.nccl_id
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells the others what this process is doing (rank 0's writes; shown by a rank that
    /// times out waiting for it).
    pub fn doing(&self, what: &str) {
        let mut inner = self.lock();
        for w in inner.links.iter_mut().flatten() {
            let _ = send(w, &Msg::Doing { what: what.into() });
        }
    }

    /// Reports this process's failure to the others (rank 0 passes it on), so they stop at
    /// their next collective with it instead of waiting for a timeout.
    pub fn fail(&self, message: &str) {
        let mut inner = self.lock();
        let msg = Msg::Fail {
            rank: self.rank as u32,
            message: message.into(),
        };
        for w in inner.links.iter_mut().flatten() {
            let _ = send(w, &msg);
        }
    }

    /// Waits until every process reaches the barrier `what`.
    pub fn barrier(&self, what: &str) -> Result<(), SyncError> {
        self.all_reduce(what, Vec::new()).map(|_| ())
    }

    /// Sums `data` over the processes in rank order (every rank gets the sum) once every rank
    /// has arrived at the same `what`; an empty `data` is a barrier.
    pub fn all_reduce(&self, what: &str, data: Vec<f32>) -> Result<Vec<f32>, SyncError> {
        let mut inner = self.lock();
        if let Some(e) = &inner.failed {
            return Err(e.clone());
        }
        let result = if self.rank == 0 {
            self.gather_and_answer(&mut inner, what, data)
        } else {
            self.contribute(&mut inner, what, data)
        };
        if let Err(e) = &result {
            inner.failed = Some(e.clone());
        }
        result
    }

    /// Rank 0: collects every rank's contribution, sums in rank order, answers everyone.
    fn gather_and_answer(
        &self,
        inner: &mut Inner,
        what: &str,
        data: Vec<f32>,
    ) -> Result<Vec<f32>, SyncError> {
        let mut arrived: Vec<Option<(String, Vec<f32>)>> = (0..self.world).map(|_| None).collect();
        arrived[0] = Some((what.to_string(), data));
        let deadline = Instant::now() + self.timeout;
        while arrived.iter().any(Option::is_none) {
            let wait = deadline.saturating_duration_since(Instant::now());
            let err = match inner.events.recv_timeout(wait) {
                Ok((r, Event::Msg(Msg::Contribute { what, data }))) if arrived[r].is_none() => {
                    arrived[r] = Some((what, data));
                    inner.seen[r] = Seen::now("waiting at a collective");
                    continue;
                }
                Ok((r, Event::Msg(Msg::Contribute { what: other, .. }))) => SyncError::OutOfStep(
                    format!("rank {r} sent a second contribution ({other}) before rank 0 answered"),
                ),
                Ok((r, event)) => match interruption(inner, r, event, what) {
                    Some(e) => e,
                    None => continue,
                },
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                    let missing: Vec<String> = (0..self.world)
                        .filter(|&r| arrived[r].is_none())
                        .map(|r| format!("rank {r} ({})", inner.seen[r].describe()))
                        .collect();
                    SyncError::Timeout {
                        waiting: 0,
                        what: what.to_string(),
                        missing: missing.join(", "),
                        seconds: self.timeout.as_secs_f64(),
                    }
                }
            };
            self.tell_all(inner, &err);
            return Err(err);
        }
        let parts: Vec<(String, Vec<f32>)> = arrived.into_iter().map(Option::unwrap).collect();
        if let Some((r, (other, _))) = parts
            .iter()
            .enumerate()
            .find(|(_, p)| p.0 != what || p.1.len() != parts[0].1.len())
        {
            let err = SyncError::OutOfStep(format!(
                "rank 0 is at {what} ({} values), rank {r} at {other} ({} values)",
                parts[0].1.len(),
                parts[r].1.len()
            ));
            self.tell_all(inner, &err);
            return Err(err);
        }
        // The same order and operations as the in-process Group: bitwise the same sum.
        let mut parts = parts.into_iter().map(|p| p.1);
        let mut sum = parts.next().expect("rank 0's part");
        for p in parts {
            sum.iter_mut().zip(&p).for_each(|(s, v)| *s += v);
        }
        let answer = encode(&Msg::Sum { data: sum.clone() });
        for (r, w) in inner.links.iter_mut().enumerate() {
            if let Some(w) = w
                && let Err(e) = w.write_all(&answer).and_then(|_| w.flush())
            {
                let message = why_closed(&e).unwrap_or_else(|| {
                    format!("rank 0 could not send it the result of {what}: {e}")
                });
                let err = SyncError::PeerFailed { rank: r, message };
                self.tell_all(inner, &err);
                return Err(err);
            }
        }
        Ok(sum)
    }

    /// Rank 0 passes a failure on to everyone, who stop at their collective with it.
    fn tell_all(&self, inner: &mut Inner, err: &SyncError) {
        let (rank, message) = match err {
            SyncError::PeerFailed { rank, message } => (*rank, message.clone()),
            other => (self.rank, other.to_string()),
        };
        let msg = Msg::Fail {
            rank: rank as u32,
            message,
        };
        for w in inner.links.iter_mut().flatten() {
            let _ = send(w, &msg);
        }
    }

    /// Ranks 1..: sends this rank's contribution and waits for rank 0's sum.
    fn contribute(
        &self,
        inner: &mut Inner,
        what: &str,
        data: Vec<f32>,
    ) -> Result<Vec<f32>, SyncError> {
        let lost = |e: std::io::Error| SyncError::PeerFailed {
            rank: 0,
            message: format!("the connection to rank 0 failed: {e}"),
        };
        let w = inner.links[0]
            .as_mut()
            .expect("ranks 1.. hold a link to rank 0");
        send(
            w,
            &Msg::Contribute {
                what: what.to_string(),
                data,
            },
        )
        .map_err(lost)?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let wait = deadline.saturating_duration_since(Instant::now());
            let err = match inner.events.recv_timeout(wait) {
                Ok((_, Event::Msg(Msg::Sum { data }))) => return Ok(data),
                Ok((r, event)) => match interruption(inner, r, event, what) {
                    Some(e) => e,
                    None => continue,
                },
                Err(_) => SyncError::Timeout {
                    waiting: self.rank,
                    what: what.to_string(),
                    missing: format!("rank 0 ({})", inner.seen[0].describe()),
                    seconds: self.timeout.as_secs_f64(),
                },
            };
            if !err.is_secondary() {
                // Rank 0 passes it on to the others.
                let msg = Msg::Fail {
                    rank: self.rank as u32,
                    message: err.to_string(),
                };
                if let Some(w) = inner.links[0].as_mut() {
                    let _ = send(w, &msg);
                }
            }
            return Err(err);
        }
    }
}

/// What an event other than the awaited answer means during collective `what`: `None` when it
/// only tells what a rank is doing, else the error that ends the wait.
fn interruption(inner: &mut Inner, r: usize, event: Event, what: &str) -> Option<SyncError> {
    Some(match event {
        Event::Msg(Msg::Doing { what }) => {
            inner.seen[r] = Seen::now(what);
            return None;
        }
        Event::Msg(Msg::Fail { rank, message }) => SyncError::PeerFailed {
            rank: rank as usize,
            message,
        },
        Event::Msg(other) => SyncError::OutOfStep(format!("rank {r} sent {other:?} during {what}")),
        Event::Closed(why) => SyncError::PeerFailed {
            rank: r,
            message: format!("{why} ({})", inner.seen[r].describe()),
        },
    })
}

/// The keys whose lines differ between two resolved configs (at most five).
fn config_diff(ours: &str, theirs: &str) -> String {
    let a: std::collections::BTreeSet<&str> = ours.lines().collect();
    let b: std::collections::BTreeSet<&str> = theirs.lines().collect();
    let mut lines: Vec<String> = b
        .difference(&a)
        .map(|l| format!("{:?}", l.trim()))
        .take(5)
        .collect();
    if lines.is_empty() {
        lines = a
            .difference(&b)
            .map(|l| format!("missing {:?}", l.trim()))
            .take(5)
            .collect();
    }
    if lines.is_empty() {
        "the same lines in another order".into()
    } else {
        lines.join(", ")
    }
}

#[cfg(test)]
#[path = "process_tests.rs"]
mod tests;
