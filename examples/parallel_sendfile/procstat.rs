//! CPU time from `/proc`: how much of the machine other processes used
//! while a slice was measured (the benchmark shares the machine, so the
//! table says how busy it was).

/// Clock ticks of CPU time: busy on the whole machine, used by this
/// process, and elapsed on all CPUs.
#[derive(Clone, Copy, Debug)]
pub struct CpuShare {
    all: u64,
    ours: u64,
    total: u64,
}

impl CpuShare {
    /// From `/proc/stat` and `/proc/self/stat`; `None` if either is missing.
    pub fn now() -> Option<CpuShare> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let cpu: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
        if cpu.len() < 5 {
            return None;
        }
        let total: u64 = cpu.iter().take(8).sum();
        let idle = cpu[3] + cpu[4];
        let me = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name (which may hold spaces): state is
        // field 3, utime and stime fields 14 and 15.
        let rest: Vec<&str> = me.rsplit_once(')')?.1.split_whitespace().collect();
        let ours = rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?;
        Some(CpuShare { all: total - idle, ours, total })
    }

    pub fn since(&self, e: &CpuShare) -> CpuShare {
        CpuShare {
            all: self.all.saturating_sub(e.all),
            ours: self.ours.saturating_sub(e.ours),
            total: self.total.saturating_sub(e.total),
        }
    }

    /// The share of all CPU time used by other processes.
    pub fn other(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.all.saturating_sub(self.ours) as f64 / self.total as f64
        }
    }
}

impl std::ops::Add for CpuShare {
    type Output = CpuShare;

    /// Field-wise sum (of two periods).
    fn add(self, o: CpuShare) -> CpuShare {
        CpuShare { all: self.all + o.all, ours: self.ours + o.ours, total: self.total + o.total }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_share_reads() {
        let a = CpuShare::now().expect("/proc");
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let b = CpuShare::now().expect("/proc").since(&a);
        assert!(b.ours <= b.all + 2 && b.all <= b.total, "{b:?}");
        assert!((0.0..=1.0).contains(&b.other()));
    }
}
