//! What the benchmark runs: a sending mode of the library on one of the two
//! servers. The thread-per-core server (`server.rs`) runs every [`Mode`]
//! under its own name; the tokio server (`tokio_server.rs`) runs the
//! caching modes under `tokio-MODE` (`tokio-sfbuf`, `tokio-lwbuf`,
//! `tokio-lwbuf-run`). Both answer the same clients from the same kind of
//! [`Sender`](lwbuf::sendfile::Sender), so a row's ratio to sendfile says
//! what its server and its mode cost together.

use std::fmt;
use std::str::FromStr;

use lwbuf::sendfile::Mode;

/// Which server runs a mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Runtime {
    /// One pinned worker thread per CPU, each with its own mio event loop
    /// (`server.rs`).
    #[default]
    Threads,
    /// A tokio multi-thread runtime, one worker per CPU, bound and pinned
    /// at thread start, a task per connection (`tokio_server.rs`).
    Tokio,
}

impl Runtime {
    /// The `--runtime` value.
    pub fn name(self) -> &'static str {
        match self {
            Runtime::Threads => "threads",
            Runtime::Tokio => "tokio",
        }
    }
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A row of the benchmark: a library mode on a server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServerMode {
    pub runtime: Runtime,
    pub mode: Mode,
}

/// The library modes the tokio server runs: it maps with owned handles,
/// which only the caches hand out.
pub const TOKIO_CAPABLE: &[Mode] = &[Mode::SfBuf, Mode::Lwbuf, Mode::LwbufRun];

/// Whether the tokio server runs `mode` (else why not).
pub fn tokio_runs(mode: Mode) -> Result<(), String> {
    if TOKIO_CAPABLE.contains(&mode) {
        Ok(())
    } else {
        let names: Vec<&str> = TOKIO_CAPABLE.iter().map(|m| m.name()).collect();
        Err(format!(
            "the tokio server maps through the caches with owned handles: {} only, not {mode}",
            names.join(", ")
        ))
    }
}

impl ServerMode {
    /// The default list of the benchmark: every mode on the thread-per-core
    /// server (`bench::MODES`, in its order), then the tokio server's modes
    /// (`bench::TOKIO_MODES`).
    pub fn defaults() -> Vec<ServerMode> {
        let threads = crate::bench::MODES.iter().map(|&mode| ServerMode { runtime: Runtime::Threads, mode });
        threads
            .chain(crate::bench::TOKIO_MODES.iter().map(|&mode| ServerMode { runtime: Runtime::Tokio, mode }))
            .collect()
    }
}

impl fmt::Display for ServerMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.runtime {
            Runtime::Threads => f.write_str(self.mode.name()),
            Runtime::Tokio => write!(f, "tokio-{}", self.mode.name()),
        }
    }
}

impl FromStr for ServerMode {
    type Err = String;

    /// A library mode name (the thread-per-core server), or `tokio-` and
    /// the name of a mode the tokio server runs; any case.
    fn from_str(s: &str) -> Result<ServerMode, String> {
        let lower = s.trim().to_ascii_lowercase();
        match lower.strip_prefix("tokio-").or_else(|| lower.strip_prefix("tokio_")) {
            Some(rest) => {
                let mode = rest.parse::<Mode>().map_err(|e| e.to_string())?;
                tokio_runs(mode)?;
                Ok(ServerMode { runtime: Runtime::Tokio, mode })
            }
            None => {
                Ok(ServerMode { runtime: Runtime::Threads, mode: lower.parse::<Mode>().map_err(|e| e.to_string())? })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for m in ServerMode::defaults() {
            assert_eq!(m.to_string().parse::<ServerMode>(), Ok(m));
        }
        assert_eq!("Tokio-LWBUF".parse(), Ok(ServerMode { runtime: Runtime::Tokio, mode: Mode::Lwbuf }));
        assert_eq!("sf-buf".parse(), Ok(ServerMode { runtime: Runtime::Threads, mode: Mode::SfBuf }));
        assert!("tokio-sendfile".parse::<ServerMode>().is_err(), "no owned handles without a cache");
        assert!("tokio-".parse::<ServerMode>().is_err());
        let tokio = ServerMode::defaults().into_iter().filter(|m| m.runtime == Runtime::Tokio).count();
        assert!(tokio >= 2, "the default run includes the tokio server");
    }
}
