//! Every system call of the core (memory, window, CPUs, barriers), in one
//! place, each with the invariant that makes it safe. The layers above call
//! these functions and never `mmap` or `syscall` themselves; the sendfile
//! module keeps its socket calls in `sendfile/sys.rs`.
//!
//! Errors come back as [`Errno`]; the caller names the operation when it
//! turns one into an [`Error`](crate::Error), since it knows what it was
//! doing (`"mmap(enter)"`, `"mmap(remove)"`, ...).

// Under loom the callers of some of these are replaced by models.
#![cfg_attr(loom, allow(dead_code))]

use std::ffi::CStr;
use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;

pub(crate) use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::mman::{mmap, mmap_anonymous, munmap, MapFlags, ProtFlags};

/// The system page size (`sysconf(_SC_PAGESIZE)`), 4096 if it cannot be read.
pub(crate) fn page_size() -> usize {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE) {
        Ok(Some(n)) if n > 0 => n as usize,
        _ => 4096,
    }
}

/// A sealed memfd of `len` bytes: created close-on-exec, sized, then sealed
/// against shrinking (so no mapping of it can ever SIGBUS from a
/// truncation), growing and further sealing. The failing step is named.
pub(crate) fn sealed_memfd(name: &CStr, len: i64) -> Result<OwnedFd, (&'static str, Errno)> {
    let fd = memfd_create(name, MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING)
        .map_err(|e| ("memfd_create", e))?;
    nix::unistd::ftruncate(&fd, len).map_err(|e| ("ftruncate", e))?;
    fcntl(
        fd.as_raw_fd(),
        FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL),
    )
    .map_err(|e| ("fcntl(F_ADD_SEALS)", e))?;
    Ok(fd)
}

/// A sealed memfd of `len` bytes backed by huge pages of `page` bytes
/// (hugetlbfs), every page allocated now with `fallocate`, so that no
/// mapping of it can fault for lack of a huge page later (`ENOSPC` here
/// instead of a `SIGBUS` then). Sealed as [`sealed_memfd`].
pub(crate) fn sealed_huge_memfd(name: &CStr, len: i64, page: usize) -> Result<OwnedFd, (&'static str, Errno)> {
    let size_flag = match page {
        0x20_0000 => MemFdCreateFlag::MFD_HUGE_2MB,
        0x4000_0000 => MemFdCreateFlag::MFD_HUGE_1GB,
        _ => MemFdCreateFlag::empty(),
    };
    let fd = memfd_create(
        name,
        MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING | MemFdCreateFlag::MFD_HUGETLB | size_flag,
    )
    .map_err(|e| ("memfd_create(MFD_HUGETLB)", e))?;
    nix::unistd::ftruncate(&fd, len).map_err(|e| ("ftruncate", e))?;
    nix::fcntl::fallocate(fd.as_raw_fd(), nix::fcntl::FallocateFlags::empty(), 0, len)
        .map_err(|e| ("fallocate(huge pages)", e))?;
    fcntl(
        fd.as_raw_fd(),
        FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL),
    )
    .map_err(|e| ("fcntl(F_ADD_SEALS)", e))?;
    Ok(fd)
}

/// Reserve `len` bytes of address space where the kernel chooses, starting
/// at a multiple of `align` (a power of two): a larger reservation with its
/// unaligned ends unmapped.
pub(crate) fn reserve_aligned(len: NonZeroUsize, align: usize) -> Result<NonNull<u8>, Errno> {
    if align <= page_size() {
        return reserve(len);
    }
    let over = len.get().checked_add(align).ok_or(Errno::ENOMEM)?;
    let p = reserve(NonZeroUsize::new(over).expect("over > 0"))?;
    let start = p.as_ptr() as usize;
    let aligned = (start + align - 1) & !(align - 1);
    let (head, tail) = (aligned - start, over - (aligned - start) - len.get());
    // SAFETY: both ends lie inside the reservation just made, which nothing
    // else knows of; what stays is `aligned..aligned + len`.
    unsafe {
        if head > 0 {
            munmap(p.cast(), head)?;
        }
        if tail > 0 {
            munmap(NonNull::new_unchecked((aligned + len.get()) as *mut libc::c_void), tail)?;
        }
    }
    Ok(NonNull::new(aligned as *mut u8).expect("non-null"))
}

/// Reserve `len` bytes of address space where the kernel chooses:
/// `PROT_NONE`, `MAP_NORESERVE`, no memory behind it.
pub(crate) fn reserve(len: NonZeroUsize) -> Result<NonNull<u8>, Errno> {
    // SAFETY: an anonymous PROT_NONE mapping at an address the kernel
    // chooses cannot clobber anything.
    let p =
        unsafe { mmap_anonymous(None, len, ProtFlags::PROT_NONE, MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE) }?;
    Ok(p.cast())
}

/// Put a `PROT_NONE` reservation back over `len` bytes at `addr` (this is
/// how a mapping is removed: the old pages go, the address space stays
/// ours). With `noreplace`, fail with `EEXIST` instead of replacing a
/// mapping someone else made there.
///
/// # Safety
/// `addr..addr + len` lies in a reservation the caller owns, and nothing
/// accesses it during or after the call (the pages mapped there go).
pub(crate) unsafe fn reserve_at(addr: NonNull<u8>, len: NonZeroUsize, noreplace: bool) -> Result<(), Errno> {
    let fixed = if noreplace { MapFlags::MAP_FIXED_NOREPLACE } else { MapFlags::MAP_FIXED };
    let at = NonZeroUsize::new(addr.as_ptr() as usize).expect("non-null");
    // SAFETY: the caller owns the range and nothing uses it (contract).
    unsafe {
        mmap_anonymous(Some(at), len, ProtFlags::PROT_NONE, fixed | MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE)
    }?;
    Ok(())
}

/// Map `len` bytes of `fd` from `offset`, shared and writable, exactly at
/// `addr`, replacing the caller's reservation there (or, with `noreplace`,
/// only if nothing is mapped there). Kernels before 4.17 treat
/// `MAP_FIXED_NOREPLACE` as a hint: a mapping made elsewhere is undone and
/// reported as `EEXIST`.
///
/// # Safety
/// `addr..addr + len` lies in a reservation the caller owns and no
/// reference into it is live (what was mapped there is replaced).
pub(crate) unsafe fn map_shared_at(
    addr: NonNull<u8>,
    len: NonZeroUsize,
    fd: BorrowedFd<'_>,
    offset: i64,
    noreplace: bool,
    writable: bool,
) -> Result<(), Errno> {
    let fixed = if noreplace { MapFlags::MAP_FIXED_NOREPLACE } else { MapFlags::MAP_FIXED };
    let prot = if writable { ProtFlags::PROT_READ | ProtFlags::PROT_WRITE } else { ProtFlags::PROT_READ };
    let at = NonZeroUsize::new(addr.as_ptr() as usize).expect("non-null");
    // SAFETY: the caller owns the range and nothing refers to it (contract).
    let p = unsafe { mmap(Some(at), len, prot, MapFlags::MAP_SHARED | fixed, fd, offset) }?;
    if p.cast::<u8>() != addr {
        // SAFETY: `p` is the mapping just made, at an address the kernel
        // chose; nobody else knows it.
        let _ = unsafe { munmap(p, len.get()) };
        return Err(Errno::EEXIST);
    }
    Ok(())
}

/// Unmap `len` bytes at `addr` (the address space is given back).
///
/// # Safety
/// The range is the caller's and nothing accesses it during or after the
/// call.
pub(crate) unsafe fn unmap(addr: NonNull<u8>, len: usize) -> Result<(), Errno> {
    // SAFETY: the caller's contract.
    unsafe { munmap(addr.cast(), len) }
}

/// Pin the calling thread to the `n % cores`-th of the cores its affinity
/// mask allows; returns that core.
pub(crate) fn pin_to_nth_core(n: usize) -> Result<usize, (&'static str, Errno)> {
    use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
    use nix::unistd::Pid;

    let me = Pid::from_raw(0);
    let allowed = sched_getaffinity(me).map_err(|e| ("sched_getaffinity", e))?;
    let cores: Vec<usize> = (0..CpuSet::count()).filter(|&c| allowed.is_set(c).unwrap_or(false)).collect();
    // The kernel never reports an empty mask for a running thread.
    let core = *cores.get(n % cores.len().max(1)).ok_or(("sched_getaffinity", Errno::EINVAL))?;
    let mut set = CpuSet::new();
    set.set(core).map_err(|e| ("sched_setaffinity", e))?;
    sched_setaffinity(me, &set).map_err(|e| ("sched_setaffinity", e))?;
    Ok(core)
}

const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_int = 1 << 3;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_int = 1 << 4;

/// Register the process for private expedited membarriers (Linux 4.14+).
pub(crate) fn membarrier_register() -> Result<(), Errno> {
    // SAFETY: membarrier takes (cmd, flags, cpu_id) integers and touches no
    // memory of ours.
    let r = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(Errno::last())
    }
}

/// Make every running thread of the process execute a full memory barrier
/// (after [`membarrier_register`]).
pub(crate) fn membarrier() -> Result<(), Errno> {
    // SAFETY: as in `membarrier_register`.
    let r = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(Errno::last())
    }
}
