//! What the benchmarks share: reading back the medians criterion wrote in
//! this run, for the summaries each bench prints after its groups.

use std::path::PathBuf;

/// Where criterion writes its estimates (its own search order).
pub fn criterion_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("CRITERION_HOME") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        return Some(PathBuf::from(d).join("criterion"));
    }
    // target/<profile>/deps/<this binary>
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.parent()?.parent()?.join("criterion"))
}

/// The median of a benchmark from this run, in ns.
pub fn median_ns(group: &str, bench: &str) -> Option<f64> {
    let path = criterion_dir()?.join(group).join(bench).join("new").join("estimates.json");
    let json = std::fs::read_to_string(path).ok()?;
    let after = &json[json.find("\"median\"")?..];
    let after = &after[after.find("\"point_estimate\":")? + "\"point_estimate\":".len()..];
    let end = after.find([',', '}'])?;
    after[..end].trim().parse().ok()
}

/// Candidate and baseline measured side by side: `rounds` rounds, each
/// timing `iters` calls of `a` and then of `b` with `clock` (a reading in
/// ns), in alternating order. Slow drifts of a shared machine then hit both
/// alike; the median per-round ratio is what a target is checked against.
/// Each side is called with its own running step number (1, 2, ...), to
/// walk an access sequence.
pub struct Paired {
    /// Median ns per call of the candidate, over the rounds.
    pub a_ns: f64,
    /// Median ns per call of the baseline.
    pub b_ns: f64,
    /// Median of the per-round ratios a / b.
    pub ratio: f64,
}

pub fn paired<A, B>(
    rounds: usize,
    iters: usize,
    clock: impl Fn() -> f64,
    mut a: impl FnMut(usize) -> A,
    mut b: impl FnMut(usize) -> B,
) -> Paired {
    let (mut step_a, mut step_b) = (0, 0);
    let (mut ta, mut tb, mut r) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let (x, y) = if round % 2 == 0 {
            let x = time(iters, &clock, &mut a, &mut step_a);
            (x, time(iters, &clock, &mut b, &mut step_b))
        } else {
            let y = time(iters, &clock, &mut b, &mut step_b);
            (time(iters, &clock, &mut a, &mut step_a), y)
        };
        ta.push(x);
        tb.push(y);
        r.push(x / y);
    }
    Paired { a_ns: median(&mut ta), b_ns: median(&mut tb), ratio: median(&mut r) }
}

/// ns per call of `f` over `iters` calls, continuing from step `*step`.
fn time<R>(iters: usize, clock: &impl Fn() -> f64, f: &mut impl FnMut(usize) -> R, step: &mut usize) -> f64 {
    let t = clock();
    for _ in 0..iters {
        *step += 1;
        std::hint::black_box(f(*step));
    }
    (clock() - t) / iters as f64
}

/// The median of `v` (sorted in place; the upper one of an even count).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
