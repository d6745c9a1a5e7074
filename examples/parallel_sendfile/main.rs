//! A sendfile-style HTTP/1.1 server on loopback, driven by parallel clients,
//! with every sending mode of `lwbuf::sendfile` side by side.
//!
//! ```text
//! cargo run --release --example parallel_sendfile              # the benchmark, ~1 minute
//! cargo run --release --example parallel_sendfile -- --help
//! cargo run --release --example parallel_sendfile -- serve --dir DIR --port 8080 --mode sendfile
//! cargo run --release --example parallel_sendfile -- serve --dir DIR --runtime tokio --mode lwbuf
//! ```
//!
//! The benchmark builds a file set in the page-cache stand-in (generated
//! content, so clients verify bytes without a copy), starts one pinned
//! worker thread per CPU, and runs each mode for a few seconds against two
//! working sets: one inside the configured cache capacity and one beyond it.
//! It prints one table and writes it as CSV (and JSON with `--json`), with
//! a bar chart of it beside the CSV (SVG).

mod bench;
mod chart;
mod client;
mod fileset;
mod http;
mod modes;
mod procstat;
mod report;
#[cfg(test)]
mod serve_tests;
mod server;
mod tokio_send;
mod tokio_server;
#[cfg(test)]
mod tokio_tests;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use lwbuf::sendfile::Mode;
use modes::{Runtime, ServerMode};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Sendfile-style server and parallel clients on loopback: every lwbuf send mode side by side"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    bench: BenchArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the files of a directory over HTTP/1.1 (keep-alive) on 127.0.0.1.
    #[command(long_about = SERVE_ABOUT)]
    Serve(ServeArgs),
}

const SERVE_ABOUT: &str = "\
Serve the files of a directory over HTTP/1.1 (keep-alive) on 127.0.0.1.

The files are loaded into the page-cache stand-in at startup; later changes
on disk are not seen. With --mem-mib N they stay on disk and are read through
a page cache of N MiB instead: a file changed on disk is served as it is at
the request (new length, validators and bytes, never a mix), a file deleted
gets 404, and a request whose pages cannot be had (every frame pinned by
other requests) gets 503. GET and HEAD (405 otherwise); a single Range (206, or
416 with Content-Range: bytes */LEN; several ranges get 200 and the whole
file); Last-Modified with If-Modified-Since and a strong ETag with
If-None-Match (304); If-Range; Content-Type by extension; index.html for a
path ending in / (a directory named without the / is redirected, 301; no
listings). Paths are percent-decoded; .. segments, encoded or not, empty
segments, backslashes and NUL are refused (400), and nothing outside the
directory is ever loaded. HTTP/1.0 connections close unless the request
says Connection: keep-alive; Connection: close closes after the response.
Requests with a body are refused (400).

Limits (all workers together for --max-connections): a request head larger
than --max-header-bytes or with more than --max-headers fields gets 431; a
connection with no complete request for --idle-timeout seconds is closed,
with 408 if part of a request had arrived; a connection beyond
--max-connections gets 503 at once. Every error but 404 and 405 closes the
connection (after the response; what the client still sends is drained for
up to a second).";

/// Options of the benchmark (the default command).
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Modes to run, comma-separated (sendfile, copy, mmap, sfbuf, lwbuf, lwbuf-run, direct, zerocopy on
    /// the thread-per-core server; tokio-sfbuf, tokio-lwbuf, tokio-lwbuf-run on the tokio server).
    // The default is every mode, in the order the table shows them.
    #[arg(long, value_delimiter = ',', value_parser = parse_server_mode, default_values_t = ServerMode::defaults())]
    pub modes: Vec<ServerMode>,
    /// File sizes: MIN-MAX (log-uniform) or one SIZE, with k/m suffixes.
    #[arg(long, value_parser = parse_sizes, default_value = "4k-4m")]
    pub sizes: (u64, u64),
    /// Client connections (keep-alive), spread over the client threads.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Seconds measured per mode and working set (over all rounds).
    #[arg(long, value_parser = parse_secs, default_value = "2.5")]
    pub duration: Duration,
    /// Slices each mode's measured seconds are split into, run in turn
    /// with the other modes' (a fresh server each, cold caches).
    #[arg(long, default_value_t = 2)]
    pub rounds: u32,
    /// Seconds of warm-up before each slice.
    #[arg(long, value_parser = parse_secs, default_value = "0.3")]
    pub warmup: Duration,
    /// Server worker threads, one per CPU, pinned (default: every core).
    #[arg(long)]
    pub cpus: Option<usize>,
    /// Client threads (default: as many as server workers).
    #[arg(long)]
    pub client_threads: Option<usize>,
    /// Cache capacity in MiB (the window of mmap and sfbuf, each CPU's share
    /// of the lwbuf window): the "inside" working set is half of it, the
    /// "beyond" one four times it.
    #[arg(long, default_value_t = 64)]
    pub cache_mib: u64,
    /// Longest run of contiguous frames sfbuf and lwbuf-run map as one
    /// mapping, in pages.
    #[arg(long, default_value_t = 16)]
    pub map_run: usize,
    /// Mapping granule of the caches, in 4 KiB frames (a power of two):
    /// the unit they map, cache and evict; a page's whole granule is mapped
    /// with it. Default: the memory's smallest (1, or 512 with --huge).
    #[arg(long)]
    pub granule: Option<usize>,
    /// Put the file set in huge pages (hugetlbfs, 2 MiB): the caches map
    /// whole huge pages. Needs huge pages reserved, as root:
    /// echo N > /proc/sys/vm/nr_hugepages (the error says how many).
    #[arg(long)]
    pub huge: bool,
    /// What the caches do with evicted mappings: lazy (map over them in
    /// place later, one system call) or strict (unmap at once).
    #[arg(long, value_parser = parse_reclaim, default_value = "lazy")]
    pub reclaim: lwbuf::Reclaim,
    /// Working sets to run, comma-separated (inside, beyond).
    #[arg(long, value_delimiter = ',', default_value = "inside,beyond")]
    pub sets: Vec<String>,
    /// Also write the file set to a temporary directory and serve it from
    /// there through a page cache (`--disk-mem-mib`), beside the in-memory
    /// set: each working set is run again as `SET-disk`, every request
    /// pinning its pages in the page cache for the send.
    #[arg(long)]
    pub on_disk: bool,
    /// The page cache's memory for --on-disk, in MiB (default: twice
    /// --cache-mib, which holds the inside set and half of the beyond one).
    #[arg(long)]
    pub disk_mem_mib: Option<u64>,
    /// Longest run of contiguous frames per file, in pages (page-cache
    /// fragmentation; each run is its own mapping or sendfile call).
    #[arg(long, default_value_t = 16)]
    pub max_run: usize,
    /// Seed of the file sizes, contents and request order.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Check every byte of one response in N, at random (and of each
    /// connection's first). Status, length and framing are checked on every
    /// response; the other bodies are dropped unread by the kernel
    /// (`recv(MSG_TRUNC)`), or spot-checked with `--spot-check`. 1: every
    /// byte of every response (the clients then spend about a quarter of
    /// the CPU time on it, which the server cannot use).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    pub verify_every: u64,
    /// Read the bodies of the responses that are not checked in full and
    /// check the first 8 bytes of every 4 KiB page (a page from the wrong
    /// frame is then caught on every response; the clients copy every byte).
    #[arg(long)]
    pub spot_check: bool,
    /// Skip the byte-by-byte check in the clients.
    #[arg(long)]
    pub no_verify: bool,
    /// Where to write the table as CSV (default: target/parallel_sendfile.csv);
    /// a chart of it goes beside, with the extension .svg.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Also write the table as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Options of `serve`.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Directory whose files are served (loaded into the page-cache stand-in at startup).
    #[arg(long)]
    pub dir: PathBuf,
    /// Port on 127.0.0.1 (0: any free port, printed at startup).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Sending mode.
    #[arg(long, value_parser = parse_mode, default_value = "sendfile")]
    pub mode: Mode,
    /// Server: one mio event loop per pinned worker thread (every mode), or a
    /// tokio multi-thread runtime with a task per connection (sfbuf, lwbuf,
    /// lwbuf-run: owned handles held across .await).
    #[arg(long, value_enum, default_value_t = Runtime::Threads)]
    pub runtime: Runtime,
    /// Worker threads, one per CPU, pinned (default: every core).
    #[arg(long)]
    pub cpus: Option<usize>,
    /// Stop after this many seconds (default: run until SIGINT/SIGTERM).
    #[arg(long, value_parser = parse_secs)]
    pub duration: Option<Duration>,
    /// Refuse to load more than this many MiB (without --mem-mib).
    #[arg(long, default_value_t = 4096)]
    pub max_mib: u64,
    /// Serve the files from disk through a page cache of this many MiB
    /// (a memory of that size, all of it the cache's budget; pages pinned
    /// only while a request sends them), whatever the directory's size:
    /// only the names and stat of the files are read at start, each file
    /// is opened on its first request, and a file changed on disk is seen
    /// at its next request. Without it, every file is loaded into memory
    /// at start.
    #[arg(long)]
    pub mem_mib: Option<u64>,
    /// Longest run of contiguous frames per file, in pages (0: unlimited).
    #[arg(long, default_value_t = 0)]
    pub max_run: usize,
    /// Cache capacity in MiB (window of mmap and sfbuf; per CPU for lwbuf).
    #[arg(long, default_value_t = 64)]
    pub cache_mib: u64,
    /// Longest run of contiguous frames sfbuf and lwbuf-run map as one
    /// mapping, in pages.
    #[arg(long, default_value_t = 16)]
    pub map_run: usize,
    /// Mapping granule of the caches, in 4 KiB frames (a power of two).
    /// Default: the memory's smallest (1).
    #[arg(long)]
    pub granule: Option<usize>,
    /// What the caches do with evicted mappings: lazy or strict.
    #[arg(long, value_parser = parse_reclaim, default_value = "lazy")]
    pub reclaim: lwbuf::Reclaim,
    /// Most bytes of a request head (request line and header fields);
    /// beyond: 431 and close.
    #[arg(long, value_parser = parse_size, default_value = "16k")]
    pub max_header_bytes: u64,
    /// Most header fields of a request (1-256); beyond: 431 and close.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=http::HEADERS_CAP as i64))]
    pub max_headers: u16,
    /// Seconds a connection may go without a complete request (since it
    /// was accepted or its last response was sent); then it is closed, with
    /// 408 if part of a request had arrived.
    #[arg(long, value_parser = parse_secs, default_value = "30")]
    pub idle_timeout: Duration,
    /// Most connections open at once (all workers); beyond: 503 and close.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: u64,
}

impl ServeArgs {
    /// The server's limits, from the options.
    pub fn limits(&self) -> Result<server::Limits, String> {
        if self.max_header_bytes < 64 || self.max_header_bytes > 1 << 20 {
            return Err("--max-header-bytes must be between 64 and 1m".into());
        }
        if self.idle_timeout.is_zero() {
            return Err("--idle-timeout must be above 0".into());
        }
        Ok(server::Limits {
            http: http::Limits { max_head: self.max_header_bytes as usize, max_headers: usize::from(self.max_headers) },
            idle: self.idle_timeout,
            max_connections: usize::try_from(self.max_connections).unwrap_or(usize::MAX),
        })
    }
}

fn parse_reclaim(s: &str) -> Result<lwbuf::Reclaim, String> {
    match s {
        "lazy" => Ok(lwbuf::Reclaim::Lazy),
        "strict" => Ok(lwbuf::Reclaim::Strict),
        _ => Err(format!("{s:?}: lazy or strict")),
    }
}

fn parse_mode(s: &str) -> Result<Mode, String> {
    s.parse::<Mode>().map_err(|e| e.to_string())
}

fn parse_server_mode(s: &str) -> Result<ServerMode, String> {
    s.parse()
}

/// `4096`, `16k`, `1m`, `1MiB`, `2g`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.trim_end_matches("ib").trim_end_matches('b');
    let (num, mul) = match t.char_indices().last() {
        Some((i, 'k')) => (&t[..i], 1u64 << 10),
        Some((i, 'm')) => (&t[..i], 1 << 20),
        Some((i, 'g')) => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    let n: u64 = num.trim().parse().map_err(|_| format!("{s:?} is not a size (e.g. 4096, 16k, 4m)"))?;
    n.checked_mul(mul).ok_or_else(|| format!("{s:?} is too large"))
}

fn parse_sizes(s: &str) -> Result<(u64, u64), String> {
    let (lo, hi) = match s.split_once('-') {
        Some((a, b)) => (parse_size(a)?, parse_size(b)?),
        None => {
            let v = parse_size(s)?;
            (v, v)
        }
    };
    if lo == 0 || lo > hi {
        return Err(format!("sizes {s:?}: need 0 < MIN <= MAX"));
    }
    if hi > 1 << 30 {
        return Err(format!("sizes {s:?}: files above 1 GiB are not supported here"));
    }
    Ok((lo, hi))
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s.trim().trim_end_matches('s').parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(v.is_finite() && (0.0..=86_400.0).contains(&v)) {
        return Err(format!("{s:?}: seconds must be between 0 and 86400"));
    }
    Ok(Duration::from_secs_f64(v))
}

/// Window slots (4 KiB frames) of a cache of `mib` MiB.
pub fn cache_slots(mib: u64) -> Result<usize, String> {
    if mib == 0 || mib > 64 << 10 {
        return Err("--cache-mib must be between 1 and 65536".into());
    }
    Ok(((mib << 20) / lwbuf::system_page_size() as u64) as usize)
}

/// Cores to pin `n` workers to (all cores if `n` is `None`), and their count.
pub fn cores(n: Option<usize>) -> Vec<Option<core_affinity::CoreId>> {
    let ids = core_affinity::get_core_ids().unwrap_or_default();
    let n = n.unwrap_or(ids.len().max(1)).max(1);
    (0..n).map(|i| if ids.is_empty() { None } else { Some(ids[i % ids.len()]) }).collect()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Serve(args)) => server::serve(&args),
        None => bench::run(&cli.bench),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("parallel_sendfile: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("16k"), Ok(16 << 10));
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999999g").is_err());
        assert_eq!(parse_sizes("4k-4m"), Ok((4096, 4 << 20)));
        assert_eq!(parse_sizes("16k"), Ok((16384, 16384)));
        assert!(parse_sizes("4m-4k").is_err());
        assert!(parse_sizes("0").is_err());
        assert!(parse_secs("-1").is_err());
        assert!(parse_secs("nan").is_err());
        assert_eq!(parse_secs("0.5"), Ok(Duration::from_millis(500)));
    }

    #[test]
    fn cli_parses() {
        Cli::try_parse_from(["x"]).expect("defaults");
        Cli::try_parse_from(["x", "--modes", "sendfile,copy", "--duration", "1"]).expect("bench");
        Cli::try_parse_from(["x", "serve", "--dir", "/tmp", "--mode", "zerocopy"]).expect("serve");
        Cli::try_parse_from(["x", "serve", "--dir", "/tmp", "--mode", "lwbuf-run", "--cache-mib", "8"]).expect("serve");
        let cli = Cli::try_parse_from([
            "x",
            "serve",
            "--dir",
            "/tmp",
            "--max-header-bytes",
            "8k",
            "--max-headers",
            "10",
            "--idle-timeout",
            "2.5",
            "--max-connections",
            "7",
        ])
        .expect("serve limits");
        let Some(Command::Serve(args)) = cli.command else { panic!("serve") };
        let l = args.limits().expect("limits");
        assert_eq!((l.http.max_head, l.http.max_headers), (8192, 10));
        assert_eq!((l.idle, l.max_connections), (Duration::from_millis(2500), 7));
        assert!(Cli::try_parse_from(["x", "serve", "--dir", "/tmp", "--max-headers", "300"]).is_err());
        assert!(Cli::try_parse_from(["x", "serve", "--dir", "/tmp", "--max-connections", "0"]).is_err());
        Cli::try_parse_from(["x", "--modes", "sfbuf,lwbuf,lwbuf-run", "--verify-every", "4", "--spot-check"])
            .expect("bench");
        let cli = Cli::try_parse_from(["x", "--on-disk", "--disk-mem-mib", "32"]).expect("bench on disk");
        assert_eq!((cli.bench.on_disk, cli.bench.disk_mem_mib), (true, Some(32)));
        let cli = Cli::try_parse_from(["x", "serve", "--dir", "/tmp", "--mem-mib", "256"]).expect("serve from disk");
        let Some(Command::Serve(args)) = cli.command else { panic!("serve") };
        assert_eq!(args.mem_mib, Some(256));
        assert!(Cli::try_parse_from(["x", "--modes", "teleport"]).is_err());
        let cli = Cli::try_parse_from(["x", "--modes", "lwbuf,tokio-lwbuf"]).expect("a tokio mode");
        assert_eq!(cli.bench.modes[1], ServerMode { runtime: Runtime::Tokio, mode: Mode::Lwbuf });
        assert!(Cli::try_parse_from(["x", "--modes", "tokio-sendfile"]).is_err(), "tokio maps from the caches");
        let cli = Cli::try_parse_from(["x", "serve", "--dir", "/tmp", "--runtime", "tokio", "--mode", "sfbuf"])
            .expect("serve on tokio");
        let Some(Command::Serve(args)) = cli.command else { panic!("serve") };
        assert_eq!((args.runtime, args.mode), (Runtime::Tokio, Mode::SfBuf));
        assert!(Cli::try_parse_from(["x", "--verify-every", "0"]).is_err());
    }
}
