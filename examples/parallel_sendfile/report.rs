//! The results: each mode's slices added up into a row ([`Sum`]), the
//! ratios to kernel sendfile, and the table as text (with its notes), CSV
//! and JSON.

use std::fmt::Write as _;
use std::path::Path;

use lwbuf::sendfile::{CacheStats, Mode};
use serde::{Serialize, Serializer};

use crate::client::Outcome;
use crate::procstat::CpuShare;
use crate::BenchArgs;

/// One mode on one working set. Serialized (CSV and JSON) under the
/// names given here, in this order; ratios and rates with 4 decimals.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Row {
    pub set: String,
    pub mode: String,
    #[serde(rename = "seconds", serialize_with = "round3")]
    pub secs: f64,
    pub bytes: u64,
    pub requests: u64,
    #[serde(rename = "gb_per_s", serialize_with = "round4")]
    pub gbps: f64,
    #[serde(rename = "requests_per_s", serialize_with = "round1")]
    pub rps: f64,
    #[serde(serialize_with = "round4")]
    pub p50_ms: f64,
    #[serde(serialize_with = "round4")]
    pub p99_ms: f64,
    /// Mapping system calls per request served (window modes), else 0.
    #[serde(rename = "map_syscalls_per_req", serialize_with = "round4")]
    pub map_calls_per_req: f64,
    /// Send system calls (sendmsg/writev/sendfile) per request served.
    #[serde(serialize_with = "round4")]
    pub send_calls_per_req: f64,
    /// The caches' mapping granule in frames (window modes), else none.
    pub granule: Option<usize>,
    /// Calls that took pages out of the window (removes, and maps over an
    /// old mapping in place: each a TLB flush) per request served.
    #[serde(rename = "flush_calls_per_req", serialize_with = "round4_opt")]
    pub flush_calls_per_req: Option<f64>,
    /// Those calls per page the caches evicted (1 when every evicted page
    /// is unmapped on its own; 1/512 for granules of a huge page).
    #[serde(serialize_with = "round4_opt")]
    pub remaps_per_evicted_page: Option<f64>,
    /// Mapping-cache hit rate, for modes with a cache.
    #[serde(rename = "cache_hit_rate", serialize_with = "round4_opt")]
    pub hit_rate: Option<f64>,
    /// Requests/s relative to kernel sendfile on the same working set.
    #[serde(serialize_with = "round4_opt")]
    pub vs_sendfile: Option<f64>,
    /// Share of zero-copy sends the kernel copied after all.
    #[serde(rename = "zerocopy_copied", serialize_with = "round4_opt")]
    pub zc_copied: Option<f64>,
    pub errors: u64,
    pub verify_failures: u64,
    /// Responses (all, warm-up included) whose every byte was checked.
    pub fully_verified: u64,
    /// Responses received (all, warm-up included).
    pub responses: u64,
    /// Share of all CPU time other processes used during the measured seconds.
    #[serde(serialize_with = "round4_opt")]
    pub other_cpu: Option<f64>,
    /// Page lookups the page cache found resident, for a set on disk.
    #[serde(serialize_with = "round4_opt")]
    pub page_cache_hit_rate: Option<f64>,
}

fn round<S: Serializer>(v: f64, scale: f64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((v * scale).round() / scale)
}

fn round1<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    round(*v, 1e1, s)
}

fn round3<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    round(*v, 1e3, s)
}

fn round4<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    round(*v, 1e4, s)
}

fn round4_opt<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => round(*v, 1e4, s),
        None => s.serialize_none(),
    }
}

// === aggregation ===

/// What one slice measured (raw sums).
#[derive(Default)]
pub struct Slice {
    pub secs: f64,
    pub outcomes: Vec<Outcome>,
    pub responses: u64,
    pub served: u64,
    pub calls: u64,
    pub waits: u64,
    pub map_syscalls: Option<u64>,
    pub remaps: Option<u64>,
    pub granule: Option<usize>,
    pub cache: Option<CacheStats>,
    pub zc_completed: u64,
    pub zc_copied: u64,
    pub cpu: Option<CpuShare>,
    /// Page-cache hits and misses, for a set on disk.
    pub page_cache: Option<(u64, u64)>,
}

/// A mode's slices added up.
#[derive(Default)]
pub struct Sum {
    s: Slice,
}

impl Sum {
    pub fn add(&mut self, o: Slice) {
        let s = &mut self.s;
        s.secs += o.secs;
        s.outcomes.extend(o.outcomes);
        s.responses += o.responses;
        s.served += o.served;
        s.calls += o.calls;
        s.waits += o.waits;
        s.map_syscalls = match (s.map_syscalls, o.map_syscalls) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        s.remaps = match (s.remaps, o.remaps) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        s.granule = s.granule.or(o.granule);
        s.cache = match (s.cache, o.cache) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        s.zc_completed += o.zc_completed;
        s.zc_copied += o.zc_copied;
        s.cpu = match (s.cpu, o.cpu) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        s.page_cache = match (s.page_cache, o.page_cache) {
            (Some(a), Some(b)) => Some((a.0 + b.0, a.1 + b.1)),
            (a, b) => a.or(b),
        };
    }

    pub fn row(self, set: &str, mode: Mode) -> Row {
        let s = self.s;
        let secs = s.secs.max(1e-9);
        let mut lat: Vec<u64> = s.outcomes.iter().flat_map(|o| o.latencies_ns.iter().copied()).collect();
        lat.sort_unstable();
        let pct = |p: f64| -> f64 {
            if lat.is_empty() {
                return 0.0;
            }
            let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
            lat[i] as f64 / 1e6
        };
        let bytes: u64 = s.outcomes.iter().map(|o| o.bytes).sum();
        let requests: u64 = s.outcomes.iter().map(|o| o.requests).sum();
        let served = s.served.max(1) as f64;
        Row {
            set: set.to_string(),
            mode: mode.name().to_string(),
            secs,
            bytes,
            requests,
            gbps: bytes as f64 / secs / 1e9,
            rps: requests as f64 / secs,
            p50_ms: pct(0.50),
            p99_ms: pct(0.99),
            map_calls_per_req: s.map_syscalls.map_or(0.0, |n| n as f64 / served),
            send_calls_per_req: s.calls as f64 / served,
            granule: s.granule,
            flush_calls_per_req: s.remaps.map(|n| n as f64 / served),
            remaps_per_evicted_page: match (s.remaps, s.cache) {
                (Some(n), Some(c)) if c.evicted_pages > 0 => Some(n as f64 / c.evicted_pages as f64),
                _ => None,
            },
            hit_rate: s.cache.map(|c| c.hit_rate()),
            vs_sendfile: None,
            zc_copied: (mode == Mode::ZeroCopy && s.zc_completed > 0)
                .then(|| s.zc_copied as f64 / s.zc_completed as f64),
            errors: s.outcomes.iter().map(|o| o.errors).sum(),
            verify_failures: s.outcomes.iter().map(|o| o.verify_failures).sum(),
            fully_verified: s.outcomes.iter().map(|o| o.fully_verified).sum(),
            responses: s.responses,
            other_cpu: s.cpu.map(|c| c.other()),
            page_cache_hit_rate: s.page_cache.map(|(h, m)| h as f64 / (h + m).max(1) as f64),
        }
    }
}

/// Fill in every row's requests/s relative to kernel sendfile on the same
/// working set (none if sendfile was not run there).
pub fn compare_to_sendfile(rows: &mut [Row]) {
    let bases: Vec<(String, f64)> =
        rows.iter().filter(|r| r.mode == Mode::Sendfile.name()).map(|r| (r.set.clone(), r.rps)).collect();
    for r in rows.iter_mut() {
        let base = bases.iter().find(|(set, _)| *set == r.set).map(|(_, rps)| *rps);
        r.vs_sendfile = base.filter(|b| *b > 0.0).map(|b| r.rps / b);
    }
}

// === text, CSV, JSON ===

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "n/a".to_string(), |x| format!("{x:.digits$}"))
}

pub fn table(rows: &[Row]) -> String {
    let head = [
        "set",
        "mode",
        "GB/s",
        "req/s",
        "p50 ms",
        "p99 ms",
        "map sc/req",
        "flush/req",
        "remap/evicted pg",
        "granule",
        "sends/req",
        "cache hit",
        "vs sendfile",
        "errors",
    ];
    let body: Vec<[String; 14]> = rows
        .iter()
        .map(|r| {
            [
                r.set.clone(),
                r.mode.clone(),
                format!("{:.2}", r.gbps),
                format!("{:.0}", r.rps),
                format!("{:.2}", r.p50_ms),
                format!("{:.2}", r.p99_ms),
                format!("{:.2}", r.map_calls_per_req),
                opt(r.flush_calls_per_req, 2),
                opt(r.remaps_per_evicted_page, 3),
                r.granule.map_or_else(|| "-".to_string(), |g| g.to_string()),
                format!("{:.2}", r.send_calls_per_req),
                opt(r.hit_rate.map(|h| h * 100.0), 1),
                opt(r.vs_sendfile, 2),
                (r.errors).to_string(),
            ]
        })
        .collect();
    let mut w = head.map(str::len);
    for b in &body {
        for (i, c) in b.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let mut s = String::new();
    let line = |s: &mut String, cells: &[&str]| {
        for (i, c) in cells.iter().enumerate() {
            if i < 2 {
                let _ = write!(s, "{c:<width$}  ", width = w[i]);
            } else {
                let _ = write!(s, "{c:>width$}  ", width = w[i]);
            }
        }
        s.truncate(s.trim_end().len());
        s.push('\n');
    };
    line(&mut s, &head);
    let rule: Vec<String> = w.iter().map(|&n| "-".repeat(n)).collect();
    line(&mut s, &rule.iter().map(String::as_str).collect::<Vec<_>>());
    for b in &body {
        line(&mut s, &b.iter().map(String::as_str).collect::<Vec<_>>());
    }
    s
}

/// The notes under the table: what the columns mean, how the caches were
/// sized, how much was verified, and how busy the machine was.
pub fn print_footer(args: &BenchArgs, rows: &[Row], workers: usize) {
    let zc: Vec<&Row> = rows.iter().filter(|r| r.zc_copied.is_some()).collect();
    if !zc.is_empty() {
        let pct: Vec<String> =
            zc.iter().map(|r| format!("{}: {:.0}%", r.set, r.zc_copied.unwrap_or(0.0) * 100.0)).collect();
        println!("zerocopy completions the kernel copied anyway (always on loopback): {}", pct.join(", "));
    }
    println!(
        "GB/s = 10^9 body bytes per second received by the clients; latency = request sent to last byte received; \
         map sc/req = window mmap/remap system calls per request; cache hit = mapping-cache hits (sfbuf, lwbuf); \
         all over the measured seconds only (not the warm-ups)."
    );
    let disk: Vec<String> = rows
        .iter()
        .filter_map(|r| r.page_cache_hit_rate.map(|h| format!("{}/{} {:.1}%", r.set, r.mode, h * 100.0)))
        .collect();
    if !disk.is_empty() {
        println!(
            "SET-disk: the same files written to a temporary directory and served from it through a page cache \
             of {} MiB (every request pins its pages for the send); page-cache hits: {}",
            args.disk_mem_mib.unwrap_or(2 * args.cache_mib),
            disk.join(", ")
        );
    }
    println!(
        "Caches: mmap and sfbuf windows of {} MiB; lwbuf windows of {} MiB per CPU ({} CPUs, each caching what it \
         sends); mappings of up to {} pages (sfbuf, lwbuf-run). Inside: a mode keeps its caches across its {} \
         slices and is measured once they have not missed for 200 ms and 8 requests per file; beyond: every \
         slice starts cold.",
        args.cache_mib,
        args.cache_mib,
        workers,
        args.map_run.max(1),
        args.rounds
    );
    let verified: u64 = rows.iter().map(|r| r.fully_verified).sum();
    let answered: u64 = rows.iter().map(|r| r.responses).sum();
    if args.no_verify {
        println!("Verification: status, length and framing of every response only (--no-verify).");
    } else if args.verify_every <= 1 {
        println!("Verification: status, length, framing and every byte of every response.");
    } else {
        let others = if args.spot_check {
            "the first 8 bytes of every 4 KiB page of the others (a page from the wrong frame is caught on every \
             response)"
        } else {
            "the others' bodies dropped unread by the kernel (recv MSG_TRUNC: no copy; --spot-check to read them)"
        };
        println!(
            "Verification: status, length and framing of every response; every byte of {verified} of {answered} \
             responses ({:.1}%: each connection's first and a random 1 in {}); {others}.",
            100.0 * verified as f64 / answered.max(1) as f64,
            args.verify_every
        );
    }
    let other: Vec<f64> = rows.iter().filter_map(|r| r.other_cpu).collect();
    if !other.is_empty() {
        let mean = other.iter().sum::<f64>() / other.len() as f64;
        let (worst, at) = rows
            .iter()
            .filter_map(|r| r.other_cpu.map(|o| (o, format!("{}/{}", r.set, r.mode))))
            .fold((0.0, String::new()), |a, b| if b.0 > a.0 { b } else { a });
        println!(
            "Other processes used {:.0}% of the CPUs on average during the measured seconds (most: {:.0}%, {at}); \
             the modes share the machine with them, so compare ratios from several runs.",
            100.0 * mean,
            100.0 * worst
        );
    }
}

/// The rows as CSV, a header line first (empty cells for `None`).
pub fn csv(rows: &[Row]) -> Result<String, String> {
    let mut w = csv::Writer::from_writer(Vec::new());
    for r in rows {
        w.serialize(r).map_err(|e| format!("CSV: {e}"))?;
    }
    let bytes = w.into_inner().map_err(|e| format!("CSV: {e}"))?;
    String::from_utf8(bytes).map_err(|e| format!("CSV: {e}"))
}

/// `{"config": {...}, "rows": [...]}`; `config` values are strings.
pub fn json(config: &[(&str, String)], rows: &[Row]) -> Result<String, String> {
    #[derive(Serialize)]
    struct Report<'a> {
        config: serde_json::Map<String, serde_json::Value>,
        rows: &'a [Row],
    }
    let config = config.iter().map(|(k, v)| (k.to_string(), serde_json::Value::String(v.clone()))).collect();
    let mut text = serde_json::to_string_pretty(&Report { config, rows }).map_err(|e| format!("JSON: {e}"))?;
    text.push('\n');
    Ok(text)
}

pub fn write(path: &Path, text: &str) -> Result<(), String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        let rows = vec![
            Row { set: "inside".into(), mode: "sendfile".into(), gbps: 1.5, vs_sendfile: Some(1.0), ..Row::default() },
            Row { set: "inside".into(), mode: "zero\"copy".into(), zc_copied: Some(1.0), ..Row::default() },
        ];
        let t = table(&rows);
        assert_eq!(t.lines().count(), 4);
        assert!(t.contains("n/a"));
        let c = csv(&rows).expect("csv");
        assert_eq!(c.lines().count(), 3);
        assert_eq!(
            c.lines().next(),
            Some(
                "set,mode,seconds,bytes,requests,gb_per_s,requests_per_s,p50_ms,p99_ms,map_syscalls_per_req,\
                 send_calls_per_req,granule,flush_calls_per_req,remaps_per_evicted_page,cache_hit_rate,vs_sendfile,zerocopy_copied,errors,verify_failures,\
                 fully_verified,responses,other_cpu,page_cache_hit_rate"
            )
        );
        assert_eq!(c.lines().nth(1), Some("inside,sendfile,0.0,0,0,1.5,0.0,0.0,0.0,0.0,0.0,,,,,1.0,,0,0,0,0,,"));
        assert!(c.contains("\"zero\"\"copy\""), "quoted: {c}");
        let j = json(&[("modes", "a,b".into())], &rows).expect("json");
        assert!(j.contains("\"zero\\\"copy\"") && j.contains("\"cache_hit_rate\": null"), "{j}");
        let v: serde_json::Value = serde_json::from_str(&j).expect("valid JSON");
        assert_eq!(v["config"]["modes"], "a,b");
        assert_eq!(v["rows"][0]["gb_per_s"], 1.5);
        assert_eq!(v["rows"][1]["zerocopy_copied"], 1.0);
    }
}
