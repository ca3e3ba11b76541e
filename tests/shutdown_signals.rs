//! The daemon's SIGTERM and SIGINT reach its drain even where a library took the
//! signals first with a handler that resets them and raises them again, as LLVM's
//! (inside NVRTC) does: without `ShutdownSignals::take` setting them back to their
//! default, tokio's handler calls that one, and the re-raised signal ends this process.

use shadowkv::cli::signals::ShutdownSignals;
use std::time::Duration;

/// What LLVM's handler does with an interrupt signal: the disposition back to what it
/// found (the default), then the signal raised again.
extern "C" fn reset_and_reraise(sig: libc::c_int) {
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

#[test]
fn shutdown_signals_survive_a_handler_that_reraises() {
    let handler = reset_and_reraise as extern "C" fn(libc::c_int) as libc::sighandler_t;
    for sig in [libc::SIGTERM, libc::SIGINT] {
        unsafe { libc::signal(sig, handler) };
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut signals = ShutdownSignals::take().unwrap();
        for (sig, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT")] {
            unsafe { libc::raise(sig) };
            let got = tokio::time::timeout(Duration::from_secs(10), signals.next())
                .await
                .unwrap_or_else(|_| panic!("{name} raised, not seen in 10 s"));
            assert_eq!(got, name);
        }
    });
}
