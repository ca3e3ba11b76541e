//! The daemon's shutdown signals (SIGTERM, SIGINT), taken back from any library that
//! took them first.
//!
//! NVRTC carries LLVM, which installs handlers for SIGTERM, SIGINT and the crash signals
//! (on the H200 host the CUDA daemon's SigCgt showed LLVM's set; the daemon died the same
//! way whether its kernels were compiled or read from the kernel cache, NVRTC being
//! loaded either way). Its handler puts the dispositions back as it found them (the
//! default) and raises the signal again. tokio's handler calls the handler it replaced
//! before its own work, so a SIGTERM ran LLVM's, which reset SIGTERM to the default and
//! re-raised it: the daemon died before its drain began, its trace cut mid-event and no
//! line logged. Setting both signals back to their default just before tokio takes them
//! leaves tokio nothing to chain to.

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, Signal, SignalKind};

/// SIGTERM and SIGINT as streams; made inside a tokio runtime, before the daemon
/// listens, so that no signal comes before they are in place.
pub struct ShutdownSignals {
    source: Source,
}

/// Where the signals come from.
enum Source {
    /// The process's SIGTERM and SIGINT.
    Process { term: Signal, int: Signal },
    /// Names sent by a test (none of the process's signals taken).
    #[cfg(test)]
    Given(tokio::sync::mpsc::UnboundedReceiver<&'static str>),
}

impl ShutdownSignals {
    /// Sets SIGTERM and SIGINT to their default dispositions, then lets tokio take them.
    pub fn take() -> Result<Self> {
        for sig in [libc::SIGTERM, libc::SIGINT] {
            // SAFETY: setting a disposition to the default installs no code; tokio's
            // handler replaces it at once, below.
            unsafe { libc::signal(sig, libc::SIG_DFL) };
        }
        Ok(ShutdownSignals {
            source: Source::Process {
                term: signal(SignalKind::terminate()).context("taking SIGTERM")?,
                int: signal(SignalKind::interrupt()).context("taking SIGINT")?,
            },
        })
    }

    /// Signals that come only from the sender (for tests: the process keeps its own).
    #[cfg(test)]
    pub(crate) fn given() -> (tokio::sync::mpsc::UnboundedSender<&'static str>, Self) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (
            tx,
            ShutdownSignals {
                source: Source::Given(rx),
            },
        )
    }

    /// Waits for the next of the two; returns its name.
    pub async fn next(&mut self) -> &'static str {
        match &mut self.source {
            Source::Process { term, int } => tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            },
            #[cfg(test)]
            Source::Given(rx) => match rx.recv().await {
                Some(name) => name,
                None => std::future::pending().await,
            },
        }
    }
}
