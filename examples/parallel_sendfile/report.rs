//! The results table, as text, CSV and JSON.

use std::fmt::Write as _;
use std::path::Path;

/// One mode on one working set.
#[derive(Clone, Debug, Default)]
pub struct Row {
    pub set: String,
    pub mode: String,
    pub secs: f64,
    pub bytes: u64,
    pub requests: u64,
    pub gbps: f64,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Mapping system calls per request served (window modes), else 0.
    pub map_calls_per_req: f64,
    /// Send system calls (sendmsg/writev/sendfile) per request served.
    pub send_calls_per_req: f64,
    /// Mapping-cache hit rate, for modes with a cache.
    pub hit_rate: Option<f64>,
    /// Requests/s relative to kernel sendfile on the same working set.
    pub vs_sendfile: Option<f64>,
    /// Share of zero-copy sends the kernel copied after all.
    pub zc_copied: Option<f64>,
    pub errors: u64,
    pub verify_failures: u64,
    /// Responses (all, warm-up included) whose every byte was checked.
    pub fully_verified: u64,
    /// Responses received (all, warm-up included).
    pub responses: u64,
    /// Share of all CPU time other processes used during the measured seconds.
    pub other_cpu: Option<f64>,
}

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
        "sends/req",
        "cache hit",
        "vs sendfile",
        "errors",
    ];
    let body: Vec<[String; 11]> = rows
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

const CSV_HEAD: &str = "set,mode,seconds,bytes,requests,gb_per_s,requests_per_s,p50_ms,p99_ms,map_syscalls_per_req,\
                        send_calls_per_req,cache_hit_rate,vs_sendfile,zerocopy_copied,errors,verify_failures,\
                        fully_verified,responses,other_cpu";

fn csv_opt(v: Option<f64>) -> String {
    v.map_or_else(String::new, |x| format!("{x:.4}"))
}

pub fn csv(rows: &[Row]) -> String {
    let mut s = String::from(CSV_HEAD);
    s.push('\n');
    for r in rows {
        let _ = writeln!(
            s,
            "{},{},{:.3},{},{},{:.4},{:.1},{:.4},{:.4},{:.4},{:.4},{},{},{},{},{},{},{},{}",
            r.set,
            r.mode,
            r.secs,
            r.bytes,
            r.requests,
            r.gbps,
            r.rps,
            r.p50_ms,
            r.p99_ms,
            r.map_calls_per_req,
            r.send_calls_per_req,
            csv_opt(r.hit_rate),
            csv_opt(r.vs_sendfile),
            csv_opt(r.zc_copied),
            r.errors,
            r.verify_failures,
            r.fully_verified,
            r.responses,
            csv_opt(r.other_cpu)
        );
    }
    s
}

fn json_opt(v: Option<f64>) -> String {
    v.map_or_else(|| "null".to_string(), |x| format!("{x:.4}"))
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for ch in s.chars() {
        match ch {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// `{"config": {...}, "rows": [...]}`; `config` pairs are emitted as strings.
pub fn json(config: &[(&str, String)], rows: &[Row]) -> String {
    let mut s = String::from("{\n  \"config\": {");
    for (i, (k, v)) in config.iter().enumerate() {
        let _ = write!(s, "{}\n    {}: {}", if i == 0 { "" } else { "," }, json_str(k), json_str(v));
    }
    s.push_str("\n  },\n  \"rows\": [");
    for (i, r) in rows.iter().enumerate() {
        let _ = write!(
            s,
            "{}\n    {{\"set\": {}, \"mode\": {}, \"seconds\": {:.3}, \"bytes\": {}, \"requests\": {}, \
             \"gb_per_s\": {:.4}, \"requests_per_s\": {:.1}, \"p50_ms\": {:.4}, \"p99_ms\": {:.4}, \
             \"map_syscalls_per_req\": {:.4}, \"send_calls_per_req\": {:.4}, \"cache_hit_rate\": {}, \
             \"vs_sendfile\": {}, \"zerocopy_copied\": {}, \"errors\": {}, \"verify_failures\": {}, \
             \"fully_verified\": {}, \"responses\": {}, \"other_cpu\": {}}}",
            if i == 0 { "" } else { "," },
            json_str(&r.set),
            json_str(&r.mode),
            r.secs,
            r.bytes,
            r.requests,
            r.gbps,
            r.rps,
            r.p50_ms,
            r.p99_ms,
            r.map_calls_per_req,
            r.send_calls_per_req,
            json_opt(r.hit_rate),
            json_opt(r.vs_sendfile),
            json_opt(r.zc_copied),
            r.errors,
            r.verify_failures,
            r.fully_verified,
            r.responses,
            json_opt(r.other_cpu)
        );
    }
    s.push_str("\n  ]\n}\n");
    s
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
        let c = csv(&rows);
        assert_eq!(c.lines().count(), 3);
        assert_eq!(c.lines().next().map(|l| l.split(',').count()), c.lines().nth(1).map(|l| l.split(',').count()));
        let j = json(&[("modes", "a,b".into())], &rows);
        assert!(j.contains("\"zero\\\"copy\"") && j.contains("\"cache_hit_rate\": null"));
    }
}
