//! Loom model of the slot table's reservation: the per-word state bits that
//! keep two enters of one slot apart, whichever words their ranges cross.
//!
//! `Mmu::enter` is `unsafe` because its caller must own the slots; the table
//! still refuses an enter over a slot that is live or being entered, with
//! `Error::SlotOccupied`, so that a broken caller gets an error rather than
//! a silent replace. Two enters of overlapping ranges racing is exactly
//! such a broken caller: one must win, the other must leave nothing behind.

#![cfg(loom)]

use loom::thread;
use loom_tests::{expect_failure, model, Mutant};
use lwbuf::{Backing, Error, Mmu, ModelMmu, Pfn, PhysMem, Slot};

/// Slots per word of state bits on this target (two bits per slot).
const PER_WORD: usize = usize::BITS as usize / 2;

/// Two threads enter ranges that overlap in one slot of the second word;
/// the first range starts in the word before. Exactly one enter succeeds,
/// the loser reports the shared slot and holds nothing (its slots can be
/// entered after the winner's are removed), and the winner's frames are
/// what the shared slot translates to.
fn overlapping_enters() {
    let mem = PhysMem::builder().frames(8).backing(Backing::Heap).build().unwrap();
    let mmu = std::sync::Arc::new(ModelMmu::new(&mem, 2 * PER_WORD).unwrap());
    let ranges = [(PER_WORD - 2, 3usize, 0usize), (PER_WORD, 2, 4)];
    let shared = PER_WORD;
    let hs: Vec<_> = ranges
        .iter()
        .map(|&(slot, n, pfn)| {
            let mmu = mmu.clone();
            // SAFETY (deliberately broken contract): both threads claim
            // slot `shared`; the model MMU maps nothing, and the point is
            // that the table refuses one of them.
            thread::spawn(move || unsafe { mmu.enter(Slot(slot), Pfn(pfn), n) }.map(|_| ()))
        })
        .collect();
    let rs: Vec<_> = hs.into_iter().map(|h| h.join().unwrap()).collect();
    let won: Vec<usize> = (0..2).filter(|&i| rs[i].is_ok()).collect();
    assert_eq!(won.len(), 1, "enters of one slot: {rs:?}");
    let (w, l) = (won[0], 1 - won[0]);
    assert!(matches!(rs[l], Err(Error::SlotOccupied { slot }) if slot == shared), "{:?}", rs[l]);
    let (ws, wn, wp) = ranges[w];
    assert_eq!(mmu.slots_of(Pfn(wp + shared - ws)), [Slot(shared)], "the shared slot maps the winner's frame");
    assert_eq!(mmu.stats().mapped, wn as u64);
    // SAFETY: the winner's slots, entered above, used by nobody.
    unsafe { mmu.remove(Slot(ws), wn) }.unwrap();
    let (ls, ln, lp) = ranges[l];
    // SAFETY: the loser's slots are empty now and ours alone.
    unsafe { mmu.enter(Slot(ls), Pfn(lp), ln) }.expect("the loser left a slot busy");
}

#[test]
fn slot_reserve_overlapping_enters() {
    model("slot_reserve_overlapping_enters", overlapping_enters);
}

/// A reservation that reads the word and writes it back in two steps lets
/// both enters pass.
#[test]
fn slot_reserve_overlapping_enters_mutant_not_atomic() {
    expect_failure("slot_reserve_overlapping_enters", Mutant::ReserveNotAtomic, overlapping_enters);
}
