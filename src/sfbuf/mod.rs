//! The shared sf_buf pool (FreeBSD/DragonFly `sf_buf`, made dynamic and
//! lock-light).
//!
//! One pool for every thread: a concurrent map `frame -> slot` and, per
//! slot, an entry with an atomic state word (reference count, flags and a
//! generation). A hit of a single page takes no lock: a per-frame hint
//! names the slot and generation that last mapped the frame, and one CAS on
//! the entry takes the reference if that generation is still live (the
//! map, under a shard read lock, is the fallback and the authority);
//! a freed sf_buf stays mapped on an inactive LRU so the next alloc of the
//! frame is a hit; the pool grows on demand up to the window and caps its
//! cached-but-unused entries at `max_excess`, tunable at run time.
//! [`SfPool::close`] ends it: from then on every allocation fails with
//! [`Error::Closed`](crate::Error::Closed), hit or miss, and waiters wake
//! with it; handles already held stay valid and release as before.
//!
//! # Files, one job each
//!
//! - `pool.rs`: the builder, [`SfPool`]'s fields and public entry points,
//!   the cap, `close`, the statistics.
//! - `state.rs`: the entry's state word as a type, every change of it a
//!   named transition with its memory orderings.
//! - `entry.rs`: the per-slot entry (state, key, address, mapping) and who
//!   owns its mapping when.
//! - `hit.rs`: the hit paths: pinned, through the hint, through the map.
//! - `miss.rs`: the miss, the eviction (clock order), the trim.
//! - `handle.rs`: [`SfBuf`] and the releases its drop makes.
//! - `owned.rs`: [`OwnedSfBuf`], an `SfBuf` that owns its pool and pages
//!   (`'static`, for async tasks).
//! - `hint.rs` (the hint table), `wait.rs` (waiting for room, with its own
//!   lost-wake-up argument), `lru.rs`, `counter.rs` (striped statistics),
//!   `stats.rs`.
//!
//! # The argument, and where each point lives
//!
//! A lookup that finds an entry while another thread evicts it must never
//! return an address that is, or is about to be, unmapped or remapped;
//! an entry must never be killed while a reference of either kind (its
//! own count, a pin) is out; and no entry may be lost off the LRU or
//! listed twice. The numbered points sit next to the code they justify,
//! and the code cites them as "(file, n)":
//!
//! | Point | Says | File |
//! |---|---|---|
//! | 1 | a hit takes its reference under the shard's read lock | `hit.rs` |
//! | 2-4 | kill and removal in one step; unmap after; publish after writing | `miss.rs` |
//! | 5 | every publication starts a new generation | `state.rs` |
//! | 6-7 | the hint, and the lock-free hit's CAS on its generation | `hit.rs` |
//! | 8 | generations wrap only after 2^32 reuses | `state.rs` |
//! | 9 | the pinned hit and its re-check | `hit.rs` |
//! | 10 | the evictor revokes and counts pins | `miss.rs` |
//! | 11-12 | last releases of either kind; the pinned release | `handle.rs` |
//! | 13 | an evictor gives up only with no unused entry listed | `miss.rs` |
//! | - | waiting for room: no lost wake-up | `wait.rs` |
//!
//! Each file names the loom models (in `loom-tests/tests/sfbuf_models.rs`)
//! that check its points, and the mutant each one fails with.

mod counter;
pub mod entry;
pub mod handle;
pub mod hint;
pub mod hit;
mod lru;
pub mod miss;
mod owned;
pub mod pool;
pub mod state;
mod stats;
#[cfg(all(test, not(loom)))]
mod tests;
pub mod wait;

pub use handle::SfBuf;
pub use owned::OwnedSfBuf;
pub use pool::{SfPool, SfPoolBuilder};
pub use stats::SfStats;
pub use wait::{CancelToken, Wait};

#[cfg(loom)]
pub(crate) use counter::exit_thread;
