//! Shared scaffolding of the loom models in `tests/`: the model runner with
//! this suite's defaults, and helpers to share borrowed handles between
//! loom threads (which must be `'static`).
//!
//! Everything here compiles only with `RUSTFLAGS="--cfg loom"`.

#![cfg(loom)]

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

pub use lwbuf::__loom::Mutant;

/// Run `f` under loom with `LOOM_MAX_PREEMPTIONS` (default 2) and print
/// how many interleavings were explored and how long it took.
pub fn model<F>(name: &str, f: F)
where
    F: Fn() + Sync + Send + 'static,
{
    let runs = std::sync::Arc::new(AtomicUsize::new(0));
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(2);
    }
    let bound = b.preemption_bound;
    let counter = runs.clone();
    let t0 = Instant::now();
    b.check(move || {
        counter.fetch_add(1, Ordering::Relaxed);
        f();
    });
    println!(
        "loom model {name}: {} interleavings, preemption bound {:?}, {:.2?}",
        runs.load(Ordering::Relaxed),
        bound,
        t0.elapsed()
    );
}

/// Run a model with `mutant` switched on and return the panic message loom
/// (or an assertion in the model) produced. Panics if the model passed:
/// a model that cannot fail checks nothing.
pub fn expect_failure<F>(name: &str, mutant: Mutant, f: F) -> String
where
    F: Fn() + Sync + Send + 'static,
{
    lwbuf::__loom::set_mutant(Some(mutant));
    let r = catch_unwind(AssertUnwindSafe(|| model(name, f)));
    lwbuf::__loom::set_mutant(None);
    match r {
        Ok(()) => panic!("model {name} passed with mutant {mutant:?} switched on: it cannot detect that breakage"),
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "<non-string panic>".into());
            println!("loom model {name} with mutant {mutant:?} failed as expected: {msg}");
            msg
        }
    }
}

/// Give a value a `'static` address for the duration of a model.
pub fn leak<T>(v: T) -> &'static T {
    Box::leak(Box::new(v))
}

/// Drop a value given out by [`leak`].
///
/// # Safety
/// Every thread that used `r` has been joined and no reference derived from
/// it is used afterwards.
pub unsafe fn unleak<T>(r: &'static T) {
    // SAFETY: `r` came from `Box::leak` in `leak` and, by the caller's
    // promise, nothing uses it any more.
    drop(unsafe { Box::from_raw(r as *const T as *mut T) });
}

/// Like [`expect_failure`] for breakages that abort the process: a deadlock
/// loom reports (its clean-up panics while unwinding), or a panic in a
/// thread whose handles and CPU binding call into the library again as they
/// drop. The mutant model runs in a child process (this test binary again,
/// running only `test_name`) and the parent checks that it died reporting
/// `expect` (e.g. "deadlock"). Returns the child's stderr.
pub fn expect_failure_in_child<F>(test_name: &str, name: &str, mutant: Mutant, expect: &str, f: F) -> String
where
    F: Fn() + Sync + Send + 'static,
{
    const CHILD: &str = "LWBUF_LOOM_MUTANT_CHILD";
    if std::env::var(CHILD).as_deref() == Ok(test_name) {
        lwbuf::__loom::set_mutant(Some(mutant));
        model(name, f);
        // Reaching here means the mutant went undetected: exit cleanly so
        // the parent reports it.
        std::process::exit(0);
    }
    let exe = std::env::current_exe().expect("test binary path");
    let out = std::process::Command::new(exe)
        .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, test_name)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run the mutant model in a child process");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "model {name} passed with mutant {mutant:?} switched on: it cannot detect that breakage"
    );
    assert!(
        stderr.to_lowercase().contains(&expect.to_lowercase()),
        "model {name} with mutant {mutant:?} failed, but not with \"{expect}\":\n{stderr}"
    );
    println!("loom model {name} with mutant {mutant:?} failed as expected ({expect}), in a child process");
    stderr
}
