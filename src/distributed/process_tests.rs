//! The rendezvous and the collectives of processes over loopback.

use super::*;
use std::net::TcpListener;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn launch(
    world: usize,
    configs: Vec<String>,
    timeout: Duration,
) -> Vec<Result<Arc<ProcessGroup>, String>> {
    let master = format!("127.0.0.1:{}", free_port());
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let rv = Rendezvous {
                    rank,
                    world,
                    master: master.clone(),
                    timeout,
                };
                let config = configs[rank].clone();
                s.spawn(move || ProcessGroup::rendezvous(&rv, &config, || Ok(vec![7; 128])))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap().map_err(|e| crate::error::chain(&e)))
            .collect()
    })
}

/// `world` groups that met with the same config.
fn met(world: usize, timeout: Duration) -> Vec<Arc<ProcessGroup>> {
    launch(world, vec!["cfg".into(); world], timeout)
        .into_iter()
        .map(Result::unwrap)
        .collect()
}

#[test]
fn three_processes_sum_in_rank_order_and_share_the_nccl_id() {
    let groups: Vec<_> = met(3, Duration::from_secs(20));
    for g in &groups {
        assert_eq!(g.nccl_id(), &[7u8; 128][..]);
    }
    let sums: Vec<Vec<Vec<f32>>> = std::thread::scope(|s| {
        let hs: Vec<_> = groups
            .iter()
            .map(|g| {
                s.spawn(move || {
                    (0..20)
                        .map(|round| {
                            let data = vec![0.1 * g.rank() as f32 + round as f32, 1e-8, 1.0];
                            g.all_reduce(&format!("round {round}"), data).unwrap()
                        })
                        .collect()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (round, expect) in (0..20)
        .map(|r| {
            let mut s = vec![r as f32, 1e-8, 1.0];
            for k in 1..3 {
                let p = [0.1 * k as f32 + r as f32, 1e-8, 1.0];
                s.iter_mut().zip(p).for_each(|(a, b)| *a += b);
            }
            s
        })
        .enumerate()
    {
        for per_rank in &sums {
            assert_eq!(per_rank[round], expect);
        }
    }
}

#[test]
fn a_different_config_is_refused_by_rank_and_key() {
    let cfg = |lr: &str| format!("[train]\nbatch_size = 16\nlearning_rate = {lr}\n");
    let results = launch(
        3,
        vec![cfg("0.002"), cfg("0.002"), cfg("0.001")],
        Duration::from_secs(20),
    );
    for r in results {
        let e = r.err().expect("every process refuses the launch");
        assert!(
            e.contains("rank 2's resolved config differs from rank 0's")
                && e.contains("learning_rate = 0.001"),
            "{e}"
        );
    }
}

#[test]
fn a_process_that_exits_is_named_by_the_others() {
    let mut groups: Vec<_> = met(3, Duration::from_secs(20));
    // Rank 1 goes away (its connection closes, as when the process is killed).
    let gone = groups.remove(1);
    gone.doing("step 5");
    for w in gone.lock().links.iter().flatten() {
        w.get_ref().shutdown(std::net::Shutdown::Both).unwrap();
    }
    drop(gone);
    let started = Instant::now();
    let errors: Vec<SyncError> = std::thread::scope(|s| {
        let hs: Vec<_> = groups
            .iter()
            .map(|g| s.spawn(move || g.barrier("the barrier after step 6's writes").unwrap_err()))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(started.elapsed() < Duration::from_secs(10));
    for e in errors {
        let t = e.to_string();
        assert!(
            t.starts_with("data-parallel rank 1 failed: its connection closed"),
            "{t}"
        );
    }
}

#[test]
fn a_reset_connection_is_a_closed_one() {
    use std::io::{Error, ErrorKind};
    // A killed peer with unread data queued for it resets the connection (CI saw this).
    let closed = |kind| why_closed(&Error::from(kind)).unwrap();
    let reset = closed(ErrorKind::ConnectionReset);
    assert!(
        reset.starts_with("its connection closed: the process exited or was killed ("),
        "{reset}"
    );
    let pipe = closed(ErrorKind::BrokenPipe);
    assert!(pipe.starts_with("its connection closed: "), "{pipe}");
    let eof = closed(ErrorKind::UnexpectedEof);
    assert_eq!(
        eof,
        "its connection closed: the process exited or was killed"
    );
    assert_eq!(why_closed(&Error::from(ErrorKind::TimedOut)), None);
}

#[test]
fn a_silent_rank_times_out_with_what_rank_0_was_doing() {
    let groups: Vec<_> = met(2, Duration::from_millis(400));
    groups[0].doing("writing checkpoint-40");
    std::thread::sleep(Duration::from_millis(50));
    let e = groups[1]
        .barrier("the barrier after step 40's writes")
        .unwrap_err();
    let t = e.to_string();
    assert!(
        t.contains("rank 1 waited 0 s at the barrier after step 40's writes for rank 0 (last seen writing checkpoint-40"),
        "{t}"
    );
}
