//! The send modes of `lwbuf::sendfile` on loopback TCP, side by side: one
//! group per range size (64 KiB, 4 MiB), one function per mode, throughput in
//! bytes. A reader thread drains the socket as fast as it can; one iteration
//! is one `Connection::send` of the range (it returns when the kernel has
//! taken every byte). Files are laid out in runs of 16 pages (64 KiB), like a
//! moderately fragmented page cache, so the mmap baseline maps one run per
//! `mmap`. The cache modes (sfbuf, lwbuf, lwbuf-run) have windows that hold
//! the whole 8 MiB file, so after the warm-up every mapping is a hit; the
//! bench thread is the sender's worker 0 (bound to CPU 0 of the lwbuf
//! caches) for the whole group.
//!
//! `cargo bench --bench sendfile`

use std::hint::black_box;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lwbuf::sendfile::{Mode, PageFile, SendOptions, Sender};
use lwbuf::PhysMem;

fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let c = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    let (s, _) = l.accept().expect("accept");
    (s, c)
}

fn modes(c: &mut Criterion) {
    let mem = PhysMem::builder().frames(4096).build().expect("phys");
    let file = PageFile::builder(&mem).max_run(16).pattern(8 << 20, 7).expect("file");
    for (name, len) in [("64KiB", 64u64 << 10), ("4MiB", 4 << 20)] {
        let mut g = c.benchmark_group(format!("sendfile/{name}"));
        g.throughput(Throughput::Bytes(len));
        g.sample_size(20);
        g.warm_up_time(Duration::from_millis(500));
        g.measurement_time(Duration::from_secs(2));
        for &mode in Mode::ALL {
            let opts = SendOptions::default().cpus(Some(1));
            let sender = match Sender::new(mode, &mem, opts) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("skipping {mode}: {e}");
                    continue;
                }
            };
            let (server, client) = tcp_pair();
            let reader = thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 20];
                let mut c = client;
                let mut total = 0u64;
                loop {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => return total,
                        Ok(n) => total += n as u64,
                    }
                }
            });
            {
                let _worker = sender.bind_worker(0, false).expect("bind the bench thread");
                let mut conn = match sender.connection(server) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("skipping {mode}: {e}");
                        continue;
                    }
                };
                // A different 4 KiB-aligned offset each time, so requests do
                // not all hit the same frames.
                let mut at = 0u64;
                g.bench_function(BenchmarkId::from_parameter(mode.name()), |b| {
                    b.iter(|| {
                        let start = at;
                        at = (at + len) % (file.len() - len + 1) / 4096 * 4096;
                        black_box(conn.send(&file, start..start + len, b"").expect("send"))
                    })
                });
                let _ = conn.flush(Duration::from_secs(5));
                if let Some(st) = sender.mmu_stats() {
                    eprintln!("{mode}/{name}: window {st}");
                }
                if let Some(c) = sender.cache_stats() {
                    eprintln!("{mode}/{name}: {} lookups, {:.2}% hits", c.lookups, 100.0 * c.hit_rate());
                }
            }
            let _ = reader.join();
        }
        g.finish();
    }
}

criterion_group!(benches, modes);
criterion_main!(benches);
