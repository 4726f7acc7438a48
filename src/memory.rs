//! A global allocator that keeps freed large blocks for reuse, so the same activations and
//! gradients allocated every training step do not each cost a fresh `mmap`, a page fault per
//! 4 KiB (the kernel zeroing every page) and an `munmap` with a TLB-flush interrupt to every
//! core.
//!
//! glibc serves blocks above 32 MiB (its largest mmap threshold) with their own mappings and
//! returns them to the kernel on free. A Stable Diffusion U-Net step at batch 1 allocates and
//! frees gigabytes of such blocks (3x3 convolution weights and their gradients are 59 MB at
//! 1280 channels); profiled, page faults and unmapping were a large share of the step
//! (docs/benchmarks.md, "Kernel thresholds"). This allocator
//! sits in front of the system allocator: blocks of at least [`LARGE`] bytes are kept, by exact
//! size, in a cache of at most `cap` bytes, and handed out again for the next request of that
//! size (zeroed first when the caller asked for zeroed memory). A request the cache cannot serve
//! first frees the least recently freed blocks worth its size, so blocks of sizes the program
//! stopped asking for (another phase's) do not stay resident beside the new ones. A loop that
//! asks for the same blocks every time (a training step) marks each iteration's end with
//! [`iteration`]: from then on a miss frees only blocks that stayed unused through a whole
//! iteration, and those go back at each mark. In a cycle, the least recently freed block is
//! the one needed soonest: without the marks, one miss evicts a block the next step asks for,
//! which misses in turn, every step (the full SD 1.5 U-Net step ran twice as slow:
//! docs/benchmarks.md). Phases end with [`release_cached`] (the training loop calls it before
//! sampling). A full cache drops its oldest blocks for a newer one.
//! Everything smaller goes straight to the system allocator. The binaries opt in with
//! `#[global_allocator]`; the library does not impose it on programs that embed it.
//!
//! **The lock invariant.** The cache is one `Mutex`, and the allocator runs inside every
//! allocation of the process, including the cache's own. So, while the lock is held:
//! - only the cache's bookkeeping allocates (its map nodes and queues), and those requests are
//!   smaller than [`LARGE`], which go straight to the system allocator without touching the
//!   lock (a request of [`LARGE`] or more there would deadlock);
//! - no block is returned to the system: evicted blocks are collected and freed by
//!   `free_all` after the guard is dropped, so a slow `munmap` never blocks other threads'
//!   allocations;
//! - nothing panics that a user can cause; a poisoned lock is treated as an empty cache (the
//!   block goes to the system allocator), never unwrapped.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Blocks at least this large are cached.
pub const LARGE: usize = 1 << 20;

#[derive(Default)]
struct Cache {
    /// Free blocks by (size, align), as (when freed, address), oldest first.
    free: HashMap<(usize, usize), VecDeque<(u64, usize)>>,
    /// Every free block's (size, align) and the iteration it was freed in (see
    /// [`CachingAllocator::iteration`]) by when it was freed: the eviction order.
    order: BTreeMap<u64, ((usize, usize), u64)>,
    /// Counts the blocks kept.
    clock: u64,
    bytes: usize,
}

impl Cache {
    /// Takes the least recently freed blocks out of the cache until at least `need` bytes
    /// (or all of them) are out, and returns them for the caller to free once the lock is
    /// released.
    fn evict(&mut self, need: usize) -> Vec<(usize, Layout)> {
        self.evict_older(need, u64::MAX)
    }

    /// [`Cache::evict`], taking only blocks freed before iteration `before`.
    fn evict_older(&mut self, need: usize, before: u64) -> Vec<(usize, Layout)> {
        let mut out = Vec::new();
        let mut freed = 0;
        while freed < need {
            let Some(entry) = self.order.first_entry() else {
                break;
            };
            if entry.get().1 >= before {
                break;
            }
            let (when, ((size, align), _)) = entry.remove_entry();
            let list = self
                .free
                .get_mut(&(size, align))
                .expect("an ordered block has a list");
            // Blocks are pushed in freeing order, so the oldest of this size is first.
            let (first, ptr) = list.pop_front().expect("an ordered block is listed");
            debug_assert_eq!(first, when);
            if list.is_empty() {
                self.free.remove(&(size, align));
            }
            self.bytes -= size;
            freed += size;
            out.push((
                ptr,
                Layout::from_size_align(size, align).expect("a cached block's layout"),
            ));
        }
        out
    }
}

/// Returns evicted blocks to the system.
fn free_all(blocks: Vec<(usize, Layout)>) {
    for (ptr, layout) in blocks {
        // SAFETY: a cached block came from `System` with this layout and is owned by the caller
        // alone once evicted.
        unsafe { System.dealloc(ptr as *mut u8, layout) };
    }
}

/// The caching allocator. It caches nothing until [`CachingAllocator::set_cap`] gives it a
/// budget (the binaries do, through `tune_allocator`).
pub struct CachingAllocator {
    cache: Mutex<Option<Cache>>,
    /// Most bytes held in free blocks.
    cap: AtomicUsize,
    /// Iterations of the running loop since the last [`CachingAllocator::release`].
    iterations: AtomicU64,
}

impl Default for CachingAllocator {
    fn default() -> Self {
        Self::new()
    }
}

impl CachingAllocator {
    pub const fn new() -> Self {
        Self {
            cache: Mutex::new(None),
            cap: AtomicUsize::new(0),
            iterations: AtomicU64::new(0),
        }
    }

    pub fn set_cap(&self, bytes: usize) {
        self.cap.store(bytes, Ordering::Relaxed);
    }

    /// Makes this allocator the one [`release_cached`] empties (the binaries' global one).
    pub fn register(&'static self) {
        let _ = INSTALLED.set(self);
    }

    /// Returns every cached block to the system.
    pub fn release(&self) {
        self.iterations.store(0, Ordering::Relaxed);
        // Taken out first: freeing the map itself goes through this allocator.
        let cache = match self.cache.lock() {
            Ok(mut guard) => guard.take(),
            Err(_) => None,
        };
        if let Some(mut cache) = cache {
            free_all(cache.evict(usize::MAX));
        }
    }

    /// Marks the end of one iteration of a loop that allocates the same blocks every time (a
    /// training step). After it, a miss no longer evicts blocks freed during the previous
    /// iteration (the next iteration would miss those in turn and take fresh pages again,
    /// every time), and blocks that stayed unused through a whole iteration go back to the
    /// system at its end. [`CachingAllocator::release`] ends the loop.
    pub fn iteration(&self) {
        self.iterations.fetch_add(1, Ordering::Relaxed);
        let spared = self.spared_from();
        let evicted = match self.cache.lock() {
            Ok(mut guard) => guard
                .as_mut()
                .map_or_else(Vec::new, |c| c.evict_older(usize::MAX, spared)),
            Err(_) => Vec::new(),
        };
        free_all(evicted);
    }

    /// The first iteration whose freed blocks a miss spares: the previous one inside a loop,
    /// none outside.
    fn spared_from(&self) -> u64 {
        match self.iterations.load(Ordering::Relaxed) {
            0 => u64::MAX,
            i => i - 1,
        }
    }

    /// A cached block of exactly this layout. On a miss, frees the least recently freed blocks
    /// worth at least its size first: the caller is about to take that much fresh memory from
    /// the system, and blocks the program stopped asking for (another phase's sizes) should
    /// not stay resident beside it. Inside a loop ([`CachingAllocator::iteration`]) only blocks
    /// older than the previous iteration go.
    fn take(&self, layout: Layout) -> Option<*mut u8> {
        let evicted = {
            let mut guard = self.cache.lock().ok()?;
            let cache = guard.as_mut()?;
            let key = (layout.size(), layout.align());
            if let Some(list) = cache.free.get_mut(&key)
                && let Some((when, ptr)) = list.pop_back()
            {
                if list.is_empty() {
                    cache.free.remove(&key);
                }
                cache.order.remove(&when);
                cache.bytes -= layout.size();
                return Some(ptr as *mut u8);
            }
            cache.evict_older(layout.size(), self.spared_from())
        };
        free_all(evicted);
        None
    }

    /// Keeps the block (and no [`uncached`] section is running), freeing the least recently
    /// freed ones when the cache would exceed its budget; returns false when the block goes
    /// back to the system instead.
    fn keep(&self, ptr: *mut u8, layout: Layout) -> bool {
        if UNCACHED.load(Ordering::Relaxed) > 0
            && INSTALLED.get().is_some_and(|a| std::ptr::eq(*a, self))
        {
            return false;
        }
        let cap = self.cap.load(Ordering::Relaxed);
        if layout.size() > cap {
            return false;
        }
        let evicted = {
            let Ok(mut guard) = self.cache.lock() else {
                return false;
            };
            let cache = guard.get_or_insert_with(Cache::default);
            let evicted = cache.evict((cache.bytes + layout.size()).saturating_sub(cap));
            cache.clock += 1;
            let key = (layout.size(), layout.align());
            cache
                .free
                .entry(key)
                .or_default()
                .push_back((cache.clock, ptr as usize));
            let i = self.iterations.load(Ordering::Relaxed);
            cache.order.insert(cache.clock, (key, i));
            cache.bytes += layout.size();
            evicted
        };
        free_all(evicted);
        true
    }
}

// SAFETY: every block handed out comes from `System` with the same layout it is later freed with
// (the cache is keyed by exact size and alignment), and a cached block is owned by the cache
// alone until it is handed out again.
unsafe impl GlobalAlloc for CachingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= LARGE
            && let Some(p) = self.take(layout)
        {
            return p;
        }
        // SAFETY: forwarded with the caller's layout.
        or_out_of_memory(unsafe { System.alloc(layout) }, layout.size())
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= LARGE
            && let Some(p) = self.take(layout)
        {
            // SAFETY: `p` is a block of `layout.size()` bytes owned by the caller now.
            unsafe { std::ptr::write_bytes(p, 0, layout.size()) };
            return p;
        }
        // SAFETY: forwarded with the caller's layout.
        or_out_of_memory(unsafe { System.alloc_zeroed(layout) }, layout.size())
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // Every block, cached or not, came from `System` with its layout, so `System` can resize
        // it (with `mremap` for large ones, no copy).
        // SAFETY: forwarded with the caller's pointer, layout and size.
        or_out_of_memory(unsafe { System.realloc(ptr, layout, new_size) }, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.size() >= LARGE && self.keep(ptr, layout) {
            return;
        }
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// `p`, unless the system refused the allocation: then the process says so and exits with
/// status 1, instead of Rust's abort (status 134, "memory allocation of N bytes failed" and a
/// backtrace). Nothing here allocates: the message is formatted on the stack. (Allocations the
/// system grants but cannot back end with the kernel's OOM killer, which no process can
/// answer; the estimates before a run and a sample batch are the guard against both.)
fn or_out_of_memory(p: *mut u8, size: usize) -> *mut u8 {
    if !p.is_null() {
        return p;
    }
    struct Stack {
        buf: [u8; 320],
        len: usize,
    }
    impl std::fmt::Write for Stack {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            let n = s.len().min(self.buf.len() - self.len);
            self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
            self.len += n;
            Ok(())
        }
    }
    let mut m = Stack {
        buf: [0; 320],
        len: 0,
    };
    // SAFETY: sysconf only reads system parameters.
    let total = unsafe {
        (libc::sysconf(libc::_SC_PHYS_PAGES) as f64) * (libc::sysconf(libc::_SC_PAGESIZE) as f64)
    };
    let _ = std::fmt::Write::write_fmt(
        &mut m,
        format_args!(
            "error: out of memory: the system refused {:.1} GB (this machine has {:.1} GB). The \
             model, batch or image size is too large for it; lower it (`train --check` \
             estimates what a run needs)\n",
            size as f64 / 1e9,
            total / 1e9
        ),
    );
    // SAFETY: writes `m.len` initialised bytes to stderr, then ends the process without
    // running anything else (no destructor or handler may allocate now).
    unsafe {
        libc::write(2, m.buf.as_ptr().cast(), m.len);
        libc::_exit(1)
    }
}

static INSTALLED: std::sync::OnceLock<&'static CachingAllocator> = std::sync::OnceLock::new();

/// Running [`uncached`] sections (on any thread).
static UNCACHED: AtomicUsize = AtomicUsize::new(0);

/// Runs `f` with the registered allocator's cache keeping no freed block: for work that frees
/// many one-off blocks of distinct sizes (loading weights tensor by tensor), which the cache
/// would hold for nothing. Blocks freed meanwhile, by any thread, go straight back to the
/// system.
pub fn uncached<T>(f: impl FnOnce() -> T) -> T {
    struct Section;
    impl Drop for Section {
        fn drop(&mut self) {
            UNCACHED.fetch_sub(1, Ordering::Relaxed);
        }
    }
    UNCACHED.fetch_add(1, Ordering::Relaxed);
    let _section = Section;
    f()
}

/// [`CachingAllocator::iteration`] of the registered allocator (the binaries' global one): once
/// per training step.
pub fn iteration() {
    if let Some(a) = INSTALLED.get() {
        a.iteration();
    }
}

/// Returns the cached blocks of the registered allocator and glibc's free heap pages to the
/// system: after a large one-off release (f32 weights replaced by their half copies) that
/// would otherwise stay resident until the cache reuses it, or between phases that allocate
/// different sizes (training and sampling). Ends a loop of [`iteration`]s.
pub fn release_cached() {
    if let Some(a) = INSTALLED.get() {
        a.release();
    }
    // Blocks under glibc's mmap threshold (32 MiB here) were freed into its heap, which keeps
    // them resident below the trim threshold (1 GiB): hand those pages back too.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Physical memory in bytes (Linux `MemTotal`), if known.
pub fn total_memory() -> Option<u64> {
    let kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })?;
    Some(kib << 10)
}

/// Something that needs more memory than the machine has.
#[derive(Debug, thiserror::Error)]
#[error(
    "{what} needs at least {:.1} GB of memory; this machine has {:.1} GB",
    *need as f64 / 1e9,
    *total as f64 / 1e9
)]
pub struct DoesNotFit {
    pub what: String,
    pub need: u64,
    pub total: u64,
}

/// Refuses `need` bytes for `what` when they exceed this machine's physical memory, rather than
/// aborting inside an allocation later.
pub fn check_fits(need: u64, what: &str) -> Result<(), DoesNotFit> {
    match total_memory() {
        Some(total) if need > total => Err(DoesNotFit {
            what: what.to_string(),
            need,
            total,
        }),
        _ => Ok(()),
    }
}

/// The cache budget for this machine: a quarter of physical memory, at most 8 GiB
/// (`DIFFTRAIN_ALLOC_CACHE_MB` overrides, clamped to physical memory; 0 turns caching off).
pub fn default_cap() -> usize {
    cap_for(
        std::env::var("DIFFTRAIN_ALLOC_CACHE_MB").ok().as_deref(),
        total_memory().unwrap_or(8 << 30),
    )
}

/// [`default_cap`] for the variable's value `mb` on a machine of `total` bytes. A value that
/// does not parse is ignored; a larger one than the machine has is clamped to it (and cannot
/// overflow the shift).
fn cap_for(mb: Option<&str>, total: u64) -> usize {
    let total = usize::try_from(total).unwrap_or(usize::MAX);
    match mb.and_then(|v| v.trim().parse::<u64>().ok()) {
        Some(mb) => usize::try_from(mb).unwrap_or(usize::MAX).min(total >> 20) << 20,
        None => (total / 4).min(8 << 30),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_variable_is_clamped_to_the_machine() {
        let gib = 1u64 << 30;
        assert_eq!(cap_for(None, 16 * gib), 4 << 30);
        assert_eq!(cap_for(None, 64 * gib), 8 << 30);
        assert_eq!(cap_for(Some("0"), 16 * gib), 0);
        assert_eq!(cap_for(Some("512"), 16 * gib), 512 << 20);
        // Larger than the machine (or than a shift by 20 can hold): the machine's memory.
        assert_eq!(cap_for(Some("99999999999999999"), 16 * gib), 16 << 30);
        assert_eq!(cap_for(Some("lots"), 16 * gib), 4 << 30);
    }

    #[test]
    fn large_blocks_are_reused_and_zeroed_on_request() {
        let a = CachingAllocator::new();
        let layout = Layout::from_size_align(LARGE, 64).unwrap();
        // SAFETY: the test frees every block it allocates with its layout.
        unsafe {
            let p = a.alloc(layout);
            p.write_bytes(7, LARGE);
            a.dealloc(p, layout);
            // No budget yet: nothing was kept.
            assert!(a.take(layout).is_none());
            a.set_cap(4 * LARGE);
            let p = a.alloc(layout);
            p.write_bytes(7, LARGE);
            a.dealloc(p, layout);
            let q = a.alloc_zeroed(layout);
            assert_eq!(q, p, "the freed block is handed out again");
            assert!(std::slice::from_raw_parts(q, LARGE).iter().all(|&b| b == 0));
            a.dealloc(q, layout);
            // Over the budget, blocks go back to the system.
            let blocks: Vec<*mut u8> = (0..6).map(|_| a.alloc(layout)).collect();
            for b in blocks {
                a.dealloc(b, layout);
            }
            assert_eq!(a.cache.lock().unwrap().as_ref().unwrap().bytes, 4 * LARGE);
            // `release` hands every cached block back.
            a.release();
            assert!(a.take(layout).is_none());
        }
    }

    const KIB: usize = 1 << 10;

    fn layout(kib: usize) -> Layout {
        Layout::from_size_align(kib * KIB, 64).unwrap()
    }

    /// (cached KiB, the cached blocks' sizes in KiB)
    fn cached(a: &CachingAllocator) -> (usize, Vec<usize>) {
        let guard = a.cache.lock().unwrap();
        let Some(c) = guard.as_ref() else {
            return (0, Vec::new());
        };
        let mut sizes: Vec<usize> = c
            .free
            .iter()
            .flat_map(|(k, v)| std::iter::repeat_n(k.0 / KIB, v.len()))
            .collect();
        sizes.sort();
        (c.bytes / KIB, sizes)
    }

    #[test]
    fn a_miss_or_a_full_cache_frees_the_least_recently_freed_blocks_first() {
        let a = CachingAllocator::new();
        a.set_cap(16 * LARGE);
        // SAFETY: the test frees every block it allocates with its layout.
        unsafe {
            let s1 = a.alloc(layout(1024));
            let b1 = a.alloc(layout(2048));
            let s2 = a.alloc(layout(1024));
            a.dealloc(s1, layout(1024));
            a.dealloc(b1, layout(2048));
            a.dealloc(s2, layout(1024));
            assert_eq!(cached(&a), (4096, vec![1024, 1024, 2048]));
            // A hit takes the block and evicts nothing; freed again, it is the newest.
            let b2 = a.alloc(layout(2048));
            assert_eq!(b2, b1);
            assert_eq!(cached(&a), (2048, vec![1024, 1024]));
            a.dealloc(b2, layout(2048));
            // A miss (1.5 MiB) frees at least its size, oldest first: both 1 MiB blocks.
            let o = a.alloc(layout(1536));
            assert_eq!(cached(&a), (2048, vec![2048]));
            a.dealloc(o, layout(1536));
            assert_eq!(cached(&a), (3584, vec![1536, 2048]));
            a.release();
        }
        let a = CachingAllocator::new();
        a.set_cap(4 * LARGE);
        // SAFETY: as above.
        unsafe {
            let x = a.alloc(layout(2048));
            let y = a.alloc(layout(1024));
            let z = a.alloc(layout(2048));
            a.dealloc(x, layout(2048));
            a.dealloc(y, layout(1024));
            // Over the budget, the oldest block (x) makes room for the newest.
            a.dealloc(z, layout(2048));
            assert_eq!(cached(&a), (3072, vec![1024, 2048]));
            // A block larger than the budget is not kept (its miss emptied the cache).
            let h = a.alloc(layout(5120));
            a.dealloc(h, layout(5120));
            assert_eq!(cached(&a), (0, vec![]));
        }
    }

    #[test]
    fn inside_a_loop_a_miss_spares_the_previous_iterations_blocks() {
        let cached = |a: &CachingAllocator| cached(a).1;
        let a = CachingAllocator::new();
        a.set_cap(16 * LARGE);
        // SAFETY: the test frees every block it allocates with its layout.
        unsafe {
            // Iteration 0 frees a 1 MiB block.
            let s = a.alloc(layout(1024));
            a.dealloc(s, layout(1024));
            a.iteration();
            // Iteration 1: a miss keeps it (outside a loop it would have gone, as above).
            let o = a.alloc(layout(1536));
            assert_eq!(cached(&a), vec![1024]);
            a.dealloc(o, layout(1536));
            // It stayed unused through iteration 1: its end frees it.
            a.iteration();
            assert_eq!(cached(&a), vec![1536]);
            // Iteration 2: a miss spares iteration 1's block.
            let b = a.alloc(layout(2048));
            assert_eq!(cached(&a), vec![1536]);
            a.dealloc(b, layout(2048));
            // `release` ends the loop: a miss frees the least recently freed blocks again.
            a.release();
            let (x, y) = (a.alloc(layout(1024)), a.alloc(layout(1024)));
            a.dealloc(x, layout(1024));
            a.dealloc(y, layout(1024));
            let z = a.alloc(layout(3072));
            assert!(cached(&a).is_empty());
            a.dealloc(z, layout(3072));
            a.release();
        }
    }

    #[test]
    fn uncached_sections_keep_nothing() {
        // The registered allocator (the binaries' global one) is the one sections apply to;
        // nothing else registers in this test binary.
        static A: CachingAllocator = CachingAllocator::new();
        A.register();
        A.set_cap(4 * LARGE);
        let layout = Layout::from_size_align(LARGE, 64).unwrap();
        // SAFETY: the test frees every block it allocates with its layout.
        unsafe {
            let p = A.alloc(layout);
            uncached(|| A.dealloc(p, layout));
            assert!(
                A.take(layout).is_none(),
                "a block freed in the section was kept"
            );
        }
    }
}
