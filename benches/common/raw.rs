//! The raw mapping cycle, as C would write it: no library, no cache. A
//! memfd, populated beforehand (every page in the page cache), and a
//! reserved `PROT_NONE` window of one granule. One cycle maps the next
//! granule of G frames into the window with one `mmap(MAP_SHARED |
//! MAP_FIXED)`, reads one word of every 4 KiB page (the faults that make the
//! mapping usable) and takes the mapping out again:
//!
//! - [`Cycle::Strict`]: a `PROT_NONE` remap over it, then the next cycle
//!   maps into the reservation (two calls per granule: what a cache that
//!   unmaps at eviction pays, `Reclaim::Strict`);
//! - [`Cycle::InPlace`]: nothing; the next cycle maps straight over the live
//!   mapping (one call per granule: what `Reclaim::Lazy` pays).
//!
//! The granules are taken in turn round the memory, so each mapping is new
//! while the pages behind it stay in the page cache.
//!
//! Shared by `benches/baseline.rs` (the `map_cycle_raw` group) and
//! `benches/granule.rs` (the side-by-side check of the library's cost).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr;

/// How a cycle takes its mapping out (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cycle {
    Strict,
    InPlace,
}

impl Cycle {
    pub fn name(self) -> &'static str {
        match self {
            Cycle::Strict => "strict",
            Cycle::InPlace => "in_place",
        }
    }
}

/// The bytes of a small page (the unit read and reported).
pub const PAGE: usize = 4096;

/// Memory a cycle goes round: 64 MiB of small pages (16,384 frames), or
/// [`HUGE_PAGES`] huge pages.
pub const SMALL_BYTES: usize = 64 << 20;
/// Huge pages of one memory to go round (32 MiB).
pub const HUGE_PAGES: usize = 16;

/// A memfd of `granules` granules of `granule` 4 KiB frames and a one-granule
/// window for the cycle.
pub struct RawMap {
    fd: OwnedFd,
    granule: usize,
    granules: usize,
    win: *mut u8,
    /// The window's reservation, with its alignment slack.
    reserved: (*mut u8, usize),
    next: usize,
}

/// Huge pages of the system's default size (2 MiB on x86-64) free for a new
/// hugetlbfs file, and that size.
pub fn huge_pages_free() -> Option<(usize, usize)> {
    let size = lwbuf::huge_page_size().ok()?;
    Some((lwbuf::huge_pages_free(size)?, size))
}

fn check(r: libc::c_int, what: &str) -> io::Result<()> {
    if r < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

fn mapped(p: *mut libc::c_void, what: &str) -> io::Result<*mut u8> {
    if p == libc::MAP_FAILED {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(p.cast())
}

impl RawMap {
    /// `bytes` of memfd (small pages, or huge pages with `huge`), cut in
    /// granules of `granule` frames, every page written once.
    pub fn new(bytes: usize, granule: usize, huge: bool) -> io::Result<RawMap> {
        let flags = libc::MFD_CLOEXEC | if huge { libc::MFD_HUGETLB } else { 0 };
        // SAFETY: a NUL-terminated name and valid flags.
        let fd = unsafe { libc::memfd_create(c"lwbuf-raw-cycle".as_ptr(), flags) };
        check(fd, "memfd_create")?;
        // SAFETY: `fd` was just created and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: a valid fd.
        check(unsafe { libc::ftruncate(fd.as_raw_fd(), bytes as libc::off_t) }, "ftruncate")?;
        // Populate: map it all once, write every page, unmap.
        // SAFETY: a new shared mapping of the whole file where the kernel
        // chooses.
        let all = mapped(
            unsafe {
                libc::mmap(
                    ptr::null_mut(),
                    bytes,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    0,
                )
            },
            "mmap(populate)",
        )?;
        for off in (0..bytes).step_by(PAGE) {
            // SAFETY: inside the mapping just made.
            unsafe { all.add(off).cast::<u64>().write_volatile(off as u64) };
        }
        // SAFETY: the mapping made above, used no more.
        check(unsafe { libc::munmap(all.cast(), bytes) }, "munmap(populate)")?;
        RawMap::over(fd, bytes, granule)
    }

    /// The cycle over someone else's populated memfd of `bytes` (a
    /// library's memory): the same frames, in the same state, as the
    /// library maps. Timing two memfds against each other measures where
    /// their pages happen to lie as much as the code: two raw cycles, each
    /// over its own memfd, differed by up to 1.4x here.
    #[allow(dead_code, reason = "used by benches/granule.rs, not benches/baseline.rs")]
    pub fn sharing(fd: BorrowedFd<'_>, bytes: usize, granule: usize) -> io::Result<RawMap> {
        RawMap::over(fd.try_clone_to_owned()?, bytes, granule)
    }

    /// The window over `fd`, whose `bytes` are populated.
    fn over(fd: OwnedFd, bytes: usize, granule: usize) -> io::Result<RawMap> {
        // The window: one granule, aligned to it (a huge page's mapping
        // must start on a huge-page boundary).
        let len = granule * PAGE;
        let slack = len;
        // SAFETY: an anonymous PROT_NONE reservation where the kernel
        // chooses.
        let base = mapped(
            unsafe {
                libc::mmap(
                    ptr::null_mut(),
                    len + slack,
                    libc::PROT_NONE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            },
            "mmap(reserve)",
        )?;
        let win = ((base as usize + len - 1) & !(len - 1)) as *mut u8;
        Ok(RawMap { fd, granule, granules: bytes / len, win, reserved: (base, len + slack), next: 0 })
    }

    /// The memory and window of `cfg`.
    pub fn for_config(cfg: Config) -> io::Result<RawMap> {
        RawMap::new(cfg.bytes(), cfg.granule, cfg.huge)
    }

    /// One cycle over the next granule; returns the sum of the words read.
    #[inline]
    pub fn cycle(&mut self, how: Cycle) -> u64 {
        // SAFETY: inside the granule just mapped (`cycle_with`'s contract).
        self.cycle_with(how, |_, win, off| unsafe { win.add(off).cast::<u64>().read_volatile() })
    }

    /// [`cycle`](Self::cycle) with each page's word read by `read(granule,
    /// window, offset)`: the granule's number, the window where it is
    /// mapped now, and the page's offset in it (a multiple of [`PAGE`],
    /// below the granule's bytes).
    #[inline(always)]
    pub fn cycle_with(&mut self, how: Cycle, mut read: impl FnMut(usize, *const u8, usize) -> u64) -> u64 {
        let granule = self.next;
        let len = self.granule * PAGE;
        let offset = (self.next * len) as libc::off_t;
        self.next = (self.next + 1) % self.granules;
        // SAFETY: the window is ours; MAP_FIXED replaces only what this
        // cycle put there (the reservation, or the previous granule, which
        // nothing refers to any more).
        let p = unsafe {
            libc::mmap(
                self.win.cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                self.fd.as_raw_fd(),
                offset,
            )
        };
        assert_eq!(p.cast::<u8>(), self.win, "mmap(MAP_FIXED): {}", io::Error::last_os_error());
        let mut sum = 0u64;
        for off in (0..len).step_by(PAGE) {
            sum = sum.wrapping_add(read(granule, self.win, off));
        }
        if how == Cycle::Strict {
            // SAFETY: as above: ours, and nothing refers to it.
            let p = unsafe {
                libc::mmap(
                    self.win.cast(),
                    len,
                    libc::PROT_NONE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            assert_eq!(p.cast::<u8>(), self.win, "mmap(PROT_NONE): {}", io::Error::last_os_error());
        }
        sum
    }
}

impl Drop for RawMap {
    fn drop(&mut self) {
        // SAFETY: the reservation (and whatever the cycles left in it) is
        // ours alone.
        unsafe { libc::munmap(self.reserved.0.cast(), self.reserved.1) };
    }
}

// === what the cycles are timed with ===

/// `LWBUF_BENCH_CLOCK=cpu`: the calling thread's own CPU time (system time
/// included, time spent preempted by other processes not), as in
/// `benches/lwbuf.rs`; otherwise wall time.
pub fn cpu_clock() -> bool {
    std::env::var("LWBUF_BENCH_CLOCK").as_deref() == Ok("cpu")
}

/// A group name, with `_cpu` under the CPU clock (criterion keeps the two
/// apart).
pub fn group(name: &str) -> String {
    if cpu_clock() {
        format!("{name}_cpu")
    } else {
        name.to_owned()
    }
}

/// A reading of the clock [`cpu_clock`] chose (an arbitrary origin).
pub fn now() -> std::time::Duration {
    if cpu_clock() {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `ts` is a valid, writable timespec; the clock id is a
        // constant Linux supports.
        let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        assert_eq!(r, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
        std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    } else {
        static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        ORIGIN.get_or_init(std::time::Instant::now).elapsed()
    }
}

/// The configurations measured: granules of 1, 16, 64 and 512 small pages,
/// and one huge page (512 frames) when `huge_needed` huge pages are free.
/// Each with a name for the benchmark ids.
pub fn configs(huge_needed: usize, who: &str) -> Vec<Config> {
    let mut v: Vec<Config> = [1, 16, 64, 512].into_iter().map(|g| Config { granule: g, huge: false }).collect();
    match huge_pages_free() {
        Some((free, size)) if free >= huge_needed && size % PAGE == 0 => {
            v.push(Config { granule: size / PAGE, huge: true })
        }
        Some((free, _)) => println!(
            "{who}: hugetlb cycle skipped: {free} huge pages free, {huge_needed} needed \
             (as root: echo {huge_needed} > /proc/sys/vm/nr_hugepages, and put the old value back after)"
        ),
        None => println!("{who}: hugetlb cycle skipped: the kernel has no huge pages"),
    }
    v
}

/// One measured configuration.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// Frames (4 KiB) per granule.
    pub granule: usize,
    /// On huge-page memory.
    pub huge: bool,
}

impl Config {
    /// Bytes of memory to go round.
    pub fn bytes(self) -> usize {
        if self.huge {
            HUGE_PAGES * self.granule * PAGE
        } else {
            SMALL_BYTES
        }
    }

    /// `g16`, `g512_huge`: the suffix of a benchmark id.
    pub fn id(self) -> String {
        format!("g{}{}", self.granule, if self.huge { "_huge" } else { "" })
    }
}
