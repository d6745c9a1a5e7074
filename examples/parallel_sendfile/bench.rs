//! The benchmark: every mode, on every working set. Each mode's measured
//! seconds are split into `--rounds` slices run in turn with the other
//! modes' (sendfile, copy, ..., sendfile, copy, ...), so that a burst of
//! load from elsewhere on the machine does not land on one mode only.
//!
//! Every slice starts new server threads and clients and warms them up.
//! On the "inside" working set a mode keeps its `Sender` (and so its warm
//! caches) from one slice to the next, as a server would: the first slice
//! warms up for `--warmup`, the later ones for a quarter of it. On the
//! "beyond" set every slice gets a new `Sender`: keeping the caches of all
//! modes mapped at once there would take the process near the
//! `vm.max_map_count` wall, and a cache that overflows is cold anyway.
//!
//! This file runs the slices and measures them; `report.rs` adds a mode's
//! slices up into its row and prints the table, `chart.rs` draws it,
//! `procstat.rs` reads how much CPU time other processes took meanwhile.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::thread;
use std::time::{Duration, Instant};

use lwbuf::sendfile::{CacheStats, Mode, SendOptions, Sender};
use lwbuf::MmuStats;

use crate::chart;
use crate::client::{self, Clock, Outcome, Plan, Progress, Target};
use crate::fileset::FileSet;
use crate::modes::{Runtime, ServerMode};
use crate::procstat::CpuShare;
use crate::report::{self, Slice, Sum};
use crate::server::{self, Shared, Stats};
use crate::BenchArgs;

/// Every mode of the library, in the order the table shows them: kernel
/// sendfile first (every ratio is taken to it), then the baselines without
/// a cache (copy, a mapping per request), the caches (sf_buf, lwbuf), and
/// the limits of the mapping-based modes (the direct map, MSG_ZEROCOPY).
pub const MODES: &[Mode] = &[
    Mode::Sendfile,
    Mode::Copy,
    Mode::MmapPerRequest,
    Mode::SfBuf,
    Mode::Lwbuf,
    Mode::LwbufRun,
    Mode::DirectMap,
    Mode::ZeroCopy,
];

/// The modes run on the tokio server too (`tokio-sfbuf`, `tokio-lwbuf`),
/// after every mode above: the cost of an async runtime, owned handles and
/// readiness-driven sends, against the same clients.
pub const TOKIO_MODES: &[Mode] = &[Mode::SfBuf, Mode::Lwbuf];

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

fn default_csv() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("parallel_sendfile.csv")
}

pub fn run(args: &BenchArgs) -> Result<(), String> {
    if args.modes.is_empty() {
        return Err("no modes to run".into());
    }
    if args.connections == 0 {
        return Err("--connections must be at least 1".into());
    }
    if args.rounds == 0 {
        return Err("--rounds must be at least 1".into());
    }
    crate::cache_slots(args.cache_mib)?;
    for s in &args.sets {
        if s != "inside" && s != "beyond" {
            return Err(format!("unknown working set {s:?} (inside, beyond)"));
        }
    }
    let cores = crate::cores(args.cpus);
    let workers = cores.len();
    let client_threads = args.client_threads.unwrap_or(workers).clamp(1, args.connections);
    let cache = args.cache_mib << 20;
    let (min, max) = args.sizes;

    let t = Instant::now();
    eprintln!("building the file set ({} MiB of {}..{} byte files) ...", mib(4 * cache), min, max);
    let set =
        FileSet::generate(min, max, 4 * cache, args.max_run.max(1), args.seed, args.huge).map_err(|e| e.to_string())?;
    // The kernel cannot sendfile(2) from hugetlbfs (EINVAL): with --huge,
    // the sendfile baseline sends the same files (same seed, same bytes)
    // from small pages.
    let small = if args.huge && args.modes.iter().any(|m| m.mode == Mode::Sendfile) {
        Some(FileSet::generate(min, max, 4 * cache, args.max_run.max(1), args.seed, false).map_err(|e| e.to_string())?)
    } else {
        None
    };
    let set_for = |mode: Mode| -> &FileSet {
        match &small {
            Some(s) if mode == Mode::Sendfile => s,
            _ => &set,
        }
    };
    let mut inside = 0;
    let mut acc = 0;
    for e in &set.files {
        if acc + e.len() > cache / 2 && inside > 0 {
            break;
        }
        acc += e.len();
        inside += 1;
    }
    eprintln!(
        "{} files, {:.0} MiB in {:.2} s; working sets: inside = {} files / {:.1} MiB (cache {} MiB), beyond = {} files / {:.0} MiB",
        set.files.len(),
        mib(set.total_bytes()),
        t.elapsed().as_secs_f64(),
        inside,
        mib(acc),
        args.cache_mib,
        set.files.len(),
        mib(set.total_bytes())
    );
    // The same files on disk, behind a page cache, run as `SET-disk`.
    let disk_dir = std::env::temp_dir().join(format!("parallel_sendfile-disk-{}", std::process::id()));
    let _remove = RemoveOnDrop(args.on_disk.then(|| disk_dir.clone()));
    let disk = if args.on_disk {
        let t = Instant::now();
        let mem_mib = args.disk_mem_mib.unwrap_or(2 * args.cache_mib);
        let d = set.on_disk(&disk_dir, mem_mib)?;
        eprintln!(
            "on disk: {} files in {} behind a page cache of {mem_mib} MiB, written in {:.2} s",
            d.files.len(),
            disk_dir.display(),
            t.elapsed().as_secs_f64()
        );
        Some(d)
    } else {
        None
    };
    let mut runs: Vec<(String, &FileSet)> = Vec::new();
    for name in &args.sets {
        runs.push((name.clone(), &set));
    }
    if let Some(d) = &disk {
        for name in &args.sets {
            runs.push((format!("{name}-disk"), d));
        }
    }
    let slice = args.duration / args.rounds;
    eprintln!(
        "{} server workers (pinned), {} client threads, {} connections; {:.1} s per mode and set in {} slices of \
         {:.2} s (+ {:.2} s warm-up each), {} slices",
        workers,
        client_threads,
        args.connections,
        args.duration.as_secs_f64(),
        args.rounds,
        slice.as_secs_f64(),
        args.warmup.as_secs_f64(),
        runs.len() * args.modes.len() * args.rounds as usize
    );

    let mut rows = Vec::new();
    for (set_name, run_set) in &runs {
        let inside_set = set_name.starts_with("inside");
        let files = if inside_set { &run_set.files[..inside] } else { &run_set.files[..] };
        // With --huge, sendfile of the in-memory set sends from small pages.
        let set_for = |mode: Mode| -> &FileSet {
            if run_set.cache.is_some() {
                run_set
            } else {
                set_for(mode)
            }
        };
        let targets: Vec<Target> = files
            .iter()
            .map(|e| Target {
                path: format!("/{}", e.name),
                len: e.len(),
                seed: if args.no_verify { None } else { e.seed },
            })
            .collect();
        let mut sums: Vec<Sum> = args.modes.iter().map(|_| Sum::default()).collect();
        let keep = inside_set;
        let mut senders: Vec<Option<Sender>> = args.modes.iter().map(|_| None).collect();
        for round in 0..args.rounds {
            for (k, &mode) in args.modes.iter().enumerate() {
                let label = if args.rounds > 1 {
                    format!("{set_name}/{mode} {}/{}", round + 1, args.rounds)
                } else {
                    format!("{set_name}/{mode}")
                };
                let warm = senders[k].is_some();
                let sender = match senders[k].take() {
                    Some(s) => s,
                    None => new_sender(args, set_for(mode.mode), mode.mode, workers)?,
                };
                let warmup = if warm { args.warmup / 4 } else { args.warmup };
                let slice = Run { label: &label, mode, duration: slice, warmup, settle: keep, round };
                let s = run_slice(args, set_for(mode.mode), &targets, &sender, &slice, &cores, client_threads)?;
                sums[k].add(s);
                if keep {
                    senders[k] = Some(sender);
                }
            }
        }
        drop(senders);
        for (sum, &mode) in sums.into_iter().zip(&args.modes) {
            rows.push(report::Row { mode: mode.to_string(), ..sum.row(set_name, mode.mode) });
        }
    }
    report::compare_to_sendfile(&mut rows);

    println!();
    print!("{}", report::table(&rows));
    report::print_footer(args, &rows, workers);
    let csv_path = args.csv.clone().unwrap_or_else(default_csv);
    report::write(&csv_path, &report::csv(&rows)?)?;
    println!("wrote {}", csv_path.display());
    let svg_path = csv_path.with_extension("svg");
    let note = format!(
        "inside: {} files, {:.1} MiB (caches of {} MiB); beyond: {} files, {:.0} MiB",
        inside,
        mib(acc),
        args.cache_mib,
        set.files.len(),
        mib(set.total_bytes())
    );
    chart::svg(&rows, &svg_path, &note)?;
    println!("wrote {}", svg_path.display());
    if let Some(p) = &args.json {
        let config = [
            ("modes", args.modes.iter().map(|m| m.to_string()).collect::<Vec<_>>().join(",")),
            ("sizes", format!("{min}-{max}")),
            ("connections", args.connections.to_string()),
            ("duration_s", args.duration.as_secs_f64().to_string()),
            ("rounds", args.rounds.to_string()),
            ("warmup_s", args.warmup.as_secs_f64().to_string()),
            ("workers", workers.to_string()),
            ("client_threads", client_threads.to_string()),
            ("cache_mib", args.cache_mib.to_string()),
            ("max_run_pages", args.max_run.to_string()),
            ("map_run_pages", args.map_run.to_string()),
            ("verify_every", if args.no_verify { "off".to_string() } else { args.verify_every.to_string() }),
            ("spot_check", args.spot_check.to_string()),
            ("files", set.files.len().to_string()),
            ("inside_files", inside.to_string()),
            ("on_disk", args.on_disk.to_string()),
            (
                "disk_mem_mib",
                if args.on_disk { args.disk_mem_mib.unwrap_or(2 * args.cache_mib).to_string() } else { "none".into() },
            ),
        ];
        report::write(p, &report::json(&config, &rows)?)?;
        println!("wrote {}", p.display());
    }
    let bad: u64 = rows.iter().map(|r| r.verify_failures).sum();
    if bad > 0 {
        return Err(format!("{bad} responses failed verification"));
    }
    Ok(())
}

// === one slice ===

struct Snapshot {
    served: u64,
    calls: u64,
    mmu: Option<MmuStats>,
    cache: Option<CacheStats>,
    cpu: Option<CpuShare>,
    page_cache: Option<(u64, u64)>,
}

/// Removes a directory (the file set written for `--on-disk`) when dropped.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(d) = &self.0 {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn new_sender(args: &BenchArgs, set: &FileSet, mode: Mode, workers: usize) -> Result<Sender, String> {
    let opts = SendOptions::default()
        .stall_timeout(Some(Duration::from_secs(10)))
        .close_timeout(Duration::from_millis(200))
        .window_slots(crate::cache_slots(args.cache_mib)?)
        .max_run(args.map_run.max(1))
        .granule(args.granule)
        .reclaim(args.reclaim)
        .cpus(Some(workers));
    Sender::new(mode, &set.mem, opts).map_err(|e| format!("{mode}: {e}"))
}

/// One slice to run.
struct Run<'a> {
    label: &'a str,
    mode: ServerMode,
    duration: Duration,
    warmup: Duration,
    /// Warm up until the mapping cache stops missing.
    settle: bool,
    round: u32,
}

fn run_slice(
    args: &BenchArgs,
    set: &FileSet,
    targets: &[Target],
    sender: &Sender,
    run: &Run<'_>,
    cores: &[Option<core_affinity::CoreId>],
    client_threads: usize,
) -> Result<Slice, String> {
    let Run { label, mode, duration, round, .. } = *run;
    /// A cache that has not missed for this long, and for `QUIET_REQUESTS`
    /// requests per file of the working set, is warm.
    const QUIET: Duration = Duration::from_millis(200);
    const QUIET_REQUESTS: u64 = 8;
    /// The longest warm-up, in warm-ups.
    const WARMUP_CAP: u32 = 8;
    let (port, listeners) = server::bind_listeners(0, cores.len()).map_err(|e| format!("bind: {e}"))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let stats = Stats::default();
    let stop = AtomicBool::new(false);
    let shared = Shared { files: set, sender, stop: &stop, stats: &stats, limits: server::Limits::default() };
    let progress = Progress::default();
    // Counters at the start and the end of the measured seconds.
    let snap = || Snapshot {
        served: stats.requests.load(Relaxed),
        calls: stats.calls.load(Relaxed),
        mmu: sender.mmu_stats(),
        cache: sender.cache_stats(),
        cpu: CpuShare::now(),
        page_cache: set.cache_stats().map(|c| (c.hits, c.misses)),
    };
    let mut snaps: [Option<Snapshot>; 2] = [None, None];

    let start = Instant::now();
    let clock = Clock::new(start);
    // On a working set the caches hold, warm up until they stop missing
    // (steady state), at most `WARMUP_CAP` times the warm-up.
    let settle = run.settle && sender.cache_stats().is_some();
    let mut quiet_since: Option<(Instant, u64, CacheStats)> = None;
    let quiet_requests = QUIET_REQUESTS * targets.len() as u64;
    let (outcomes, worker_result) = thread::scope(|s| {
        let workers = match mode.runtime {
            Runtime::Threads => server::spawn_workers(s, listeners, &shared, cores),
            Runtime::Tokio => vec![s.spawn(|| crate::tokio_server::run(&shared, listeners, cores))],
        };
        let clients: Vec<_> = (0..client_threads)
            .map(|i| {
                let conns = args.connections / client_threads + usize::from(i < args.connections % client_threads);
                let plan = Plan {
                    addr,
                    targets,
                    connections: conns,
                    clock: &clock,
                    seed: args.seed ^ ((i as u64 + 1) << 32) ^ ((mode.mode as u64) << 8) ^ u64::from(round),
                    verify_every: args.verify_every.max(1),
                    spot_check: args.spot_check,
                };
                let progress = &progress;
                s.spawn(move || client::run(&plan, progress))
            })
            .collect();
        let mut last = (Instant::now(), 0u64, 0u64);
        while !clients.iter().all(|c| c.is_finished()) {
            let now = Instant::now();
            if snaps[0].is_none() {
                // Warming up: start measuring once the warm-up is over (and,
                // with `settle`, the cache has stopped missing).
                let warm = now >= start + run.warmup;
                let served = stats.requests.load(Relaxed);
                let settled = !settle
                    || now >= start + run.warmup * WARMUP_CAP
                    || match (quiet_since, sender.cache_stats()) {
                        (Some((t, r0, c0)), Some(c)) if c.lookups - c.hits == c0.lookups - c0.hits => {
                            now.duration_since(t) >= QUIET && served - r0 >= quiet_requests
                        }
                        (_, c) => {
                            quiet_since = c.map(|c| (now, served, c));
                            false
                        }
                    };
                if warm && settled {
                    let s0 = snap();
                    clock.begin(Instant::now(), duration);
                    snaps[0] = Some(s0);
                }
            } else if snaps[1].is_none() && clock.deadline().is_some_and(|d| now >= d) {
                snaps[1] = Some(snap());
            }
            // Wake at the end of the measured seconds, or to look again.
            let mut wake = now + Duration::from_millis(if snaps[0].is_none() { 20 } else { 250 });
            if let (None, Some(d)) = (&snaps[1], clock.deadline()) {
                wake = wake.min(d);
            }
            thread::sleep(wake.saturating_duration_since(Instant::now()));
            let now = Instant::now();
            if snaps[0].is_none() {
                continue;
            }
            let (b, r) = (progress.bytes.load(Relaxed), progress.requests.load(Relaxed));
            let dt = now.duration_since(last.0).as_secs_f64();
            if dt < 0.1 {
                continue;
            }
            let (Some(measure_from), Some(deadline)) = (clock.measure_from(), clock.deadline()) else { continue };
            let phase = if now < deadline { "measuring" } else { "draining" };
            let elapsed = now.saturating_duration_since(measure_from).min(duration).as_secs_f64();
            eprint!(
                "\r  {label:<22} {phase:<9} {elapsed:4.1}/{:.1} s  {:6.2} GB/s  {:8.0} req/s  errors {}   ",
                duration.as_secs_f64(),
                (b - last.1) as f64 / dt / 1e9,
                (r - last.2) as f64 / dt,
                progress.errors.load(Relaxed)
            );
            let _ = std::io::stderr().flush();
            last = (now, b, r);
        }
        // The clients stop right at the deadline when nothing is in flight:
        // the loop may not have looked since.
        if snaps[0].is_some() && snaps[1].is_none() {
            snaps[1] = Some(snap());
        }
        let outcomes: Vec<Outcome> = clients.into_iter().map(|c| c.join().unwrap_or_default()).collect();
        stop.store(true, Relaxed);
        let mut wr = Ok(());
        for w in workers {
            match w.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => wr = Err(format!("{label}: server worker: {e}")),
                Err(_) => wr = Err(format!("{label}: a server worker panicked")),
            }
        }
        (outcomes, wr)
    });
    worker_result?;
    if let Some(l) = sender.lwbuf() {
        l.lwbufs().check_consistency().map_err(|e| format!("{label}: lwbuf caches inconsistent: {e}"))?;
    }
    let [Some(s0), Some(s1)] = snaps else {
        return Err(format!("{label}: the clients finished before the measurement ended"));
    };
    let slice = Slice {
        secs: duration.as_secs_f64(),
        responses: progress.requests.load(Relaxed),
        served: s1.served - s0.served,
        calls: s1.calls - s0.calls,
        waits: stats.waits.load(Relaxed),
        map_syscalls: match (s0.mmu, s1.mmu) {
            (Some(a), Some(b)) => Some(b.since(&a).syscalls),
            _ => None,
        },
        // The calls that took old pages out of the window (each a TLB
        // flush): removes, and enters that mapped over a mapping in place.
        remaps: match (s0.mmu, s1.mmu) {
            (Some(a), Some(b)) => {
                let d = b.since(&a);
                Some(d.removes + d.replaces)
            }
            _ => None,
        },
        granule: sender.granule(),
        cache: match (s0.cache, s1.cache) {
            (Some(a), Some(b)) => Some(b.since(&a)),
            _ => None,
        },
        page_cache: match (s0.page_cache, s1.page_cache) {
            (Some(a), Some(b)) => Some((b.0 - a.0, b.1 - a.1)),
            _ => None,
        },
        zc_completed: stats.zc_completed.load(Relaxed),
        zc_copied: stats.zc_copied.load(Relaxed),
        cpu: match (s0.cpu, s1.cpu) {
            (Some(a), Some(b)) => Some(b.since(&a)),
            _ => None,
        },
        outcomes,
    };
    let bytes: u64 = slice.outcomes.iter().map(|o| o.bytes).sum();
    let requests: u64 = slice.outcomes.iter().map(|o| o.requests).sum();
    let errors: u64 = slice.outcomes.iter().map(|o| o.errors).sum();
    eprintln!(
        "\r  {label:<22} done: {:.2} GB/s, {:.0} req/s, {:.1} EAGAIN waits/req, {}{}{} errors{}{}",
        bytes as f64 / slice.secs / 1e9,
        requests as f64 / slice.secs,
        slice.waits as f64 / slice.served.max(1) as f64,
        slice.cache.map(|c| format!("{:.1}% hits, ", 100.0 * c.hit_rate())).unwrap_or_default(),
        slice
            .page_cache
            .map(|(h, m)| format!("page cache {:.1}% hits, ", 100.0 * h as f64 / (h + m).max(1) as f64))
            .unwrap_or_default(),
        errors,
        slice
            .outcomes
            .iter()
            .find_map(|o| o.first_error.as_deref())
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default(),
        " ".repeat(24)
    );
    Ok(slice)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn short_run_of_every_mode_verifies_every_byte() {
        let dir = std::env::temp_dir().join(format!("parallel_sendfile-test-{}", std::process::id()));
        let csv = dir.join("out.csv");
        let json = dir.join("out.json");
        let cli = crate::Cli::try_parse_from([
            "x",
            "--duration",
            "0.2",
            "--warmup",
            "0.05",
            "--cache-mib",
            "1",
            "--sizes",
            "4k-64k",
            "--connections",
            "6",
            "--max-run",
            "3",
            "--verify-every",
            "1",
            "--csv",
            csv.to_str().expect("utf-8"),
            "--json",
            json.to_str().expect("utf-8"),
        ])
        .expect("args");
        run(&cli.bench).expect("benchmark run");
        let text = std::fs::read_to_string(&csv).expect("csv");
        assert_eq!(text.lines().count(), 1 + 2 * ServerMode::defaults().len());
        for line in text.lines().skip(1) {
            let col = |name| column(&text, line, name);
            assert!(col("requests").parse::<u64>().expect("requests") > 0, "{line}");
            assert_eq!(col("verify_failures"), "0", "no verify failures: {line}");
        }
        assert!(std::fs::read_to_string(&json).expect("json").contains("\"rows\""));
        let svg = std::fs::read_to_string(dir.join("out.svg")).expect("the chart beside the CSV");
        assert!(Mode::ALL.iter().all(|m| svg.contains(m.name())), "every mode on the chart");
        std::fs::remove_dir_all(&dir).ok();
    }

    /// The cell of `line` under the header `name` of the CSV `text`.
    fn column<'a>(text: &str, line: &'a str, name: &str) -> &'a str {
        let head = text.lines().next().expect("a header");
        let i = head.split(',').position(|h| h == name).unwrap_or_else(|| panic!("no column {name}: {head}"));
        line.split(',').nth(i).expect("a cell per column")
    }

    #[test]
    fn sampled_verification_drops_or_spot_checks_the_rest() {
        for extra in [&[][..], &["--spot-check"][..]] {
            let dir = std::env::temp_dir().join(format!("parallel_sendfile-sampled-{}", std::process::id()));
            let csv = dir.join("out.csv");
            let mut argv = vec![
                "x",
                "--modes",
                "sendfile,lwbuf-run",
                "--sets",
                "inside",
                "--duration",
                "0.3",
                "--warmup",
                "0.05",
                "--cache-mib",
                "1",
                "--sizes",
                "4k-200k",
                "--connections",
                "4",
                "--verify-every",
                "3",
                "--csv",
                csv.to_str().expect("utf-8"),
            ];
            argv.extend_from_slice(extra);
            let cli = crate::Cli::try_parse_from(argv).expect("args");
            run(&cli.bench).expect("benchmark run");
            let text = std::fs::read_to_string(&csv).expect("csv");
            for line in text.lines().skip(1) {
                let col = |name| column(&text, line, name);
                let (verified, responses): (u64, u64) = (
                    col("fully_verified").parse().expect("fully_verified"),
                    col("responses").parse().expect("responses"),
                );
                assert!(verified > 0 && verified < responses, "{extra:?}: a sample: {line}");
                assert_eq!(col("verify_failures"), "0", "no verify failures: {line}");
            }
            std::fs::remove_dir_all(&dir).ok();
        }
    }

    #[test]
    fn on_disk_sets_are_served_through_the_page_cache_and_verified() {
        let dir = std::env::temp_dir().join(format!("parallel_sendfile-ondisk-{}", std::process::id()));
        let csv = dir.join("out.csv");
        let cli = crate::Cli::try_parse_from([
            "x",
            "--modes",
            "sendfile,sfbuf,lwbuf-run,direct,tokio-lwbuf",
            "--on-disk",
            // 4 MiB of files through 2 MiB of page cache: the beyond set
            // misses, the inside one (0.5 MiB) fits.
            "--disk-mem-mib",
            "2",
            "--duration",
            "0.2",
            "--warmup",
            "0.05",
            "--cache-mib",
            "1",
            "--sizes",
            "4k-64k",
            "--connections",
            "6",
            "--verify-every",
            "1",
            "--csv",
            csv.to_str().expect("utf-8"),
        ])
        .expect("args");
        run(&cli.bench).expect("benchmark run");
        let text = std::fs::read_to_string(&csv).expect("csv");
        assert_eq!(text.lines().count(), 1 + 4 * 5, "2 sets in memory and 2 on disk, 5 modes: {text}");
        for line in text.lines().skip(1) {
            let col = |name| column(&text, line, name);
            assert!(col("requests").parse::<u64>().expect("requests") > 0, "{line}");
            assert_eq!(col("verify_failures"), "0", "no verify failures: {line}");
            assert_eq!(col("errors"), "0", "{line}");
            let disk = col("set").ends_with("-disk");
            assert_eq!(col("page_cache_hit_rate").is_empty(), !disk, "{line}");
        }
        let beyond = text.lines().find(|l| l.starts_with("beyond-disk,")).expect("a beyond-disk row");
        let rate: f64 = column(&text, beyond, "page_cache_hit_rate").parse().expect("a rate");
        assert!(rate < 1.0, "the beyond set does not fit the page cache: {beyond}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn the_table_shows_every_mode_once() {
        let mut ours: Vec<&str> = MODES.iter().map(|m| m.name()).collect();
        let mut all: Vec<&str> = Mode::ALL.iter().map(|m| m.name()).collect();
        ours.sort_unstable();
        all.sort_unstable();
        assert_eq!(ours, all, "bench::MODES lists every mode of the library once");
    }
}
