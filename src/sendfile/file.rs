//! [`PageFile`]: the page-cache stand-in, a file whose pages are frames of a
//! [`PhysMem`], laid out in runs of contiguous frames; or a view of some
//! pages of a file held elsewhere ([`PageFile::from_pages`]: the pages a
//! [`PageCache`](crate::pagecache::PageCache) pinned for one request).

use std::fmt;
use std::io::Read;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::pattern::Pattern;
use crate::error::{Error, Result};
use crate::phys::{Page, Pfn, PhysMem};

/// Bytes copied per step when loading content.
const LOAD_CHUNK: usize = 1 << 20;

/// One allocation unit of a file: `len` pages from page index `first`, whose
/// frames are contiguous.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Extent {
    first: usize,
    len: usize,
}

/// Builds a [`PageFile`]. See [`PageFile::builder`].
#[derive(Clone, Debug)]
#[must_use = "a builder does nothing until it is built"]
pub struct PageFileBuilder {
    phys: PhysMem,
    max_run: usize,
}

impl PageFileBuilder {
    /// The longest run of contiguous frames to allocate at once, in pages
    /// (default: unlimited). A small value mimics a fragmented page cache:
    /// each run is sent, mapped or `sendfile`d as its own piece, even when two
    /// runs happen to be adjacent. 0 is treated as 1.
    pub fn max_run(mut self, pages: usize) -> Self {
        self.max_run = pages.max(1);
        self
    }

    /// A file of `len` bytes of the deterministic [`Pattern`] of `seed`.
    pub fn pattern(self, len: u64, seed: u64) -> Result<PageFile> {
        let file = self.alloc(len)?;
        let pat = Pattern::new(seed);
        let mut buf = vec![0u8; LOAD_CHUNK.min(len as usize)];
        let mut off = 0u64;
        while off < len {
            let n = (len - off).min(buf.len() as u64) as usize;
            pat.fill(off, &mut buf[..n]);
            file.write_at(off, &buf[..n])?;
            off += n as u64;
        }
        Ok(file)
    }

    /// A file holding a copy of `bytes`.
    pub fn bytes(self, bytes: &[u8]) -> Result<PageFile> {
        let file = self.alloc(bytes.len() as u64)?;
        file.write_at(0, bytes)?;
        Ok(file)
    }

    /// A copy of the file at `path` as it is now (later changes to the file
    /// are not seen). Reads it with `pread` in 1 MiB steps.
    pub fn path(self, path: impl AsRef<Path>) -> Result<PageFile> {
        let sys = |op: &'static str| move |source| Error::Sys { op, source };
        let f = std::fs::File::open(path.as_ref()).map_err(sys("open"))?;
        let meta = f.metadata().map_err(sys("fstat"))?;
        if !meta.is_file() {
            return Err(Error::config("path", format!("{} is not a regular file", path.as_ref().display())));
        }
        let len = meta.len();
        let file = self.alloc(len)?;
        let mut buf = vec![0u8; LOAD_CHUNK.min(len as usize)];
        let mut off = 0u64;
        while off < len {
            let n = (len - off).min(buf.len() as u64) as usize;
            // A file that shrank under us ends in UnexpectedEof: an error,
            // not a file with a stale tail.
            f.read_exact_at(&mut buf[..n], off).map_err(sys("pread"))?;
            file.write_at(off, &buf[..n])?;
            off += n as u64;
        }
        Ok(file)
    }

    /// A file of the first `len` bytes read from `reader` (fewer if it ends
    /// first: the file is then as long as what was read).
    pub fn reader(self, reader: impl Read, len: u64) -> Result<PageFile> {
        let mut data = Vec::new();
        reader.take(len).read_to_end(&mut data).map_err(|source| Error::Sys { op: "read", source })?;
        self.bytes(&data)
    }

    /// Allocate the frames of a `len`-byte file (zero-filled content is not
    /// guaranteed: frames are reused).
    fn alloc(self, len: u64) -> Result<PageFile> {
        let fs = self.phys.frame_size() as u64;
        let npages = usize::try_from(len.div_ceil(fs))
            .map_err(|_| Error::config("len", format!("{len} bytes do not fit the address space")))?;
        let mut pages = Vec::with_capacity(npages);
        let mut extents = Vec::new();
        let mut want = self.max_run;
        while pages.len() < npages {
            let n = want.min(npages - pages.len());
            match self.phys.alloc_run(n) {
                Ok(run) => {
                    extents.push(Extent { first: pages.len(), len: n });
                    pages.extend(run);
                }
                // No run that long is free: take the longest there is (or half,
                // if frees raced with us) and go on. `want` only shrinks, so
                // this ends, with an error once even one frame cannot be had.
                Err(Error::OutOfFrames { largest_run, .. }) if n > 1 => {
                    want = if largest_run > 0 && largest_run < n { largest_run } else { n / 2 };
                }
                Err(e) => return Err(e),
            }
        }
        Ok(PageFile { phys: self.phys, len, pages, extents, first: 0 })
    }
}

/// A file in the page-cache stand-in: `len` bytes in pages of `frame_size`
/// bytes (the last one partial), each a held frame of one [`PhysMem`], laid
/// out as runs of contiguous frames.
///
/// The file holds its pages for as long as it lives; senders that must keep
/// a page beyond a call (sendfile, `MSG_ZEROCOPY`) clone its [`Page`].
/// Cloning a `PageFile` clones every hold.
///
/// A *view* ([`from_pages`](Self::from_pages)) holds only pages
/// `first_page..first_page + page_count` of a file of [`len`](Self::len)
/// bytes: byte ranges and page indices stay the file's own, and a range
/// outside the held pages is [`Error::OutOfBounds`]. Every send path takes
/// a view as it takes a whole file.
///
/// ```
/// use lwbuf::PhysMem;
/// use lwbuf::sendfile::PageFile;
/// let mem = PhysMem::builder().frames(64).build()?;
/// let file = PageFile::pattern(&mem, 10_000, 1)?; // 3 pages, the last partial
/// assert_eq!(file.page_count(), 3);
/// let runs: Vec<_> = file.runs(100..9_000)?.collect();
/// assert_eq!(runs.len(), 1); // one contiguous run of frames
/// assert_eq!((runs[0].offset, runs[0].len, runs[0].pages.len()), (100, 8_900, 3));
/// # Ok::<(), lwbuf::Error>(())
/// ```
#[derive(Clone)]
pub struct PageFile {
    phys: PhysMem,
    len: u64,
    pages: Vec<Page>,
    /// Runs of contiguous frames, as indices into `pages`.
    extents: Vec<Extent>,
    /// The file's page index of `pages[0]` (0 for a whole file).
    first: usize,
}

impl PageFile {
    /// A builder that allocates frames of `phys`.
    pub fn builder(phys: &PhysMem) -> PageFileBuilder {
        PageFileBuilder { phys: phys.clone(), max_run: usize::MAX }
    }

    /// A generated file: `len` bytes of [`Pattern::new(seed)`](Pattern).
    pub fn pattern(phys: &PhysMem, len: u64, seed: u64) -> Result<PageFile> {
        Self::builder(phys).pattern(len, seed)
    }

    /// A copy of a file on disk.
    pub fn from_path(phys: &PhysMem, path: impl AsRef<Path>) -> Result<PageFile> {
        Self::builder(phys).path(path)
    }

    /// A copy of `bytes`.
    pub fn from_bytes(phys: &PhysMem, bytes: &[u8]) -> Result<PageFile> {
        Self::builder(phys).bytes(bytes)
    }

    /// A view of pages `first_page..first_page + pages.len()` of a file of
    /// `len` bytes, whose frames are `pages` (holds, e.g. from
    /// [`CachedFile::pages`](crate::pagecache::CachedFile::pages)): the view
    /// keeps them for as long as it lives, and the send paths clone the
    /// holds they must keep past a call, as for a whole file. Runs of
    /// contiguous frames are found by their frame numbers (one pass, no
    /// system call). Errors: [`Error::ForeignPage`] for a page of another
    /// memory than `phys`; [`Error::OutOfBounds`] for pages beyond the end
    /// of the file.
    ///
    /// ```
    /// use lwbuf::PhysMem;
    /// use lwbuf::sendfile::{PageFile, Pattern};
    /// let mem = PhysMem::builder().frames(64).build()?;
    /// let whole = PageFile::pattern(&mem, 40_000, 3)?; // 10 pages
    /// // Pages 4..7 of it, as a page cache would hand them out.
    /// let view = PageFile::from_pages(&mem, whole.pages()[4..7].to_vec(), 4, whole.len())?;
    /// let mut buf = vec![0u8; 10_000];
    /// view.read_at(17_000, &mut buf)?;       // file offsets, as in the whole file
    /// assert_eq!(Pattern::new(3).check(17_000, &buf), None);
    /// assert!(view.read_at(100, &mut buf[..10]).is_err()); // page 0 is not held
    /// # Ok::<(), lwbuf::Error>(())
    /// ```
    pub fn from_pages(phys: &PhysMem, pages: Vec<Page>, first_page: usize, len: u64) -> Result<PageFile> {
        let fs = phys.frame_size() as u64;
        let end = first_page
            .checked_add(pages.len())
            .filter(|&e| pages.is_empty() || (e as u64 - 1).saturating_mul(fs) < len);
        if end.is_none() {
            let clamp = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
            return Err(Error::OutOfBounds {
                offset: clamp((first_page as u64).saturating_mul(fs)),
                len: clamp((pages.len() as u64).saturating_mul(fs)),
                size: clamp(len),
            });
        }
        let mut extents: Vec<Extent> = Vec::new();
        for (i, p) in pages.iter().enumerate() {
            if !p.phys().same_as(phys) {
                return Err(Error::ForeignPage);
            }
            match extents.last_mut() {
                Some(e) if pages[i - 1].pfn().0 + 1 == p.pfn().0 => e.len += 1,
                _ => extents.push(Extent { first: i, len: 1 }),
            }
        }
        Ok(PageFile { phys: phys.clone(), len, pages, extents, first: first_page })
    }

    /// The file's page index of the first page held: 0 for a whole file,
    /// `first_page` for a view ([`from_pages`](Self::from_pages)).
    pub fn first_page(&self) -> usize {
        self.first
    }

    /// The memory the pages live in.
    pub fn phys(&self) -> &PhysMem {
        &self.phys
    }

    /// The file's length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the file has no bytes (and no pages).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes per page (the frame size).
    pub fn page_size(&self) -> usize {
        self.phys.frame_size()
    }

    /// Pages held: for a whole file, `len / page_size` rounded up.
    pub fn page_count(&self) -> usize {
        self.pages.len()
    }

    /// The page holding bytes `index * page_size ..`, if the file holds it.
    pub fn page(&self, index: usize) -> Option<&Page> {
        self.pages.get(index.checked_sub(self.first)?)
    }

    /// Every page held, in file order, from page
    /// [`first_page`](Self::first_page).
    pub fn pages(&self) -> &[Page] {
        &self.pages
    }

    /// The held pages of file page indices `indices` (each held: they come
    /// from [`runs`](Self::runs) or [`run_of`](Self::run_of)). Panics on a
    /// page not held.
    pub fn pages_at(&self, indices: Range<usize>) -> &[Page] {
        &self.pages[indices.start - self.first..indices.end - self.first]
    }

    /// Runs of contiguous frames the file is made of.
    pub fn run_count(&self) -> usize {
        self.extents.len()
    }

    fn check(&self, range: &Range<u64>) -> Result<()> {
        let fs = self.page_size() as u64;
        let held = self.first as u64 * fs..(self.first + self.pages.len()) as u64 * fs;
        if range.start > range.end
            || range.end > self.len
            || (!range.is_empty() && (range.start < held.start || range.end > held.end))
        {
            let clamp = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
            return Err(Error::OutOfBounds {
                offset: clamp(range.start),
                len: clamp(range.end.saturating_sub(range.start)),
                size: clamp(self.len),
            });
        }
        Ok(())
    }

    /// The pieces of a byte range, one per run of contiguous frames, in file
    /// order: what one `sendfile(2)` call or one run mapping covers. No system
    /// call. [`Error::OutOfBounds`] if the range is not inside the file.
    pub fn runs(&self, range: Range<u64>) -> Result<Runs<'_>> {
        self.check(&range)?;
        let fs = self.page_size() as u64;
        let page = (range.start / fs) as usize;
        let slot = page.saturating_sub(self.first);
        let extent = self.extents.partition_point(|e| e.first + e.len <= slot);
        Ok(Runs { file: self, pos: range.start, end: range.end, extent })
    }

    /// The page indices of the run of contiguous frames (allocation unit)
    /// that holds page `index`, or `None` for a page not held.
    pub fn run_of(&self, index: usize) -> Option<Range<usize>> {
        let slot = index.checked_sub(self.first)?;
        let i = self.extents.partition_point(|e| e.first + e.len <= slot);
        self.extents.get(i).filter(|e| e.first <= slot).map(|e| self.first + e.first..self.first + e.first + e.len)
    }

    /// Copy bytes from `offset` into `buf` through the direct map (no system
    /// call). [`Error::OutOfBounds`] past the end, [`Error::NoDirectMap`]
    /// without a direct map.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset.saturating_add(buf.len() as u64);
        let mut done = 0;
        for run in self.runs(offset..end)? {
            let view = self.phys.direct_view(run.pfn(), run.pages.len())?;
            view.read_at(run.offset, &mut buf[done..done + run.len])?;
            done += run.len;
        }
        Ok(())
    }

    /// Copy `data` into the file's frames from `offset` (through the direct
    /// map, or `pwrite` to the memfd without one).
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        let mut done = 0;
        for run in self.runs(offset..offset + data.len() as u64)? {
            let piece = &data[done..done + run.len];
            if self.phys.has_direct_map() {
                self.phys.direct_view(run.pfn(), run.pages.len())?.write_at(run.offset, piece)?;
            } else {
                let fd = self.phys.memfd().ok_or(Error::NoDirectMap)?;
                let mut at = 0;
                while at < piece.len() {
                    let off = (run.phys_offset() + at as u64) as i64;
                    at += nix::sys::uio::pwrite(fd, &piece[at..], off).map_err(|e| Error::sys("pwrite", e))?;
                }
            }
            done += run.len;
        }
        Ok(())
    }
}

impl fmt::Debug for PageFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageFile")
            .field("len", &self.len)
            .field("first_page", &self.first)
            .field("pages", &self.pages.len())
            .field("runs", &self.extents.len())
            .finish()
    }
}

/// A piece of a byte range of a [`PageFile`] that lies in one run of
/// contiguous frames. See [`PageFile::runs`].
#[derive(Clone, Copy, Debug)]
pub struct FileRun<'a> {
    /// Index in the file of the first page.
    pub index: usize,
    /// The pages the piece touches: contiguous frames, at least one.
    pub pages: &'a [Page],
    /// Where the piece starts in the first page.
    pub offset: usize,
    /// Bytes in the piece (at least one).
    pub len: usize,
}

/// Which pages to map for a piece of a [`FileRun`]: from a page to the end
/// of the run, or, with a grid of `g` pages, the `g`-page chunk of the
/// allocation run (see [`PageFile::run_of`]) that holds it, so that every
/// request maps (and finds cached) the same chunks. Made once per run by
/// [`FileRun::chunks`].
#[derive(Clone, Debug)]
pub struct ChunkGrid {
    extent: Range<usize>,
    end: usize,
    grid: Option<usize>,
}

impl ChunkGrid {
    /// The page indices to ask for to send page `idx` onwards.
    #[inline]
    pub fn at(&self, idx: usize) -> Range<usize> {
        match self.grid {
            Some(g) => {
                let from = self.extent.start + (idx - self.extent.start) / g * g;
                from..(from + g).min(self.extent.end)
            }
            None => idx..self.end,
        }
    }
}

impl FileRun<'_> {
    /// The chunks to map this piece by, with a grid of `grid` pages
    /// (`None`, or a grid of 1, maps from a page to the piece's end).
    pub fn chunks(&self, file: &PageFile, grid: Option<usize>) -> ChunkGrid {
        let end = self.index + self.pages.len();
        let grid = grid.filter(|&g| g > 1);
        let extent = match grid {
            Some(_) => file.run_of(self.index).unwrap_or(self.index..end),
            None => self.index..end,
        };
        ChunkGrid { extent, end, grid }
    }

    /// The frame of the first page.
    pub fn pfn(&self) -> Pfn {
        self.pages[0].pfn()
    }

    /// The memfd offset of the piece's first byte: what `sendfile(2)` reads.
    pub fn phys_offset(&self) -> u64 {
        self.pages[0].offset() + self.offset as u64
    }

    /// The file offset of the piece's first byte.
    pub fn file_offset(&self) -> u64 {
        (self.index * self.pages[0].phys().frame_size() + self.offset) as u64
    }
}

/// The iterator of [`PageFile::runs`].
#[derive(Clone, Debug)]
pub struct Runs<'a> {
    file: &'a PageFile,
    pos: u64,
    end: u64,
    extent: usize,
}

impl<'a> Iterator for Runs<'a> {
    type Item = FileRun<'a>;

    fn next(&mut self) -> Option<FileRun<'a>> {
        if self.pos >= self.end {
            return None;
        }
        let fs = self.file.page_size() as u64;
        let base = self.file.first;
        let ext = *self.file.extents.get(self.extent)?;
        let page = (self.pos / fs) as usize;
        let ext_end = (base + ext.first + ext.len) as u64 * fs;
        let stop = self.end.min(ext_end);
        let last = ((stop - 1) / fs) as usize;
        let run = FileRun {
            index: page,
            pages: &self.file.pages[page - base..=last - base],
            offset: (self.pos % fs) as usize,
            len: (stop - self.pos) as usize,
        };
        self.pos = stop;
        self.extent += 1;
        Some(run)
    }
}
