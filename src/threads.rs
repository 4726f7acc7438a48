//! The thread pool the binaries run on: the program's own thread is one of rayon's pool
//! threads ([`on_pool`]), and a pool thread that waits for threads of its own making runs the
//! pool's pending work meanwhile ([`help_pool_until`]).

/// Runs `f` on a thread of rayon's global pool (built here with a large stack), so the
/// program's own thread is one of the pool's rather than a third thread beside them: the
/// kernels' parallel loops then run part of their work on the calling thread instead of
/// handing all of it to the pool and sleeping until it is done, a sleep and a wake-up per
/// parallel operation.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    // Autodiff's backward pass and the checkpoint code recurse; the main thread has 8 MiB.
    const STACK: usize = 64 << 20;
    // Already built (by a test, or an embedding program): use it as it is.
    let _ = rayon::ThreadPoolBuilder::new()
        .stack_size(STACK)
        .build_global();
    rayon::scope(|_| f())
}

/// Waits until `done()`, running the thread pool's pending work meanwhile when called on one of
/// its threads ([`on_pool`]): a pool thread that only waited for threads of its own making,
/// whose parallel loops run on the pool, would leave those loops one thread fewer.
pub fn help_pool_until(done: impl Fn() -> bool) {
    let mut nap = std::time::Duration::from_micros(20);
    while !done() {
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => nap = std::time::Duration::from_micros(20),
            // Nothing to run (or not a pool thread): poll again shortly, backing off to 1 ms.
            _ => {
                std::thread::sleep(nap);
                nap = (nap * 2).min(std::time::Duration::from_millis(1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rayon::prelude::*;

    #[test]
    fn a_pool_thread_waiting_for_its_own_threads_runs_their_parallel_work() {
        // One pool thread, which waits for a thread whose parallel loop runs on that pool:
        // without the waiting thread running it, the loop would never run.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let sum = pool.install(|| {
            std::thread::scope(|s| {
                let h = s.spawn(|| pool.install(|| (0..1000u64).into_par_iter().sum::<u64>()));
                super::help_pool_until(|| h.is_finished());
                h.join().unwrap()
            })
        });
        assert_eq!(sum, 499_500);
    }
}
