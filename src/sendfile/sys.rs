//! The socket system calls of the send paths, each behind a safe wrapper.
//!
//! nix has no zero-copy API, so this module calls libc directly. The
//! `writev`/`sendmsg` of mapped memory are not here: the send paths use the
//! crate's public batch calls ([`IoVec`](crate::IoVec)) as any user does.
//! Every wrapper returns `io::Result` with the errno; nothing here panics.

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use libc::{c_int, c_void};

/// `SO_ZEROCOPY` (asm-generic value; libc does not export it everywhere).
#[cfg(not(any(target_arch = "sparc64", target_arch = "sparc")))]
const SO_ZEROCOPY: c_int = 60;
#[cfg(any(target_arch = "sparc64", target_arch = "sparc"))]
const SO_ZEROCOPY: c_int = 0x003e;

/// `sock_extended_err.ee_origin` of a zero-copy completion (libc lacks it).
const SO_EE_ORIGIN_ZEROCOPY: u8 = 5;
/// `ee_code` bit: the kernel copied the data after all (always on loopback).
const SO_EE_CODE_ZEROCOPY_COPIED: u8 = 1;
/// `IPV6_RECVERR`: the cmsg type of IPv6 error-queue messages.
const IPV6_RECVERR: c_int = 25;
/// `TCP_CLOSE` in `tcp_info.tcpi_state`.
const TCP_CLOSE: u8 = 7;

fn cvt(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// `sendfile(out, in, &offset, count)`: advances `offset` by what was sent.
pub(crate) fn sendfile(
    out: BorrowedFd<'_>,
    input: BorrowedFd<'_>,
    offset: &mut i64,
    count: usize,
) -> io::Result<usize> {
    let mut off: libc::off_t = *offset as libc::off_t;
    // SAFETY: both descriptors are open (borrowed for the call) and `off` is a
    // valid off_t the kernel updates in place.
    let r = cvt(unsafe { libc::sendfile(out.as_raw_fd(), input.as_raw_fd(), &mut off, count) });
    *offset = off as i64;
    r
}

/// `poll` one descriptor for `events`; returns the `revents` (0 on timeout).
/// `None` waits forever. EINTR is retried.
pub(crate) fn poll(fd: BorrowedFd<'_>, events: i16, timeout: Option<Duration>) -> io::Result<i16> {
    let ms: c_int = match timeout {
        None => -1,
        Some(d) => d.as_millis().min(c_int::MAX as u128) as c_int,
    };
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events, revents: 0 };
    loop {
        // SAFETY: one valid pollfd, nfds = 1.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r >= 0 {
            return Ok(if r == 0 { 0 } else { pfd.revents });
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Bytes in the socket's send queue not yet acknowledged by the peer (TCP)
/// or not yet read by it (Unix sockets): `ioctl(SIOCOUTQ)`.
pub(crate) fn outq(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut n: c_int = 0;
    // SAFETY: SIOCOUTQ (= TIOCOUTQ) writes one int through the pointer.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ as _, &mut n as *mut c_int) };
    cvt(r as isize)?;
    Ok(n.max(0) as usize)
}

/// The prefix of the kernel's `struct tcp_info` up to `tcpi_bytes_acked`
/// (Linux 4.1+). Declared here because libc has `tcp_info` on glibc only.
#[repr(C)]
#[derive(Default)]
struct TcpInfoPrefix {
    state: u8,
    ca_state: u8,
    retransmits: u8,
    probes: u8,
    backoff: u8,
    options: u8,
    wscale: u8,
    flags: u8,
    u32s: [u32; 24],
    pacing_rate: u64,
    max_pacing_rate: u64,
    bytes_acked: u64,
}

/// What `TCP_INFO` says about the send side.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TcpAck {
    /// Bytes the peer acknowledged over the connection's life.
    pub(crate) bytes_acked: u64,
    /// The connection is closed (reset or done): its queues are purged.
    pub(crate) closed: bool,
}

/// `getsockopt(TCP_INFO)`; `None` for a socket that is not TCP or a kernel
/// without `tcpi_bytes_acked`.
pub(crate) fn tcp_ack(fd: BorrowedFd<'_>) -> io::Result<Option<TcpAck>> {
    let mut info = TcpInfoPrefix::default();
    let mut len = size_of::<TcpInfoPrefix>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info`, a plain-old-
    // data struct, and updates `len` with how much it wrote.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut TcpInfoPrefix).cast::<c_void>(),
            &mut len,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOPROTOOPT) => Ok(None),
            _ => Err(e),
        };
    }
    if (len as usize) < size_of::<TcpInfoPrefix>() {
        return Ok(None);
    }
    Ok(Some(TcpAck { bytes_acked: info.bytes_acked, closed: info.state == TCP_CLOSE }))
}

/// `setsockopt(SO_ZEROCOPY, 1)`.
pub(crate) fn set_zerocopy(fd: BorrowedFd<'_>) -> io::Result<()> {
    let one: c_int = 1;
    // SAFETY: the option value is one int, passed by pointer with its size.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ZEROCOPY,
            (&one as *const c_int).cast::<c_void>(),
            size_of::<c_int>() as libc::socklen_t,
        )
    };
    cvt(r as isize).map(|_| ())
}

/// One zero-copy completion: sends `lo..=hi` (ids, wrapping u32) are done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ZcNotice {
    pub(crate) lo: u32,
    pub(crate) hi: u32,
    /// The kernel copied the data after all (`SO_EE_CODE_ZEROCOPY_COPIED`).
    pub(crate) copied: bool,
}

/// Drain the socket's error queue without blocking, pushing the zero-copy
/// completions found on `out`. Returns how many messages were read. Other
/// error-queue messages are skipped.
pub(crate) fn recv_zc_notices(fd: BorrowedFd<'_>, out: &mut Vec<ZcNotice>) -> io::Result<usize> {
    let mut n = 0;
    loop {
        // Room for several cmsgs of a sock_extended_err plus an offender address.
        let mut control = [MaybeUninit::<u64>::uninit(); 32];
        // SAFETY: an all-zero msghdr is valid.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_control = control.as_mut_ptr().cast::<c_void>();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        // SAFETY: no iovecs (completions carry no data), and a control buffer
        // of `msg_controllen` writable bytes.
        let r = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => Ok(n),
                io::ErrorKind::Interrupted => continue,
                _ => Err(e),
            };
        }
        n += 1;
        // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR/NXTHDR stay within
        // `msg_controllen` bytes of the control buffer, which is live.
        let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        while !cmsg.is_null() {
            // SAFETY: a non-null cmsg header from CMSG_FIRSTHDR/NXTHDR lies
            // inside the control buffer.
            let hdr = unsafe { &*cmsg };
            let ip = hdr.cmsg_level == libc::SOL_IP && hdr.cmsg_type == libc::IP_RECVERR;
            let ip6 = hdr.cmsg_level == libc::SOL_IPV6 && hdr.cmsg_type == IPV6_RECVERR;
            // SAFETY: CMSG_LEN is pure arithmetic on its argument.
            let need = unsafe { libc::CMSG_LEN(size_of::<libc::sock_extended_err>() as u32) } as usize;
            if (ip || ip6) && hdr.cmsg_len as usize >= need {
                // SAFETY: the cmsg holds at least a sock_extended_err (checked
                // against cmsg_len); read_unaligned as CMSG_DATA may be unaligned.
                let ee = unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::sock_extended_err>()) };
                if ee.ee_errno == 0 && ee.ee_origin == SO_EE_ORIGIN_ZEROCOPY {
                    out.push(ZcNotice {
                        lo: ee.ee_info,
                        hi: ee.ee_data,
                        copied: ee.ee_code & SO_EE_CODE_ZEROCOPY_COPIED != 0,
                    });
                }
            }
            // SAFETY: as for CMSG_FIRSTHDR: stays inside the control buffer or
            // returns null.
            cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
        }
    }
}

/// Ignore `SIGPIPE` for the whole process (what Rust's runtime already does
/// for Rust binaries before `main`). `sendfile(2)` takes no `MSG_NOSIGNAL`,
/// so a process embedding this library from elsewhere should call it.
pub fn ignore_sigpipe() -> crate::Result<()> {
    // SAFETY: setting a signal to SIG_IGN installs no handler code.
    let r = unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    if r == libc::SIG_ERR {
        return Err(crate::Error::Sys { op: "signal(SIGPIPE)", source: io::Error::last_os_error() });
    }
    Ok(())
}
