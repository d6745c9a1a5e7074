//! [`Mode`]: how a byte range gets to a socket, with its names and what it
//! maps through, defined from one table.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// Defines [`Mode`] from one entry per mode: its doc, variant, short name,
/// longer aliases, and whether it maps through a window of its own and
/// keeps mappings cached. A new mode is one entry here (plus its arms in
/// `sender.rs`, which the compiler lists).
macro_rules! modes {
    ($(
        $(#[doc = $doc:literal])*
        $variant:ident = $name:literal $(| $alias:literal)*; window: $window:literal, cache: $cache:literal;
    )*) => {
        /// How a byte range of a [`PageFile`](super::PageFile) gets to a socket.
        ///
        /// More modes may join; match with a wildcard arm.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum Mode {
            $( $(#[doc = $doc])* $variant, )*
        }

        impl Mode {
            /// Every mode, in declaration order (which says nothing of
            /// their merits; a benchmark orders them as it likes).
            pub const ALL: &'static [Mode] = &[$(Mode::$variant),*];

            /// The short name (`sendfile`, `copy`, `mmap`, `direct`,
            /// `zerocopy`, `sfbuf`, `lwbuf`, `lwbuf-run`), which [`FromStr`]
            /// accepts.
            pub fn name(self) -> &'static str {
                match self {
                    $(Mode::$variant => $name,)*
                }
            }

            /// Whether the mode maps through a window of its own (and so
            /// makes mapping system calls that
            /// [`Sender::mmu_stats`](super::Sender::mmu_stats) counts).
            pub fn uses_window(self) -> bool {
                match self {
                    $(Mode::$variant => $window,)*
                }
            }

            /// Whether the mode keeps mappings cached between requests (and
            /// so has [`Sender::cache_stats`](super::Sender::cache_stats)).
            pub fn caches_mappings(self) -> bool {
                match self {
                    $(Mode::$variant => $cache,)*
                }
            }

            /// The mode of a short name or alias, already lowercased with
            /// `-` for `_`.
            fn from_name(s: &str) -> Option<Mode> {
                match s {
                    $($name $(| $alias)* => Some(Mode::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

modes! {
    /// Kernel `sendfile(2)` from the memfd: no mapping, no copy in user
    /// space; pages go to the socket by reference and stay held until the
    /// data has left ([`SendfileHolds`](super::SendfileHolds)).
    Sendfile = "sendfile" | "kernel-sendfile"; window: false, cache: false;
    /// The classic read/write server: copy into a user buffer (from the
    /// direct map) and `send` it.
    Copy = "copy" | "read-write" | "readwrite"; window: false, cache: false;
    /// Map every page (a run per `mmap`) into a window for each request,
    /// `writev`, unmap: the no-cache baseline; 2 mapping system calls per run.
    MmapPerRequest = "mmap" | "mmap-per-request" | "window"; window: true, cache: false;
    /// `writev` straight from the direct map: the physical limit of the
    /// mapping-based modes; no mapping system call.
    DirectMap = "direct" | "direct-map" | "dmap"; window: false, cache: false;
    /// `sendmsg(MSG_ZEROCOPY)` from the direct map, pages and mappings held
    /// until the completion notification ([`ZeroCopy`](super::ZeroCopy)).
    ZeroCopy = "zerocopy" | "zero-copy" | "msg-zerocopy"; window: false, cache: false;
    /// `writev` from mappings of a shared sf_buf pool
    /// ([`SfBufSource`](super::SfBufSource)): runs of up to
    /// [`SendOptions::max_run`](super::SendOptions::max_run) pages, cached
    /// after the send; a hit makes no system call. A request sleeps for room
    /// only while it holds no mapping.
    SfBuf = "sfbuf" | "sf-buf" | "sf-bufs"; window: true, cache: true;
    /// `writev` from the per-CPU lwbuf caches
    /// ([`LwbufSource`](super::LwbufSource)), one mapping per page, made and
    /// released on the worker's own CPU; a hit makes no system call.
    Lwbuf = "lwbuf" | "lwbufs"; window: true, cache: true;
    /// As [`Mode::Lwbuf`], but contiguous frames are mapped as runs of up to
    /// [`SendOptions::max_run`](super::SendOptions::max_run) pages: one
    /// `mmap` per run, one cache entry.
    LwbufRun = "lwbuf-run" | "lwbuf-runs" | "lwbufrun"; window: true, cache: true;
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Mode {
    type Err = Error;

    /// A name of [`Mode::name`] or a longer alias (`read-write`,
    /// `mmap-per-request`, `direct-map`, `msg-zerocopy`, `sf-buf`,
    /// `lwbuf-runs`), any case, `_` for `-`.
    fn from_str(s: &str) -> Result<Mode> {
        Mode::from_name(&s.to_ascii_lowercase().replace('_', "-")).ok_or_else(|| {
            let names: Vec<_> = Mode::ALL.iter().map(|m| m.name()).collect();
            Error::config("mode", format!("unknown mode {s:?}; known: {}", names.join(", ")))
        })
    }
}
