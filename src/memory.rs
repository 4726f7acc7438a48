//! A global allocator that keeps freed large blocks for reuse, so the same activations and
//! gradients allocated every training step do not each cost a fresh `mmap`, a page fault per
//! 4 KiB (the kernel zeroing every page) and an `munmap` with a TLB-flush interrupt to every
//! core.
//!
//! glibc serves blocks above 32 MiB (its largest mmap threshold) with their own mappings and
//! returns them to the kernel on free. A Stable Diffusion U-Net step at batch 1 allocates and
//! frees gigabytes of such blocks (3x3 convolution weights and their gradients are 59 MB at
//! 1280 channels); profiled, page faults and unmapping were ~40% of the step. This allocator
//! sits in front of the system allocator: blocks of at least [`LARGE`] bytes are kept, by exact
//! size, in a cache of at most `cap` bytes, and handed out again for the next request of that
//! size (zeroed first when the caller asked for zeroed memory). Everything smaller goes straight
//! to the system allocator. The binaries opt in with `#[global_allocator]`; the library does not
//! impose it on programs that embed it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Blocks at least this large are cached.
pub const LARGE: usize = 1 << 20;

#[derive(Default)]
struct Cache {
    /// Free blocks by (size, align).
    free: HashMap<(usize, usize), Vec<usize>>,
    bytes: usize,
}

/// The caching allocator. It caches nothing until [`CachingAllocator::set_cap`] gives it a
/// budget (the binaries do, through `tune_allocator`).
pub struct CachingAllocator {
    cache: Mutex<Option<Cache>>,
    /// Most bytes held in free blocks.
    cap: AtomicUsize,
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
        // Taken out first: freeing the map itself goes through this allocator.
        let cache = match self.cache.lock() {
            Ok(mut guard) => guard.take(),
            Err(_) => None,
        };
        for ((size, align), blocks) in cache.map(|c| c.free).unwrap_or_default() {
            let layout = Layout::from_size_align(size, align).expect("a cached block's layout");
            for ptr in blocks {
                // SAFETY: a cached block came from `System` with this layout and is owned by the
                // cache alone, which no longer lists it.
                unsafe { System.dealloc(ptr as *mut u8, layout) };
            }
        }
    }

    fn take(&self, layout: Layout) -> Option<*mut u8> {
        let mut guard = self.cache.lock().ok()?;
        let cache = guard.as_mut()?;
        let list = cache.free.get_mut(&(layout.size(), layout.align()))?;
        let ptr = list.pop()?;
        cache.bytes -= layout.size();
        Some(ptr as *mut u8)
    }

    /// Keeps the block if the cache has room (and no [`uncached`] section is running); returns
    /// it otherwise.
    fn keep(&self, ptr: *mut u8, layout: Layout) -> bool {
        if UNCACHED.load(Ordering::Relaxed) > 0
            && INSTALLED.get().is_some_and(|a| std::ptr::eq(*a, self))
        {
            return false;
        }
        let Ok(mut guard) = self.cache.lock() else {
            return false;
        };
        let cache = guard.get_or_insert_with(Cache::default);
        if cache.bytes + layout.size() > self.cap.load(Ordering::Relaxed) {
            return false;
        }
        cache.bytes += layout.size();
        cache
            .free
            .entry((layout.size(), layout.align()))
            .or_default()
            .push(ptr as usize);
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
        unsafe { System.alloc(layout) }
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
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // Every block, cached or not, came from `System` with its layout, so `System` can resize
        // it (with `mremap` for large ones, no copy).
        // SAFETY: forwarded with the caller's pointer, layout and size.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.size() >= LARGE && self.keep(ptr, layout) {
            return;
        }
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
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

/// Returns the cached blocks of the registered allocator and glibc's free heap pages to the
/// system: after a large one-off release (f32 weights replaced by their half copies) that
/// would otherwise stay resident until the cache reuses it.
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

/// Refuses `need` bytes for `what` when they exceed this machine's physical memory, rather than
/// aborting inside an allocation later.
pub fn check_fits(need: u64, what: &str) -> Result<(), String> {
    match total_memory() {
        Some(total) if need > total => Err(format!(
            "{what} needs at least {:.1} GB of memory; this machine has {:.1} GB",
            need as f64 / 1e9,
            total as f64 / 1e9
        )),
        _ => Ok(()),
    }
}

/// The cache budget for this machine: a quarter of physical memory, at most 8 GiB
/// (`DIFFTRAIN_ALLOC_CACHE_MB` overrides; 0 turns caching off).
pub fn default_cap() -> usize {
    if let Some(mb) = std::env::var("DIFFTRAIN_ALLOC_CACHE_MB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        return mb << 20;
    }
    let total = total_memory().unwrap_or(8 << 30) as usize;
    (total / 4).min(8 << 30)
}

#[cfg(test)]
mod tests {
    use super::*;

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
