//! [`Via`]: what a [`Sender`](super::Sender) sends with, one variant per
//! [`Mode`] holding exactly the source that mode needs. The one place a
//! mode's sources are built and checked ([`Via::build`]) and a send is
//! dispatched to its path ([`Plain::send`]).
//!
//! A new mode is an entry in `mode.rs` and, here, a variant, its arm in
//! `build`, and its arms in the matches below (the compiler lists them: no
//! match here has a wildcard arm over the modes).

use std::ops::Range;
use std::os::fd::BorrowedFd;
use std::sync::Arc;

use super::cache::{CacheStats, LwbufSource, SfBufSource};
use super::engine::{send_copy, send_mapped};
use super::file::PageFile;
use super::mode::Mode;
use super::source::{DirectMapSource, MapSource, WindowSource};
use super::{SendOptions, SendStats};
use crate::error::{Error, Result};
use crate::mmu::{Mmu, MmuStats, Window};
use crate::phys::{Backing, PhysMem};

/// The sources of one mode. The two modes whose connections hold pages
/// past a send have their own variants (their per-connection state is in
/// `conn.rs`); every other mode is [`Plain`].
// One per server, built once and never moved on a send: boxing the large
// variants would only add a load to every send.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(super) enum Via {
    /// [`Mode::Sendfile`]: `sendfile(2)` from the memfd (checked to be one).
    Sendfile,
    /// [`Mode::ZeroCopy`]: `MSG_ZEROCOPY` from the direct map.
    ZeroCopy(DirectMapSource),
    /// A mode whose connections keep nothing between requests.
    Plain(Plain),
}

/// The modes whose connections keep nothing between requests (but
/// copy's buffer): each sends through its source alone.
#[allow(clippy::large_enum_variant)] // as for `Via`
#[derive(Debug)]
pub(super) enum Plain {
    /// [`Mode::Copy`]: copies out of the direct map (checked to exist).
    Copy,
    /// [`Mode::MmapPerRequest`].
    MmapPerRequest(WindowSource),
    /// [`Mode::DirectMap`].
    DirectMap(DirectMapSource),
    /// [`Mode::SfBuf`].
    SfBuf(SfBufSource),
    /// [`Mode::Lwbuf`]: one page per mapping.
    Lwbuf(LwbufSource),
    /// [`Mode::LwbufRun`]: runs of up to [`SendOptions::max_run`] pages.
    LwbufRun(LwbufSource),
}

impl Via {
    /// The sources of `mode` for files in `phys`. A window-based mode maps
    /// through `mmu` if given (all of its slots), else through a new
    /// [`Window`] sized from `opts` (one `mmap`); any other mode refuses an
    /// `mmu`. Errors: [`Error::NoDirectMap`] for the direct-map modes
    /// without one, [`Error::Config`] for sendfile or a window over heap
    /// memory, or an `mmu` for a mode without a window.
    pub(super) fn build(mode: Mode, phys: &PhysMem, mmu: Option<Arc<dyn Mmu>>, opts: &SendOptions) -> Result<Via> {
        if mmu.is_some() && !mode.uses_window() {
            return Err(Error::config("mode", format!("{mode} maps through no window")));
        }
        let plain = match mode {
            Mode::Sendfile if phys.backing() == Backing::Heap => {
                return Err(Error::config("backing", "sendfile needs memfd-backed memory"))
            }
            Mode::Sendfile => return Ok(Via::Sendfile),
            Mode::ZeroCopy => return Ok(Via::ZeroCopy(DirectMapSource::new(phys)?)),
            Mode::Copy if !phys.has_direct_map() => return Err(Error::NoDirectMap),
            Mode::Copy => Plain::Copy,
            Mode::DirectMap => Plain::DirectMap(DirectMapSource::new(phys)?),
            Mode::MmapPerRequest => {
                Plain::MmapPerRequest(WindowSource::new(window(mmu, phys, || Ok(opts.window_slots))?)?)
            }
            Mode::SfBuf => {
                let mmu = window(mmu, phys, || Ok(opts.window_slots))?;
                let cap = mmu.capacity();
                let mut b =
                    crate::SfPool::builder(mmu).max_excess(opts.max_excess.unwrap_or(cap)).reclaim(opts.reclaim);
                b = b.granule(granule(opts, phys, cap));
                Plain::SfBuf(SfBufSource::new(b.build()?, opts.max_run, opts.stall_timeout))
            }
            Mode::Lwbuf => Plain::Lwbuf(lwbuf(mmu, phys, opts, 1)?),
            Mode::LwbufRun => Plain::LwbufRun(lwbuf(mmu, phys, opts, opts.max_run)?),
        };
        Ok(Via::Plain(plain))
    }

    /// The mode these are the sources of.
    pub(super) fn mode(&self) -> Mode {
        match self {
            Via::Sendfile => Mode::Sendfile,
            Via::ZeroCopy(_) => Mode::ZeroCopy,
            Via::Plain(p) => p.mode(),
        }
    }

    /// The window's MMU counters, for the modes with a window.
    pub(super) fn mmu_stats(&self) -> Option<MmuStats> {
        match self {
            Via::Sendfile | Via::ZeroCopy(_) => None,
            Via::Plain(p) => p.mmu_stats(),
        }
    }

    /// Hits and lookups of the mapping cache, for the modes with one.
    pub(super) fn cache_stats(&self) -> Option<CacheStats> {
        match self {
            Via::Sendfile | Via::ZeroCopy(_) => None,
            Via::Plain(p) => p.cache_stats(),
        }
    }
}

impl Plain {
    fn mode(&self) -> Mode {
        match self {
            Plain::Copy => Mode::Copy,
            Plain::MmapPerRequest(_) => Mode::MmapPerRequest,
            Plain::DirectMap(_) => Mode::DirectMap,
            Plain::SfBuf(_) => Mode::SfBuf,
            Plain::Lwbuf(_) => Mode::Lwbuf,
            Plain::LwbufRun(_) => Mode::LwbufRun,
        }
    }

    fn mmu_stats(&self) -> Option<MmuStats> {
        match self {
            Plain::Copy => None,
            Plain::MmapPerRequest(w) => w.mmu_stats(),
            Plain::DirectMap(d) => d.mmu_stats(),
            Plain::SfBuf(p) => p.mmu_stats(),
            Plain::Lwbuf(l) | Plain::LwbufRun(l) => l.mmu_stats(),
        }
    }

    fn cache_stats(&self) -> Option<CacheStats> {
        match self {
            Plain::Copy | Plain::MmapPerRequest(_) | Plain::DirectMap(_) => None,
            Plain::SfBuf(p) => Some(p.cache_stats()),
            Plain::Lwbuf(l) | Plain::LwbufRun(l) => Some(l.cache_stats()),
        }
    }

    /// Send `header` and then `range` of `file` on `fd` (`buf`: copy's
    /// buffer, kept by the connection).
    pub(super) fn send(
        &self,
        fd: BorrowedFd<'_>,
        file: &PageFile,
        range: Range<u64>,
        header: &[u8],
        buf: &mut Vec<u8>,
        opts: &SendOptions,
    ) -> Result<SendStats> {
        match self {
            Plain::Copy => send_copy(fd, file, range, header, buf, opts),
            Plain::MmapPerRequest(w) => send_mapped(fd, file, range, header, w, opts),
            Plain::DirectMap(d) => send_mapped(fd, file, range, header, d, opts),
            Plain::SfBuf(p) => send_mapped(fd, file, range, header, p, opts),
            // Every mapping is released before `send_mapped` returns, so a
            // thread that is no worker of the sender can borrow a CPU for it.
            Plain::Lwbuf(l) | Plain::LwbufRun(l) => l.with_cpu(|| send_mapped(fd, file, range, header, l, opts)),
        }
    }
}

/// The MMU a window-based mode maps through: `given`, or a new [`Window`]
/// of `slots()` slots of `phys` (one `mmap(PROT_NONE)`).
fn window(given: Option<Arc<dyn Mmu>>, phys: &PhysMem, slots: impl FnOnce() -> Result<usize>) -> Result<Arc<dyn Mmu>> {
    match given {
        Some(mmu) => Ok(mmu),
        None => Ok(Arc::new(Window::builder(phys).slots(slots()?).read_only(true).build()?)),
    }
}

/// Lwbuf caches for [`SendOptions::cpus`] CPUs mapping runs of up to
/// `max_run` pages; a new window has [`SendOptions::window_slots`] slots
/// per CPU (every CPU maps, and caches, what it sends itself).
fn lwbuf(given: Option<Arc<dyn Mmu>>, phys: &PhysMem, opts: &SendOptions, max_run: usize) -> Result<LwbufSource> {
    let cpus = opts.lwbuf_cpus();
    let mmu = window(given, phys, || {
        cpus.checked_mul(opts.window_slots)
            .ok_or_else(|| Error::config("window_slots", format!("{cpus} x {} slots overflow", opts.window_slots)))
    })?;
    let share = (mmu.capacity() / cpus.max(1)).max(1);
    let mut b =
        crate::Lwbufs::builder(mmu).cpus(cpus).max_excess(opts.max_excess.unwrap_or(share)).reclaim(opts.reclaim);
    b = b.granule(granule(opts, phys, share));
    Ok(LwbufSource::new(b.build()?, max_run))
}

/// The mapping granule of a cache whose window (or share of one) has
/// `slots` slots: [`SendOptions::granule`], or [`DEFAULT_GRANULE`] frames
/// but at most a sixteenth of the slots (so the cache holds at least 16
/// granules), and at least the memory's smallest.
fn granule(opts: &SendOptions, phys: &PhysMem, slots: usize) -> usize {
    opts.granule.unwrap_or_else(|| {
        let sixteenth = (slots / 16).max(1);
        let fit = 1 << (usize::BITS - 1 - sixteenth.leading_zeros());
        super::DEFAULT_GRANULE.min(fit).max(phys.min_granule())
    })
}
