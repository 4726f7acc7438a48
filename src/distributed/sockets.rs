//! The sockets of the rendezvous: rank 0's listener, the others' connection attempts, waiting
//! with a deadline, and the thread that refuses processes joining after the launch met.

use std::io::{BufReader, BufWriter};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::process::{Rendezvous, RendezvousError};
use super::wire::{Msg, decode, send};

/// Rank 0's listening socket on `master`'s port: on loopback when `master` is a loopback
/// address, else on every interface (as torchrun does: `MASTER_ADDR` is how the others reach
/// this machine, which may not be an address it can bind).
pub(super) fn listen(master: &str) -> Result<TcpListener, RendezvousError> {
    let addr = resolve(master)?;
    let bind: SocketAddr = if addr.ip().is_loopback() {
        addr
    } else if addr.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], addr.port()))
    } else {
        SocketAddr::from(([0u16; 8], addr.port()))
    };
    let fail = |source| RendezvousError::Listen {
        bind,
        master: master.to_string(),
        source,
    };
    let listener = TcpListener::bind(bind).map_err(fail)?;
    listener.set_nonblocking(true).map_err(fail)?;
    Ok(listener)
}

pub(super) fn resolve(master: &str) -> Result<SocketAddr, RendezvousError> {
    master
        .to_socket_addrs()
        .map_err(|source| RendezvousError::Resolve {
            master: master.to_string(),
            source,
        })?
        .next()
        .ok_or_else(|| RendezvousError::NoAddress(master.to_string()))
}

/// How long a process waits for rank 0's first answer to its greeting (at most the timeout).
pub(super) const FIRST_ANSWER: Duration = Duration::from_secs(30);

/// How often rank 0 says it is still waiting for processes to join.
pub(super) const WAITING_NOTE_EVERY: Duration = Duration::from_secs(30);

/// Rank 0, after the launch met: any process that connects later (a second process with the
/// same RANK, a rank of another launch on the same port) is refused at once, by name, instead
/// of waiting out its timeout; rank 0 says so too.
pub(super) fn refuse_latecomers(listener: TcpListener, rv: Rendezvous, closed: Arc<AtomicBool>) {
    let spawned = std::thread::Builder::new()
        .name("difftrain-latecomers".into())
        .spawn(move || {
            while !closed.load(Ordering::Relaxed) {
                let Ok((stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                };
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let Ok(reader) = stream.try_clone() else {
                    continue;
                };
                let Ok(Msg::Hello { rank, .. }) = decode(&mut BufReader::new(reader)) else {
                    continue;
                };
                let message = format!(
                    "a process with RANK={rank} joined after all {} processes of the launch at \
                     {} had met (two processes started with RANK={rank}?); it was refused",
                    rv.world, rv.master
                );
                eprintln!("rank 0: warning: {message}");
                let _ = send(&mut BufWriter::new(stream), &Msg::Refuse { message });
            }
        });
    // Without the thread a latecomer only waits out its timeout, as before.
    drop(spawned);
}

pub(super) fn accept_until(
    listener: &TcpListener,
    deadline: Instant,
    waiting: &dyn Fn(),
) -> std::io::Result<TcpStream> {
    let mut next_note = Instant::now() + WAITING_NOTE_EVERY;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                stream.set_nodelay(true)?;
                return Ok(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(std::io::ErrorKind::TimedOut.into());
                }
                if Instant::now() >= next_note {
                    waiting();
                    next_note += WAITING_NOTE_EVERY;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    }
}

pub(super) fn connect_until(master: &str, deadline: Instant) -> std::io::Result<TcpStream> {
    let mut last: std::io::Error = std::io::ErrorKind::TimedOut.into();
    while Instant::now() < deadline {
        // Resolved again each try: a DNS name may appear only once rank 0's machine is up.
        if let Ok(addr) = resolve(master) {
            let wait = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_secs(5))
                .max(Duration::from_millis(1));
            match TcpStream::connect_timeout(&addr, wait) {
                Ok(s) => {
                    s.set_nodelay(true)?;
                    return Ok(s);
                }
                Err(e) => last = e,
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(last)
}
