//! Sending a response from the caches on tokio: a byte range of a file is
//! mapped with owned handles ([`OwnedSfBuf`], [`OwnedLwbuf`]), queued behind
//! the response head, and written with `sendmsg` from the mappings
//! ([`IoVec::send_vectored`]) whenever the socket is writable
//! (`TcpStream::writable` + `try_io`). The handles are held across every
//! `.await` until the kernel has taken their last byte, and a task may wake
//! up on another worker (another CPU of the lwbuf caches) than the one that
//! mapped them: the pieces of a batch are therefore made again after every
//! wait, with `kva()` on the CPU the task now runs on (a field read on the
//! handle's home CPU; elsewhere that CPU's own entry, as the cpumask
//! protocol requires). The release of a handle dropped away from home goes
//! to its home CPU by mailbox.
//!
//! The same walk over a range as the library's `send_mapped` (a chunk grid
//! for run mappings, a batch sent at `IOV_MAX` pieces or `batch_bytes`),
//! without its blocking parts: a full cache never blocks a worker thread
//! (`Wait::NoWait`); the request first sends and releases what it holds,
//! and with nothing held it yields to the other tasks until a release makes
//! room (up to the stall limit).

use std::collections::VecDeque;
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lwbuf::sendfile::{PageFile, SendStats, Sender};
use lwbuf::{Error, IoVec, Lwbufs, OwnedLwbuf, OwnedSfBuf, Page, SfPool, Wait, IOV_MAX};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// The caches of a [`Sender`] the tokio server maps through, shared by
/// every task (the `Arc`s the owned handles keep).
#[derive(Clone)]
pub enum Caches {
    /// The sf_buf pool: runs of up to `max_run` pages per mapping.
    SfBuf { pool: Arc<SfPool>, max_run: usize },
    /// The per-CPU lwbuf caches: one page per mapping (`max_run` 1) or runs.
    Lwbuf { lw: Arc<Lwbufs>, max_run: usize },
}

impl Caches {
    /// The caches `sender` built (its mode must be a caching one).
    pub fn of(sender: &Sender) -> Result<Caches, String> {
        if let Some(s) = sender.sfbuf() {
            return Ok(Caches::SfBuf { pool: Arc::clone(s.pool()), max_run: s.max_run() });
        }
        if let Some(l) = sender.lwbuf() {
            return Ok(Caches::Lwbuf { lw: Arc::clone(l.lwbufs()), max_run: l.max_run() });
        }
        crate::modes::tokio_runs(sender.mode())?;
        Err(format!("{}: the sender has no cache", sender.mode()))
    }

    /// The lwbuf caches, whose CPUs the workers bind.
    pub fn lwbufs(&self) -> Option<&Arc<Lwbufs>> {
        match self {
            Caches::Lwbuf { lw, .. } => Some(lw),
            Caches::SfBuf { .. } => None,
        }
    }

    fn max_run(&self) -> usize {
        match self {
            Caches::SfBuf { max_run, .. } | Caches::Lwbuf { max_run, .. } => *max_run,
        }
    }

    /// The caches' mapping granule, in frames.
    fn granule(&self) -> usize {
        match self {
            Caches::SfBuf { pool, .. } => pool.granule(),
            Caches::Lwbuf { lw, .. } => lw.granule(),
        }
    }

    /// The block the batches prefault once (see [`Held::io_vec`]): what one
    /// read fault maps (the kernel's 64 KiB fault-around block, or a whole
    /// huge page), when a granule holds whole blocks (windows are aligned
    /// to them); else 0, and every piece is touched.
    fn prefault_block(&self) -> usize {
        let mmu = match self {
            Caches::SfBuf { pool, .. } => pool.mmu(),
            Caches::Lwbuf { lw, .. } => lw.mmu(),
        };
        let phys = mmu.phys();
        let block = (phys.min_granule() * phys.frame_size()).max(64 << 10);
        if self.granule() * phys.frame_size() >= block {
            block
        } else {
            0
        }
    }

    /// The chunk grid to walk a file's runs by, as the library's sources
    /// give `send_mapped` (`sendfile::chunk_grid`).
    fn grid(&self) -> Option<usize> {
        lwbuf::sendfile::chunk_grid(self.max_run(), self.granule())
    }

    /// Map a prefix of `run` (pages with contiguous frames) as one mapping:
    /// as much as the library's sources map (`sendfile::mapping_len`: at
    /// most `max_run` pages, never past the first page's granule). Never
    /// waits.
    fn map(&self, run: &[Page]) -> lwbuf::Result<Held> {
        let n = lwbuf::sendfile::mapping_len(run, self.max_run(), self.granule()).max(1);
        Ok(match self {
            Caches::SfBuf { pool, .. } if n == 1 => Held::Sf(pool.alloc_owned(&run[0], Wait::NoWait)?),
            Caches::SfBuf { pool, .. } => Held::Sf(pool.alloc_run_owned(&run[..n], Wait::NoWait)?),
            Caches::Lwbuf { lw, .. } if n == 1 => Held::Lw(lw.alloc_owned(&run[0])?),
            Caches::Lwbuf { lw, .. } => Held::Lw(lw.alloc_run_owned(&run[..n])?),
        })
    }
}

/// A mapping held until its bytes are sent: `'static + Send`, so the task
/// holding it may be suspended and resumed on any worker.
enum Held {
    Sf(OwnedSfBuf),
    Lw(OwnedLwbuf),
}

impl Held {
    fn pages(&self) -> usize {
        match self {
            Held::Sf(h) => h.pages().len(),
            Held::Lw(h) => h.pages().len(),
        }
    }

    /// Bytes `at..at + len` of the mapping as a piece of a batch, at the
    /// address valid on the calling thread's CPU.
    /// Its pages are faulted in from user mode first (`Kaddr::prefault`),
    /// so that the kernel's copy out of a fresh mapping does not wait
    /// behind other threads' `mmap`s: here rather than when the piece was
    /// mapped, because a task resumed on another worker gets that CPU's
    /// own lwbuf mapping. With `block` > 0, a block the batch's previous
    /// piece touched (`last`) is not touched again: single pages of one
    /// granule would otherwise each cost a cache miss here.
    fn io_vec(&self, at: usize, len: usize, block: usize, last: &mut Option<usize>) -> lwbuf::Result<IoVec<'_>> {
        let k = match self {
            Held::Sf(h) => h.kva(),
            Held::Lw(h) => h.kva()?,
        };
        let iov = k.io_vec(at, len)?;
        let start = iov.as_ptr() as usize;
        let mut from = at;
        if block > 0 && *last == Some(start / block) {
            from = at + (block - start % block).min(len);
        }
        k.prefault(from, at + len - from)?;
        if block > 0 && len >= 8 {
            *last = Some((start + len - 1) / block);
        }
        Ok(iov)
    }
}

/// How the server sends: the batch limit and how long a response may wait
/// for the socket, or for room in the caches.
#[derive(Clone, Copy, Debug)]
pub struct SendLimits {
    pub batch_bytes: usize,
    pub stall: Option<Duration>,
}

/// Where and how a response goes: the socket, the limits, and the counter
/// of waits for the socket (counted as they happen, not per response).
#[derive(Clone, Copy)]
pub struct Out<'a> {
    pub stream: &'a TcpStream,
    pub lim: &'a SendLimits,
    pub waits: &'a AtomicU64,
}

/// A mapping's bytes still to send.
struct Piece {
    held: Held,
    at: usize,
    len: usize,
}

/// The head's unsent bytes, then the pieces, in order.
struct Queue<'h> {
    head: &'h [u8],
    pieces: VecDeque<Piece>,
    bytes: usize,
    /// See [`Caches::prefault_block`].
    block: usize,
}

impl Queue<'_> {
    fn is_empty(&self) -> bool {
        self.head.is_empty() && self.pieces.is_empty()
    }

    /// The next batch (at most `IOV_MAX` pieces), made on the calling
    /// thread's CPU.
    fn batch(&self) -> lwbuf::Result<Vec<IoVec<'_>>> {
        let n = (usize::from(!self.head.is_empty()) + self.pieces.len()).min(IOV_MAX);
        let mut v = Vec::with_capacity(n);
        if !self.head.is_empty() {
            v.push(IoVec::from_slice(self.head));
        }
        // The batch's pieces are all held while it is made and sent: a
        // block touched for one stays faulted in for the next.
        let mut last = None;
        for p in self.pieces.iter().take(n - v.len()) {
            v.push(p.held.io_vec(p.at, p.len, self.block, &mut last)?);
        }
        Ok(v)
    }

    /// The kernel took `n` bytes: drop the handles whose bytes are all sent
    /// (the release; away from home, a message to the home CPU).
    fn advance(&mut self, mut n: usize) {
        let h = n.min(self.head.len());
        self.head = &self.head[h..];
        n -= h;
        while n > 0 {
            let Some(front) = self.pieces.front_mut() else { break };
            if n < front.len {
                front.at += n;
                front.len -= n;
                self.bytes -= n;
                break;
            }
            n -= front.len;
            self.bytes -= front.len;
            self.pieces.pop_front();
        }
    }
}

/// Whether a cache error means "nothing free now" (release what is held and
/// ask again), as the library's send engine decides.
fn no_room(e: &Error) -> bool {
    matches!(e, Error::WindowFull { .. } | Error::MapLimit { .. } | Error::WouldBlock)
        || e.errno() == Some(libc::ENOMEM)
}

/// Waiting for room in the caches with nothing held: yield to the tasks
/// that hold mappings (their sends release them), a few times, then sleep a
/// millisecond between tries; fail after the stall limit.
struct RoomWait {
    since: Option<Instant>,
    tries: u32,
}

impl RoomWait {
    fn new() -> RoomWait {
        RoomWait { since: None, tries: 0 }
    }

    async fn wait(&mut self, e: Error, stall: Option<Duration>) -> io::Result<()> {
        let since = *self.since.get_or_insert_with(Instant::now);
        if stall.is_some_and(|d| since.elapsed() >= d) {
            return Err(e.into());
        }
        self.tries += 1;
        if self.tries <= 16 {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }
}

/// Send everything queued: wait for the socket to be writable, make the
/// batch on this CPU, one `sendmsg`, release what it covered; again until
/// the queue is empty.
async fn flush(out: &Out<'_>, q: &mut Queue<'_>, st: &mut SendStats) -> io::Result<()> {
    let Out { stream, lim, waits } = *out;
    let mut room = RoomWait::new();
    while !q.is_empty() {
        match lim.stall {
            Some(d) => tokio::time::timeout(d, stream.writable()).await.map_err(|_| io::ErrorKind::TimedOut)??,
            None => stream.writable().await?,
        }
        // After the await: the task may run on another CPU than before.
        let batch = match q.batch() {
            Ok(b) => b,
            // This CPU has no room for its own entries of the handles.
            Err(e) if no_room(&e) => {
                room.wait(e, lim.stall).await?;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        // Built before `try_io`, so that only the socket's own EAGAIN
        // clears its readiness.
        match stream.try_io(Interest::WRITABLE, || IoVec::send_vectored(stream, &batch, 0)) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                drop(batch);
                st.calls += 1;
                st.bytes += n as u64;
                q.advance(n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                st.waits += 1;
                waits.fetch_add(1, Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Send `head` alone (an error, a redirect, a 304, the answer to a HEAD).
pub async fn send_head(out: &Out<'_>, head: &[u8]) -> io::Result<SendStats> {
    let mut st = SendStats::default();
    let mut q = Queue { head, pieces: VecDeque::new(), bytes: 0, block: 0 };
    flush(out, &mut q, &mut st).await?;
    Ok(st)
}

/// Send `head` and then bytes `range` of `file`, from mappings of `caches`
/// held across the waits for the socket.
pub async fn send_file(
    out: &Out<'_>,
    head: &[u8],
    file: &PageFile,
    range: Range<u64>,
    caches: &Caches,
) -> io::Result<SendStats> {
    let lim = out.lim;
    let runs = file.runs(range).map_err(io::Error::from)?;
    let mut st = SendStats::default();
    let mut q = Queue { head, pieces: VecDeque::new(), bytes: 0, block: caches.prefault_block() };
    let fs = file.page_size();
    let grid = caches.grid();
    for run in runs {
        // As `send_mapped`: with a grid, ask for the chunk of the file's run
        // that holds page `idx`, so that every request maps (and finds) the
        // same chunks.
        let chunks = run.chunks(file, grid);
        let (mut idx, mut off, mut left) = (run.index, run.offset, run.len);
        let mut room = RoomWait::new();
        while left > 0 {
            let Range { start: from, end: to } = chunks.at(idx);
            let held = match caches.map(file.pages_at(from..to)) {
                Ok(h) => h,
                // Nothing free: send and release what this request holds.
                Err(e) if no_room(&e) && !q.pieces.is_empty() => {
                    flush(out, &mut q, &mut st).await?;
                    continue;
                }
                Err(e) if no_room(&e) => {
                    room.wait(e, lim.stall).await?;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            st.mappings += 1;
            let npages = held.pages();
            let at = (idx - from) * fs + off;
            let take = left.min(npages * fs - at);
            q.bytes += take;
            q.pieces.push_back(Piece { held, at, len: take });
            idx = from + npages;
            off = 0;
            left -= take;
            if q.pieces.len() >= IOV_MAX - 1 || q.bytes >= lim.batch_bytes {
                flush(out, &mut q, &mut st).await?;
            }
        }
    }
    flush(out, &mut q, &mut st).await?;
    Ok(st)
}
