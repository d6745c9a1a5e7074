//! The operations and configurations: what a case is made of, and the fuzz
//! input codec.

use lwbuf::Reclaim;

use super::*;

/// How a case builds both caches: the mapping granule (frames) and what an
/// eviction does with its mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub granule: usize,
    pub reclaim: Reclaim,
}

impl Config {
    /// Every configuration a case runs under. The first (one frame, strict
    /// reclaim: every eviction one remove) is where shrinking ends.
    pub const ALL: [Config; 6] = [
        Config { granule: 1, reclaim: Reclaim::Strict },
        Config { granule: 1, reclaim: Reclaim::Lazy },
        Config { granule: 2, reclaim: Reclaim::Strict },
        Config { granule: 2, reclaim: Reclaim::Lazy },
        Config { granule: 4, reclaim: Reclaim::Strict },
        Config { granule: 4, reclaim: Reclaim::Lazy },
    ];

    /// The configuration a fuzz input's first byte picks.
    pub fn from_byte(b: u8) -> Config {
        Config::ALL[b as usize % Config::ALL.len()]
    }
}

/// One operation. Indices into handle lists are taken modulo their length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// The driver binds CPU `c` (`c >= CPUS`: no such CPU), without
    /// unbinding first.
    Bind(u8),
    /// The driver drops its CPU guard.
    Unbind,
    /// The helper drops its guard, then binds CPU `c`.
    HelperBind(u8),
    /// The helper drops its guard.
    HelperUnbind,
    /// The helper calls `poll`.
    HelperPoll,
    /// `alloc` of frame `f` (`f == FRAMES`: a frame of another memory).
    Alloc(u8),
    /// `alloc_run` of frames `start..start + len` (clamped to the memory;
    /// `len == 0`: an empty run).
    AllocRun(u8, u8),
    /// `alloc_run` of pages that are not a run: a gap (`kind` even) or a
    /// foreign page second (`kind` odd).
    AllocBroken(u8, u8),
    /// The driver takes handle `i`'s address on its CPU.
    Kva(u8),
    /// The driver drops handle `i` (on its CPU, or with none).
    Drop(u8),
    /// The helper takes handle `i`'s address on its CPU.
    HelperKva(u8),
    /// The helper drops handle `i` (on its CPU, or with none).
    HelperDrop(u8),
    /// `Lwbufs::set_max_excess(n)`.
    SetMaxExcess(u8),
    /// The driver calls `poll`.
    Poll,
    /// `Lwbufs::reclaim`.
    Reclaim,
    /// `SfPool::alloc(frame f, NoWait)` (`f == FRAMES`: foreign).
    SfAlloc(u8),
    /// Drop sf_buf `i`.
    SfDrop(u8),
    /// `SfPool::set_max_excess(n)`.
    SfSetMaxExcess(u8),
    /// `SfPool::alloc_run(frames start..start + len, NoWait)`, `len` cut to
    /// the granule, so that the run takes one granule of slots: where a
    /// longer one finds adjacent free slots depends on where the allocator
    /// put the others, which the model leaves out. Inside a granule it
    /// shares the granule's entry; across two it is an entry of its own.
    SfAllocRun(u8, u8),
    /// `SfPool::reclaim`.
    SfReclaim,
    /// `CpuGuard::map_local` of frame `f` on the driver's guard (nothing
    /// when it holds none), reading every word the model checks: an
    /// `alloc` and a release at home in one call.
    MapLocal(u8),
}

/// Which operation each opcode is: the common ones (alloc, drop, bind)
/// appear more often, so that sequences build up cached entries, hits,
/// evictions and messages rather than errors.
pub(super) const TABLE: [u8; 41] = [
    0, 0, 0, // Bind
    1, // Unbind
    2, 2, // HelperBind
    3, // HelperUnbind
    4, // HelperPoll
    5, 5, 5, 5, 5, // Alloc
    6, 6, // AllocRun
    7, // AllocBroken
    8, 8, // Kva
    9, 9, 9, 9, // Drop
    10, 10, // HelperKva
    11, 11, // HelperDrop
    12, // SetMaxExcess
    13, // Poll
    14, // Reclaim
    15, 15, 15, // SfAlloc
    16, 16, // SfDrop
    17, // SfSetMaxExcess
    18, 18, // SfAllocRun
    19, // SfReclaim
    20, 20, 20, // MapLocal
];

/// Distinct opcodes of [`Op::from_parts`].
pub const OPCODES: u8 = TABLE.len() as u8;

impl Op {
    /// The operation for opcode `code` (modulo [`OPCODES`]) with arguments
    /// `a` and `b`, mapped onto the ranges that matter.
    pub fn from_parts(code: u8, a: u8, b: u8) -> Op {
        // Single pages from the first eight frames (so they hit), or the
        // foreign one.
        let frame = match a % 9 {
            8 => FRAMES as u8,
            f => f,
        };
        match TABLE[(code % OPCODES) as usize] {
            0 => Op::Bind(a % (CPUS as u8 + 1)),
            1 => Op::Unbind,
            2 => Op::HelperBind(a % (CPUS as u8 + 1)),
            3 => Op::HelperUnbind,
            4 => Op::HelperPoll,
            5 => Op::Alloc(frame),
            6 => Op::AllocRun(a % FRAMES as u8, b % 5),
            7 => Op::AllocBroken(a % (FRAMES as u8 - 2), b),
            8 => Op::Kva(a),
            9 => Op::Drop(a),
            10 => Op::HelperKva(a),
            11 => Op::HelperDrop(a),
            12 => Op::SetMaxExcess(a % 6),
            13 => Op::Poll,
            14 => Op::Reclaim,
            15 => {
                // Eight frames, so the six slots fill; the ninth is foreign.
                let f = a % 9;
                Op::SfAlloc(if f == 8 { FRAMES as u8 } else { f })
            }
            16 => Op::SfDrop(a),
            17 => Op::SfSetMaxExcess(a % 5),
            // Runs from the first eight frames, up to a granule of 4.
            18 => Op::SfAllocRun(a % 8, b % 4 + 1),
            19 => Op::SfReclaim,
            _ => Op::MapLocal(frame),
        }
    }
}

/// Decode operations: three bytes each (a short tail is ignored), at most
/// [`MAX_OPS`].
pub fn decode(data: &[u8]) -> Vec<Op> {
    data.chunks_exact(3).take(MAX_OPS).map(|c| Op::from_parts(c[0], c[1], c[2])).collect()
}

/// Decode a fuzz input: the configuration from the first byte
/// ([`Config::from_byte`]), then the operations ([`decode`]).
pub fn decode_case(data: &[u8]) -> (Config, Vec<Op>) {
    match data.split_first() {
        Some((&b, ops)) => (Config::from_byte(b), decode(ops)),
        None => (Config::ALL[0], Vec::new()),
    }
}
