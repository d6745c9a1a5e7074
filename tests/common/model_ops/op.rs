//! The operations: what a sequence is made of, and the fuzz input codec.

use super::*;

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
}

/// Which operation each opcode is: the common ones (alloc, drop, bind)
/// appear more often, so that sequences build up cached entries, hits,
/// evictions and messages rather than errors.
pub(super) const TABLE: [u8; 35] = [
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
            _ => Op::SfSetMaxExcess(a % 5),
        }
    }
}

/// Decode fuzz input: three bytes per operation (a short tail is ignored),
/// at most [`MAX_OPS`].
pub fn decode(data: &[u8]) -> Vec<Op> {
    data.chunks_exact(3).take(MAX_OPS).map(|c| Op::from_parts(c[0], c[1], c[2])).collect()
}
