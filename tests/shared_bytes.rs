//! Two threads writing and reading the same frame at once, through the safe
//! API only: the direct map of heap memory (`Page::direct`), two `Lwbuf`
//! handles of one page on two CPUs, and two `SfBuf`s of one page, each over
//! the model MMU.
//!
//! Mapped bytes are shared memory: every mapping of a frame reaches the same
//! bytes, and the safe API lets any number of threads copy into and out of
//! them at once (`Kaddr`'s docs). That must be a race on the *values* only,
//! never undefined behaviour, so under Miri these tests fail if `Kaddr`'s
//! copies are plain memory accesses that can race.
//!
//! What each reader may see: every byte is one of the values written to it
//! (or its value before), never anything else. Words may be torn between the
//! writers (one word half from each), so only bytes are checked.
//!
//! Cheap on purpose (a few rounds under Miri, which is about 100x slower).

use std::sync::{Arc, Barrier};
use std::thread;

use lwbuf::{system_page_size, Backing, Kaddr, Lwbufs, ModelMmu, Page, PhysMem, SfPool, Wait};

/// Rounds of writes and reads per thread.
const ROUNDS: usize = if cfg!(miri) { 2 } else { 200 };
/// The value each writer writes to every byte it writes (the frame starts
/// out zeroed).
const VALUES: [u8; 2] = [0xa5, 0x3c];
/// How many bytes of the frame a round reads back and checks.
const CHECKED: usize = 256;

/// Heap memory of a few frames and one page of it.
fn heap_page() -> (PhysMem, Page) {
    let mem = PhysMem::builder().frames(4).backing(Backing::Heap).build().expect("build PhysMem");
    let page = mem.alloc_page().expect("alloc_page");
    (mem, page)
}

/// Check that every byte of `bytes` is one of `allowed`.
#[track_caller]
fn assert_bytes_among(bytes: &[u8], allowed: &[u8], what: &str) {
    if let Some((i, b)) = bytes.iter().enumerate().find(|(_, b)| !allowed.contains(b)) {
        panic!("{what}: byte {i} is {b:#04x}, not one of {allowed:#04x?}");
    }
}

/// One writer's rounds through `k`: the whole frame (`fill`), a 64-byte
/// range (`write_at`), an aligned and an unaligned word (`write_u64`), then
/// a read of the first `CHECKED` bytes (`read_at`, `read_u64` aligned and
/// not), which may see the other writer's bytes, ours, or zeros from
/// before anyone wrote.
fn write_and_read(k: Kaddr<'_>, v: u8) {
    let mut buf = [0u8; CHECKED];
    for _ in 0..ROUNDS {
        k.fill(v).expect("fill");
        k.write_at(64, &[v; 64]).expect("write_at");
        k.write_u64(128, u64::from_ne_bytes([v; 8])).expect("write_u64");
        // An unaligned word spans two machine words (two merges).
        k.write_u64(141, u64::from_ne_bytes([v; 8])).expect("unaligned write_u64");
        k.read_at(0, &mut buf).expect("read_at");
        assert_bytes_among(&buf, &[0, VALUES[0], VALUES[1]], "read during the writes");
        let w = k.read_u64(192).expect("read_u64");
        assert_bytes_among(&w.to_ne_bytes(), &[0, VALUES[0], VALUES[1]], "word read during the writes");
        let w = k.read_u64(139).expect("unaligned read_u64");
        assert_bytes_among(&w.to_ne_bytes(), &[0, VALUES[0], VALUES[1]], "unaligned word read during the writes");
    }
}

/// After both writers: every byte of the frame is one of the two values
/// (both filled the whole frame).
fn assert_frame_written(page: &Page) {
    let mut frame = vec![0u8; system_page_size()];
    page.direct().expect("direct map").read_at(0, &mut frame).expect("read the frame");
    assert_bytes_among(&frame, &VALUES, "frame after both writers");
}

/// Two threads write and read one frame through its direct map.
#[test]
fn two_writers_through_the_direct_map() {
    let (_mem, page) = heap_page();
    let start = Barrier::new(2);
    thread::scope(|s| {
        for v in VALUES {
            let (page, start) = (&page, &start);
            s.spawn(move || {
                let k = page.direct().expect("direct map");
                start.wait();
                write_and_read(k, v);
            });
        }
    });
    assert_frame_written(&page);
}

/// Two threads on two CPUs, each with its own `Lwbuf` of the same page, write
/// and read the frame through their handles.
#[test]
fn two_writers_through_lwbufs_on_two_cpus() {
    let (mem, page) = heap_page();
    let lw = Lwbufs::builder(Arc::new(ModelMmu::new(&mem, 4).expect("build ModelMmu")))
        .cpus(2)
        .build()
        .expect("build Lwbufs");
    let start = Barrier::new(2);
    thread::scope(|s| {
        for (cpu, v) in VALUES.into_iter().enumerate() {
            let (lw, page, start) = (&lw, &page, &start);
            s.spawn(move || {
                let _g = lw.bind(cpu).expect("bind");
                let h = lw.alloc(page).expect("alloc");
                let k = h.kva().expect("kva");
                start.wait();
                write_and_read(k, v);
            });
        }
    });
    assert_frame_written(&page);
    lw.reclaim();
    assert_eq!(lw.check_consistency(), Ok(0));
}

/// Two threads, each with its own `SfBuf` of the same page (one shared
/// mapping), write and read the frame through them.
#[test]
fn two_writers_through_sf_bufs() {
    let (mem, page) = heap_page();
    let pool =
        SfPool::builder(Arc::new(ModelMmu::new(&mem, 4).expect("build ModelMmu"))).build().expect("build SfPool");
    let start = Barrier::new(2);
    thread::scope(|s| {
        for v in VALUES {
            let (pool, page, start) = (&pool, &page, &start);
            s.spawn(move || {
                let sf = pool.alloc(page, Wait::NoWait).expect("alloc");
                start.wait();
                write_and_read(sf.kva(), v);
            });
        }
    });
    assert_frame_written(&page);
    assert_eq!(pool.stats().used, 0);
}
